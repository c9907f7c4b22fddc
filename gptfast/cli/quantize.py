"""`gptfast quantize`: write a checkpoint's weights in a quantized format (gptfast.quantize) as a
new gptfast checkpoint, which `gptfast generate --checkpoint OUT` (and `gptfast.io.load`) reads
back in that format."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from gptfast.cli._common import load_model_for_cli
from gptfast.errors import UserError
from gptfast.quantize import FORMATS, HEAD_DEFAULT


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write a checkpoint with quantized weights (int8, int4, ...)",
        description="Quantize every linear layer (and, with --head, the LM head and the token embedding "
                    "tied to it) and write a new gptfast checkpoint: packed weights + scales in "
                    "safetensors, the format in gptfast.json. The input is never modified.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="any checkpoint `gptfast generate --checkpoint` accepts (default: the embedded "
                          "Shakespeare model)")
    src.add_argument("--preset", default=None, help="a preset name, randomly initialised (for smoke tests)")
    p.add_argument("--format", required=True, choices=list(FORMATS), metavar="FORMAT",
                   help=f"weight format, one of {list(FORMATS)} (required, no default)")
    p.add_argument("--out", required=True,
                   help="output checkpoint directory (created; required, no default). An existing gptfast "
                        "checkpoint there is replaced only with --overwrite; other files in it are never touched")
    p.add_argument("--head", action="store_true", default=HEAD_DEFAULT,
                   help=f"also quantize the LM head and the tied token embedding (default: {HEAD_DEFAULT})")
    p.add_argument("--no-head", dest="head", action="store_false",
                   help="keep the LM head and the token embedding in fp32 (default: off, see --head)")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="replace a gptfast checkpoint already in --out")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args) -> int:
    from gptfast.io import META_NAME, save_checkpoint
    from gptfast.quantize import quantize, weight_bytes

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    if args.checkpoint and os.path.exists(args.checkpoint):
        src = Path(args.checkpoint)
        src_dir = src if src.is_dir() else src.parent
        if out.exists() and src_dir.resolve() == out.resolve():
            raise UserError(f"--out {args.out} is the input checkpoint's directory; write the quantized "
                            "checkpoint to another directory (the input is never modified)")
    if (out / META_NAME).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already holds a gptfast checkpoint; pass --overwrite to replace it")
    t0 = time.perf_counter()
    model, tokenizer, what = load_model_for_cli(args)
    before = weight_bytes(model)
    print(f"gptfast quantize: loaded {what} ({_mb(before)} of weights) in {time.perf_counter() - t0:.1f} s; "
          f"quantizing to {args.format}{'' if args.head else ' (head kept in fp32)'} ...", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    quantize(model, args.format, head=args.head)
    after = weight_bytes(model)
    print(f"gptfast quantize: quantized in {time.perf_counter() - t1:.1f} s; writing {args.out} ...",
          file=sys.stderr, flush=True)
    save_checkpoint(out, model, tokenizer, quantized_from=what)
    print(f"wrote {args.out} ({what}, {args.format}{'' if args.head else ', head fp32'}): "
          f"{_mb(after)} of weights, was {_mb(before)} ({before / max(after, 1):.2f}x smaller)")
    return 0
