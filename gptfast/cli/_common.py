"""Helpers shared by the `gptfast` subcommands: common flags and loading the model a command runs."""

from __future__ import annotations

import argparse
import os

from gptfast.errors import CheckpointError, UserError

BACKEND_CHOICES = ["auto", "reference", "torch", "native", "triton"]


def add_backend_arg(p: argparse.ArgumentParser, help: str = "op backend (default: $GPTFAST_BACKEND or auto)") -> None:
    p.add_argument("--backend", default=None, choices=BACKEND_CHOICES, help=help)


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
        from gptfast.io import HUB_MODELS, load

        if not os.path.exists(checkpoint) and checkpoint not in HUB_MODELS and checkpoint not in HUB_MODELS.values():
            raise UserError(
                f"--checkpoint: no such file or directory {checkpoint!r} "
                f"(and not a hub name: {', '.join(HUB_MODELS)})"
            )
        try:
            model, tokenizer = load(checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return model, tokenizer, checkpoint
    if preset:
        from gptfast.tokenizers import CharTokenizer, GPT2Tokenizer

        config = GPTConfig.from_preset(preset)
        torch.manual_seed(getattr(args, "seed", None) or 0)
        model = GPT(config)
        if config.vocab_size == 65:
            from gptfast.io import default_tokenizer

            tokenizer = default_tokenizer()
        elif config.vocab_size == 50257:
            tokenizer = GPT2Tokenizer()
        else:  # pragma: no cover - presets only use the two vocabularies above
            tokenizer = CharTokenizer([chr(i) for i in range(config.vocab_size)])
        return model, tokenizer, f"preset {preset} (random weights)"
    from gptfast.io import default_model

    model, tokenizer = default_model()
    return model, tokenizer, "embedded shakespeare-char model"
