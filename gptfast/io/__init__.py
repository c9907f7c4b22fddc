"""Reading and writing models: one `load()` for every format gptfast reads.

    model, tokenizer = gptfast.io.load(path_or_name)         # any format below + its tokenizer
    model = gptfast.io.from_pretrained(path_or_name)         # the model only (= GPT.from_pretrained)
    gptfast.io.save_checkpoint(dir, model, tokenizer, ...)   # our format (training resumes from it)
    gptfast.io.save_pretrained(model, dir)                   # a Hugging Face GPT-2 directory

Modules (each format in one place; the architecture is the same in all, only names and layouts
differ):

    checkpoint.py   gptfast checkpoints: a directory with gptfast.json + step-versioned safetensors
    hf.py           Hugging Face GPT-2 directories and hub names (gpt2, gpt2-medium, ...)
    nanogpt.py      nanoGPT ckpt.pt
    _weights.py     shared: tensors without unpickling, config checks before allocating, build a GPT
    atomic.py       crash-safe file replace (temporary + fsync + rename + fsync of the directory)

Layering: this package sits above `gptfast.model` (it builds models); `GPT.from_pretrained` /
`GPT.save_pretrained` delegate here lazily. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gptfast.errors import CheckpointError, InputError, MissingFileError
from gptfast.io._weights import torch_load_weights_only
from gptfast.io.atomic import write_file_atomic
from gptfast.io.checkpoint import (
    DEFAULT_MODEL_DIR,
    META_NAME,
    default_model,
    default_tokenizer,
    load_checkpoint,
    load_train_state,
    read_checkpoint_info,
    read_history,
    save_checkpoint,
)
from gptfast.io.hf import GPT2_VOCAB, HUB_MODELS, is_hub_name, download_hub_model, load_hf_dir, save_pretrained
from gptfast.io.nanogpt import NANOGPT_PADDED_VOCAB, is_nanogpt, load_nanogpt
from gptfast.model import GPT


def _kind(path: Path) -> str:
    """'gptfast' | 'hf' | 'torch' (a pickle file: nanoGPT or HF .bin) for an existing path."""
    d = path if path.is_dir() else path.parent
    if (d / META_NAME).is_file() and (path.is_dir() or path.suffix == ".safetensors"):
        return "gptfast"
    if path.is_dir():
        if (d / "config.json").is_file():
            return "hf"
        raise CheckpointError(
            f"{path}: not a checkpoint directory (no gptfast.json, no Hugging Face config.json)"
        )
    if path.name == "config.json" or (path.suffix == ".safetensors" and (d / "config.json").is_file()):
        return "hf"
    if path.name == "pytorch_model.bin" and (d / "config.json").is_file():
        return "hf"
    return "torch"


def _load(path_or_name: str | os.PathLike, trim_vocab: bool) -> tuple[GPT, Any, str]:
    """(model, gptfast tokenizer or None, format name)."""
    p = Path(path_or_name)
    if not p.exists():
        name = str(path_or_name)
        if is_hub_name(name):
            return load_hf_dir(download_hub_model(name)), None, "hf"
        raise MissingFileError(
            f"checkpoint not found: {name!r} is neither an existing path nor a hub name "
            f"({', '.join(HUB_MODELS)})"
        )
    kind = _kind(p)
    if kind == "gptfast":
        model, tokenizer, _ = load_checkpoint(p)
        return model, tokenizer, "gptfast"
    if kind == "hf":
        return load_hf_dir(p if p.is_dir() else p.parent), None, "hf"
    with open(p, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save zip / pickle
        raise CheckpointError(
            f"{p}: not a checkpoint gptfast knows (neither a torch.save file nor safetensors): expected "
            "a gptfast checkpoint directory, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt"
        )
    obj = torch_load_weights_only(p)
    if is_nanogpt(obj):
        return load_nanogpt(obj, str(p), trim_vocab=trim_vocab), None, "nanogpt"
    raise CheckpointError(
        f"{p}: not a checkpoint gptfast knows: expected a nanoGPT ckpt.pt (a dict with 'model' and "
        "'model_args'), a Hugging Face GPT-2 directory or a gptfast checkpoint directory"
    )


def from_pretrained(
    path_or_name: str | os.PathLike,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    *,
    trim_vocab: bool = True,
) -> GPT:
    """A `GPT` in eval mode (fp32) from any supported checkpoint (a gptfast checkpoint in a weight
    format, written by `gptfast quantize` / `save_checkpoint` of a quantized model, comes back in it).

    Args:
        path_or_name: a Hugging Face GPT-2 directory (or its config.json / weights file), a hub
            name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or their hub repo ids such as
            "openai-community/gpt2"), a nanoGPT
            ckpt.pt, or a gptfast checkpoint directory.
        device: where the model goes.
        backend: op backend of the model (None = the global choice; see `gptfast.ops`).
        trim_vocab: slice a nanoGPT-padded 50304 vocabulary back to GPT-2's 50257.
    Raises `FileNotFoundError` (no such path / name), `CheckpointError` (a ValueError: unreadable,
    unsafe, or a config we cannot honour).
    """
    model, _, _ = _load(path_or_name, trim_vocab)
    model.to(device)
    model.backend = backend
    return model


def load(
    path_or_name: str | os.PathLike,
    tokenizer: Any = None,
    *,
    device: str | torch.device = "cpu",
    trim_vocab: bool = True,
) -> tuple[GPT, Any]:
    """(model, tokenizer) from any supported checkpoint (see `from_pretrained`).

    The tokenizer: a gptfast checkpoint's own; for Hugging Face / nanoGPT checkpoints with the
    GPT-2 vocabulary (50257, or nanoGPT's padded 50304) `GPT2Tokenizer`. Other vocabularies (e.g.
    nanoGPT's character-level runs, whose vocabulary sits in a pickle `meta.pkl` that gptfast
    will not unpickle) need `tokenizer=` (e.g. `CharTokenizer(chars)`); an explicit `tokenizer`
    always wins and must cover the model's vocabulary.
    """
    model, own, kind = _load(path_or_name, trim_vocab)
    model.to(device)
    V = model.config.vocab_size
    if tokenizer is None:
        tokenizer = own
    if tokenizer is None:
        if V in (GPT2_VOCAB, NANOGPT_PADDED_VOCAB):
            from gptfast.tokenizers import GPT2Tokenizer

            tokenizer = GPT2Tokenizer()
        else:
            where = ("nanoGPT keeps a char-level run's vocabulary in a pickle (data/<dataset>/meta.pkl), "
                     "which gptfast does not unpickle (pickles can run code); "
                     if kind == "nanogpt" else "")
            raise CheckpointError(
                f"{path_or_name}: no tokenizer for a vocabulary of {V} tokens (not GPT-2's {GPT2_VOCAB}); "
                f"{where}pass one: gptfast.io.load(path, tokenizer=gptfast.CharTokenizer(chars)), then "
                "gptfast.io.save_checkpoint(dir, model, tokenizer) converts it to a gptfast "
                "checkpoint that `gptfast generate --checkpoint dir` reads"
            )
    if tokenizer.vocab_size > V:
        raise InputError(
            f"load: tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {V}"
        )
    return model, tokenizer


__all__ = [
    "DEFAULT_MODEL_DIR",
    "HUB_MODELS",
    "META_NAME",
    "CheckpointError",
    "default_model",
    "default_tokenizer",
    "download_hub_model",
    "from_pretrained",
    "load",
    "load_checkpoint",
    "load_hf_dir",
    "load_nanogpt",
    "load_train_state",
    "read_checkpoint_info",
    "read_history",
    "save_checkpoint",
    "save_pretrained",
    "write_file_atomic",
]
