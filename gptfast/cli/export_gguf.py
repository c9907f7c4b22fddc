"""`gptfast export-gguf`: write a checkpoint as a GGUF file for llama.cpp (gptfast.gguf)."""

from __future__ import annotations

import os

from gptfast.cli._common import load_model_for_cli
from gptfast.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-gguf", help="write a GPT-2 checkpoint as a GGUF file for llama.cpp",
        description="Export to llama.cpp's GGUF (gpt2 architecture, GPT-2 BPE tokenizer); needs "
                    "`pip install 'gptfast[gguf]'`. See gptfast.gguf for the layout.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="any checkpoint `gptfast generate --checkpoint` accepts")
    src.add_argument("--preset", help="a preset name, randomly initialised (for smoke tests)")
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced atomically)")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="weight matrices' type (norms, biases and positions stay f32; default: f32, or a "
                        "quantized checkpoint's own: int8-g32 as q8_0, int4-g32 as q4_0, bf16 as bf16, blocks copied)")
    p.set_defaults(func=run)


def _default_dtype(model) -> str:
    from gptfast.gguf import FORMAT_GGUF_DTYPE

    return FORMAT_GGUF_DTYPE.get(getattr(model, "weight_format", None), "f32")


def run(args) -> int:
    from gptfast.gguf import save_gguf

    model, tokenizer, what = load_model_for_cli(args)
    try:
        path = save_gguf(model, args.out, dtype=args.dtype, tokenizer=tokenizer)
    except ImportError as e:
        raise UserError(str(e)) from None
    dtype = args.dtype or _default_dtype(model)
    print(f"wrote {path} ({what}, {dtype}, {os.path.getsize(path) / 1e6:.1f} MB)")
    return 0
