"""`gptfast generate`: KV-cached generation, streamed as it is produced."""

from __future__ import annotations

import math
import sys

from gptfast.cli._common import add_backend_arg, load_model_for_cli
from gptfast.errors import UsageError, UserError
from gptfast.quantize import FORMATS

_DTYPE_FLAG = {}  # torch dtype -> --dtype value, filled on first use (no torch import at parse time)
FIT_THREADS = True  # main() fits torch's threads to the free cores first (gptfast.threads)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text (default: the embedded Shakespeare model)",
        description="KV-cached generation (gptfast.generation), streamed as it is produced; "
                    "tokens/s, ms/token and peak memory go to stderr at the end.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--checkpoint",
        help="gptfast checkpoint (directory or .safetensors), Hugging Face GPT-2 directory, "
        "nanoGPT ckpt.pt, or a hub name (gpt2, gpt2-medium, ...; needs the local HF cache or network)",
    )
    src.add_argument("--preset", help="a preset name, randomly initialised (for smoke tests)")
    prm = p.add_mutually_exclusive_group()
    prm.add_argument("--prompt", default=None, help="prompt text; '-' reads stdin (default: a newline)")
    prm.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens generated per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples generated as one batch")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (None = all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this total probability (None = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL repetition penalty (> 1 discourages repeats; 1 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="sample i uses its own generator seeded seed + i (reproducible per sample)")
    p.add_argument("--overflow", default="slide", choices=["slide", "error"],
                   help="past the block size: slide the context window (as the reference) or fail")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights / activations / KV cache dtype (logits stay fp32)")
    p.add_argument("--quantize", default=None, choices=list(FORMATS), metavar="FORMAT",
                   help=f"hold the weight matrices in another format (gptfast.quantize; one of {list(FORMATS)}; "
                        "default: %(default)s = the model's own). bf16: half the bytes per token, widened "
                        "exactly, fp32 math (needs --dtype fp32); int8 / int4-gG[-zp]: quantized weights, "
                        "packed (the LM head included). A checkpoint written by `gptfast quantize` is "
                        "already in its format. See the README for accuracy and speed")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA: CUDA graphs, mode=reduce-overhead)")
    add_backend_arg(p)
    p.set_defaults(func=run)


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                             f"at offset {e.start})") from None
    if args.prompt == "-":
        return sys.stdin.read()
    return "\n" if args.prompt is None else args.prompt


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return f"peak RSS {rss * scale / 2**20:.0f} MiB"


def run(args) -> int:
    import torch

    from gptfast.generation import as_dtype, stream
    from gptfast.quantize import quantize, weight_bytes

    saved = ""  # --quantize: the weights' bytes before and after, on the summary line

    checks = [
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}"),
        (math.isfinite(args.temperature) and args.temperature >= 0,
         f"--temperature must be a finite number >= 0, got {args.temperature}"),
        (args.top_k is None or args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}"),
        (args.top_p is None or 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {args.repetition_penalty}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.quantize == "bf16" and args.dtype != "fp32":
        raise UserError(f"--quantize bf16 (bf16 weights, fp32 math) needs --dtype fp32, got --dtype {args.dtype}; "
                        "--dtype bf16 alone already holds every weight in bf16")
    text = _read_prompt(args)
    model, tokenizer, what = load_model_for_cli(args)
    if args.backend:
        model.backend = args.backend
    dtype = as_dtype(args.dtype)
    _DTYPE_FLAG.update({as_dtype(f): f for f in ("fp32", "bf16", "fp16")})
    held = getattr(model, "weight_format", None)
    if held is not None:  # a checkpoint in a weight format (`gptfast quantize`): its buffers keep their dtypes
        if dtype != model.dtype:
            raise UserError(f"--dtype {args.dtype}: {what} holds {held} weights with {_DTYPE_FLAG.get(model.dtype, model.dtype)} activations; "
                            f"run it with --dtype {_DTYPE_FLAG.get(model.dtype, model.dtype)} or quantize "
                            "the original checkpoint in the dtype you want")
        if args.quantize is not None and args.quantize != held:
            raise UserError(f"--quantize {args.quantize}: {what} is already in format {held}; "
                            "quantize the original checkpoint instead")
        model = model.to(device=device).eval()
    else:
        model = model.to(device=device, dtype=dtype).eval()  # the command owns its model: no second copy
        if args.quantize is not None:
            before = weight_bytes(model)
            quantize(model, args.quantize)
            saved = f" ({weight_bytes(model) / 1e6:.1f} MB of weights, was {before / 1e6:.1f} MB)"
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give at least one character")
    n = args.num_samples
    seed = None if args.seed is None else [args.seed + i for i in range(n)]
    stats: dict = {}
    steps = stream(
        model, [ids] * n, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed,
        eot_token=tokenizer.eot_token, overflow=args.overflow, compile=args.compile, stats=stats,
    )
    # Run the setup and the first step before anything is printed: a bad request (an overflow
    # with --overflow error, an unavailable backend, non-finite logits) fails with nothing on stdout.
    steps = iter(steps)
    first = next(steps, None)
    if first is not None:
        import itertools

        steps = itertools.chain([first], steps)
    out = sys.stdout
    if n == 1:
        # Stream: print what the decoded text gained since the last token. A byte-level BPE token
        # may end inside a UTF-8 character (decoded as U+FFFD): wait for the rest of it.
        new: list[int] = []
        shown = tokenizer.decode(ids)
        out.write(shown)
        out.flush()
        for step in steps:
            if step.tokens[0] is None or step.tokens[0] == tokenizer.eot_token:
                continue
            new.append(step.tokens[0])
            full = tokenizer.decode(ids + new)
            if not full.endswith("\ufffd") and full.startswith(shown):
                out.write(full[len(shown):])
                out.flush()
                shown = full
        full = tokenizer.decode(ids + new)
        out.write(full[len(shown):] + "\n")
    else:
        rows: list[list[int]] = [[] for _ in range(n)]
        for step in steps:
            for i, t in enumerate(step.tokens):
                if t is not None and t != tokenizer.eot_token:
                    rows[i].append(t)
        for i, r in enumerate(rows):
            out.write(f"--- sample {i + 1} ---\n{tokenizer.decode(ids + r)}\n")
    out.flush()
    new_tokens = stats.get("new_tokens", 0)
    total = stats.get("total_s", 0.0)
    steps_run = max(1, stats.get("steps", 0))
    print(
        f"[{what}] {new_tokens} tokens in {total:.2f} s: {new_tokens / max(total, 1e-9):.1f} tokens/s, "
        f"{1e3 * stats.get('decode_s', 0.0) / steps_run:.2f} ms/token (batch {n}), "
        f"prefill {1e3 * stats.get('prefill_s', 0.0):.1f} ms, {_peak_memory(device)}, "
        f"ops: {'+'.join(sorted(set(stats.get('backends', {}).values()))) or '-'}, "
        f"dtype {stats.get('dtype', args.dtype)}"
        + (f", weights {stats['weight_format']}{saved}" if stats.get("weight_format") not in (None, stats.get("dtype"))
           else ""),
        file=sys.stderr,
    )
    return 0
