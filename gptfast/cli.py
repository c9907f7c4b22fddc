"""`gptfast` command line: generate, info, train, perplexity, bench, attention-map.

Each subcommand has an `_add_<name>` function that declares its arguments and a `cmd_<name>`
function that runs it. User errors -- a `gptfast.errors.UserError`, raised on purpose (missing
file, bad preset, unknown character, ...) -- print one line `gptfast: error: ...` and exit with
status 2, with nothing written to stdout first; set GPTFAST_DEBUG=1 to see their traceback. Any
other exception is a bug in gptfast: it keeps its traceback, followed by how to report it (exit 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from gptfast.errors import UsageError, UserError

REPORT_BUG = ("gptfast: internal error -- this is a bug in gptfast, not a problem with your input. "
              "Please report it on the gptfast issue tracker with the command line, the traceback above "
              "and the output of `gptfast info`.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default: "(default: X)" is added to each help line that does not
    already say its default in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- shared helpers


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default=None,
        choices=["auto", "reference", "torch", "native", "triton"],
        help="op backend (default: $GPTFAST_BACKEND or auto)",
    )


def load_model_for_cli(args):
    """(model, tokenizer, description) from --checkpoint / --preset, or the embedded model."""
    import torch

    from gptfast.config import GPTConfig
    from gptfast.model import GPT

    checkpoint = getattr(args, "checkpoint", None)
    preset = getattr(args, "preset", None)
    if checkpoint and preset:
        raise UserError("pass either --checkpoint or --preset, not both")
    if checkpoint:
        from gptfast.checkpoint import CheckpointError, load_any
        from gptfast.interop import HUB_MODELS

        if not os.path.exists(checkpoint) and checkpoint not in HUB_MODELS and checkpoint not in HUB_MODELS.values():
            raise UserError(
                f"--checkpoint: no such file or directory {checkpoint!r} "
                f"(and not a hub name: {', '.join(HUB_MODELS)})"
            )
        try:
            model, tokenizer = load_any(checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return model, tokenizer, checkpoint
    if preset:
        from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer

        config = GPTConfig.from_preset(preset)
        torch.manual_seed(getattr(args, "seed", None) or 0)
        model = GPT(config)
        if config.vocab_size == 65:
            from gptfast.checkpoint import default_tokenizer

            tokenizer = default_tokenizer()
        elif config.vocab_size == 50257:
            tokenizer = GPT2Tokenizer()
        else:  # pragma: no cover - presets only use the two vocabularies above
            tokenizer = CharTokenizer([chr(i) for i in range(config.vocab_size)])
        return model, tokenizer, f"preset {preset} (random weights)"
    from gptfast.checkpoint import default_model

    model, tokenizer = default_model()
    return model, tokenizer, "embedded shakespeare-char model"


# ----------------------------------------------------------------------------- generate


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text (default: the embedded Shakespeare model)",
        description="KV-cached generation (gptfast.engine), streamed as it is produced; "
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
    p.add_argument("--weight-dtype", default=None, choices=["bf16"],
                   help="CPU, --dtype fp32, native kernels: hold the weight matrices in bf16 (half the "
                        "bytes per token; widened exactly, fp32 math). See the README for its accuracy")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA: CUDA graphs, mode=reduce-overhead)")
    _add_backend_arg(p)
    p.set_defaults(func=cmd_generate)


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


def cmd_generate(args) -> int:
    import torch

    from gptfast.engine import _as_dtype, stream

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
    if args.weight_dtype is not None and (device.type != "cpu" or args.dtype != "fp32"):
        raise UserError(f"--weight-dtype {args.weight_dtype} needs --device cpu and --dtype fp32 (bf16 weights, "
                        f"fp32 math), got --device {args.device} --dtype {args.dtype}; on CUDA use --dtype bf16")
    text = _read_prompt(args)
    model, tokenizer, what = load_model_for_cli(args)
    if args.backend:
        model.backend = args.backend
    dtype = _as_dtype(args.dtype)
    # On CUDA the model itself takes the dtype (no second copy); on CPU fp32 the engine keeps its
    # own decode-layout copies, and for bf16/fp16 casts once (see gptfast.engine).
    model = model.to(device=device, dtype=dtype if device.type == "cuda" else None).eval()
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give at least one character")
    n = args.num_samples
    seed = None if args.seed is None else [args.seed + i for i in range(n)]
    stats: dict = {}
    steps = stream(
        model, [ids] * n, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed,
        eot_token=tokenizer.eot_token, overflow=args.overflow, dtype=dtype, compile=args.compile,
        stats=stats, weight_dtype=args.weight_dtype,
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
        + (f", weights {stats['weight_dtype']}" if stats.get("weight_dtype") not in (None, stats.get("dtype")) else ""),
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="config, parameter count and op backends")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="any checkpoint `gptfast generate --checkpoint` accepts")
    src.add_argument("--preset", help="a preset name (random weights)")
    p.add_argument("--device", default="cpu", help="device type to resolve backends for")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import torch

    from gptfast import __version__, ops

    model, _, what = load_model_for_cli(args)
    print(f"gptfast {__version__}  torch {torch.__version__}")
    print(f"model: {what}")
    for k, v in model.config.to_dict().items():
        print(f"  {k:16s} {v}")
    print(f"  parameters       {model.num_params():,}")
    device = torch.device(args.device).type
    print(f"backends on {device} (requested: {ops.requested_backend()}):")
    for op in ops.OPS:
        chosen, status = ops.explain(op, device)
        print(f"  {op:18s} -> {chosen}")
        for name, line in status.items():
            print(f"      {name:10s} {line}")
    return 0


# ----------------------------------------------------------------------------- later issues


def _add_train(sub) -> None:
    from gptfast.train import add_arguments

    p = sub.add_parser(
        "train", help="train a model (see `gptfast train --help`)",
        description="Train a GPT on a text file; DDP when launched with torchrun.",
    )
    add_arguments(p)
    _add_backend_arg(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from gptfast import train

    return train.main(args)


def _add_perplexity(sub) -> None:
    from gptfast.perplexity import add_arguments

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    add_arguments(p)
    _add_backend_arg(p)
    p.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args) -> int:
    from gptfast import perplexity

    return perplexity.main(args)


def _add_bench(sub) -> None:
    from gptfast.bench import add_arguments

    p = sub.add_parser(
        "bench", help="benchmarks: ops, generation, training",
        description="Time every backend against the reference and PyTorch; tables, JSON, CSV, plots.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from gptfast import bench

    return bench.main(args)


def _add_attention_map(sub) -> None:
    from gptfast.attention_map import add_arguments

    p = sub.add_parser(
        "attention-map", help="plot attention probabilities of a text",
        description="Heatmaps (or, with --graph, a directed graph) of the causal attention "
                    "probabilities of each head, with the tokens on both axes.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_attention_map)


def cmd_attention_map(args) -> int:
    from gptfast import attention_map

    return attention_map.main(args)


def _add_export_gguf(sub) -> None:
    p = sub.add_parser(
        "export-gguf", help="write a GPT-2 checkpoint as a GGUF file for llama.cpp",
        description="Export to llama.cpp's GGUF (gpt2 architecture, GPT-2 BPE tokenizer); needs "
                    "`pip install 'gptfast[gguf]'`. See gptfast.gguf for the layout.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="any checkpoint `gptfast generate --checkpoint` accepts")
    src.add_argument("--preset", help="a preset name, randomly initialised (for smoke tests)")
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced atomically)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight matrices' type (norms, biases and positions stay f32; default: %(default)s)")
    p.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args) -> int:
    from gptfast.gguf import save_gguf

    model, tokenizer, what = load_model_for_cli(args)
    try:
        path = save_gguf(model, args.out, dtype=args.dtype, tokenizer=tokenizer)
    except ImportError as e:
        raise UserError(str(e)) from None
    print(f"wrote {path} ({what}, {args.dtype}, {os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


def _not_yet(name: str):
    def run(args) -> int:
        raise UserError(f"`gptfast {name}` is not implemented yet")

    return run


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser

    def add_parser(*a, **kw):  # every subcommand's --help lists the defaults
        kw.setdefault("formatter_class", _HelpFormatter)
        return _add_parser(*a, **kw)

    sub.add_parser = add_parser
    for add in (_add_generate, _add_info, _add_train, _add_perplexity, _add_bench, _add_attention_map,
                _add_export_gguf):
        add(sub)
    return parser


def _fit_threads() -> None:
    """On a machine where other processes hold cores, use only the free ones (gptfast.threads)."""
    from gptfast.threads import fit_threads_to_free_cores

    got = fit_threads_to_free_cores()
    if got is not None:
        before, after, others = got
        print(f"gptfast: other processes are using {others:.1f} of {os.cpu_count()} cores: "
              f"{after} thread(s) instead of {before} (set OMP_NUM_THREADS to choose)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "func", None) in (cmd_generate, cmd_perplexity):
            _fit_threads()
        return int(args.func(args) or 0)
    except UserError as e:
        if os.environ.get("GPTFAST_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
        print(f"gptfast: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gptfast info | head`: the reader left, not an error of ours
        sys.stderr.close()
        return 0
    except Exception:  # noqa: BLE001 - anything else is our bug: keep the traceback, say so
        import traceback

        traceback.print_exc()
        print(REPORT_BUG, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
