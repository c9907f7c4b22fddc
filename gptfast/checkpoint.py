"""Checkpoints: safetensors weights + a JSON file (config, tokenizer, metadata).

Loading never unpickles arbitrary objects. (The training issue extends this module with
optimizer/RNG state, atomic writes and resume.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptfast.config import GPTConfig
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer, Tokenizer, tokenizer_from_dict

# The 65 distinct characters of Tiny Shakespeare, sorted: the vocabulary of the char presets.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "shakespeare_char"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "gptfast.json"


def default_tokenizer() -> CharTokenizer:
    return CharTokenizer(SHAKESPEARE_CHARS)


def save_checkpoint(directory: str | os.PathLike, model: GPT, tokenizer: Tokenizer, **meta) -> Path:
    """Write `model.safetensors` + `gptfast.json` into `directory`; returns the directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)  # shared with transformer.wte.weight
    tmp = d / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, d / WEIGHTS_NAME)
    info = {"format": "gptfast", "config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), **meta}
    tmp = d / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, d / META_NAME)
    return d


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, metadata) from a gptfast checkpoint directory."""
    from safetensors.torch import load_file

    d = Path(path)
    if d.is_file():
        d = d.parent
    meta_path, weights_path = d / META_NAME, d / WEIGHTS_NAME
    for p in (meta_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"not a gptfast checkpoint: {p} is missing")
    info = json.loads(meta_path.read_text())
    model = GPT(GPTConfig.from_dict(info["config"]))
    state = load_file(str(weights_path), device=device)
    if model.config.tie_weights:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state)
    model.to(device).eval()
    return model, tokenizer_from_dict(info["tokenizer"]), info


def load_any(path: str | os.PathLike) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from any checkpoint format gptfast reads."""
    model, tokenizer, _ = load_checkpoint(path)
    return model, tokenizer


def default_model() -> tuple[GPT, Tokenizer]:
    """The embedded Shakespeare model; until one is shipped, a random `tiny` model (with a note)."""
    if (DEFAULT_MODEL_DIR / META_NAME).exists():
        return load_any(DEFAULT_MODEL_DIR)
    import sys

    print("gptfast: no embedded model shipped yet; using a randomly initialised 'tiny' model",
          file=sys.stderr)
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval(), default_tokenizer()
