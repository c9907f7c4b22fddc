"""`gptfast` command line: generate, info, train, perplexity, bench, attention-map.

Each subcommand has an `_add_<name>` function that declares its arguments and a `cmd_<name>`
function that runs it. User errors (missing file, bad preset, unknown character, ...) print one
line `gptfast: error: ...` and exit with status 2; set GPTFAST_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


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
        if not os.path.exists(checkpoint):
            raise UserError(f"checkpoint not found: {checkpoint}")
        from gptfast.checkpoint import load_any

        model, tokenizer = load_any(checkpoint)
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
    p = sub.add_parser("generate", help="generate text (default: the embedded Shakespeare model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="gptfast checkpoint (directory or .safetensors)")
    src.add_argument("--preset", help="a preset name, randomly initialised (for smoke tests)")
    p.add_argument("--prompt", default="\n", help="prompt text (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    _add_backend_arg(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from gptfast.generation import generate_reference

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, tokenizer, what = load_model_for_cli(args)
    if args.backend:
        model.backend = args.backend
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("--prompt encodes to no tokens; give at least one character")
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    out = generate_reference(
        model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eot_token=tokenizer.eot_token,
    )
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(row))
    print(f"[{what}]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="config, parameter count and op backends")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint")
    src.add_argument("--preset")
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
    p = sub.add_parser("train", help="train a model (see `gptfast train --help`)")
    p.set_defaults(func=_not_yet("train"))


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    p.set_defaults(func=_not_yet("perplexity"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: ops, generation, training")
    p.set_defaults(func=_not_yet("bench"))


def _add_attention_map(sub) -> None:
    p = sub.add_parser("attention-map", help="plot attention probabilities of a text")
    p.set_defaults(func=_not_yet("attention-map"))


def _not_yet(name: str):
    def run(args) -> int:
        raise UserError(f"`gptfast {name}` is not implemented yet")

    return run


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_info, _add_train, _add_perplexity, _add_bench, _add_attention_map):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("GPTFAST_DEBUG") == "1":
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gptfast: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
