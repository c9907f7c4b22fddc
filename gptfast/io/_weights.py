"""What every checkpoint reader shares: reading tensors without unpickling objects, validating a
config against sane limits and against the weights file's header before anything is allocated, and
building a `GPT` that holds exactly a given state dict.

Safety: nothing is unpickled beyond tensors and plain containers. Weights come from safetensors or
`torch.load(..., weights_only=True)`; a pickle that asks for any other object is refused with a
`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from gptfast.config import GPTConfig
from gptfast.errors import CheckpointError
from gptfast.model import GPT

# ----------------------------------------------------------------------------- safe file reading


def torch_load_weights_only(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, dicts, lists, tuples, str/int/float/bool/None
    only. Anything else (a class instance, a callable, `__reduce__` tricks) is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that asks for objects other than tensors and "
            f"plain containers, and gptfast never unpickles arbitrary objects (they can run code). "
            f"Re-save it as tensors only (e.g. safetensors). [{first}]"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # a damaged or foreign file: the weights-only unpickler fails in many ways (KeyError: 105 ...)
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path} ({e})") from None


# ----------------------------------------------------------------------------- checks before allocating

# Upper bounds far above any GPT-2 (gpt2-xl: 48 layers, 1600 wide, 50257 tokens, 1024 positions)
# that still stop a typo from allocating terabytes.
CONFIG_LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 65536, "vocab_size": 4_000_000,
                 "block_size": 1_048_576, "n_inner": 262_144}
REQUIRED_CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def check_config_dict(config: Any, source: str) -> dict[str, Any]:
    """Validate a checkpoint's config before anything is allocated: the required keys are
    present (no silent defaults), sizes are positive integers within `CONFIG_LIMITS`.
    Raises `CheckpointError` naming `source` and the field."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: 'config' must be a JSON object, got {type(config).__name__}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{source}: config lacks required field(s) {', '.join(missing)}")
    for key, limit in CONFIG_LIMITS.items():
        v = config.get(key)
        if v is None and key == "n_inner":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{source}: config field {key} must be a positive integer, got {v!r}")
        if v > limit:
            raise CheckpointError(f"{source}: config field {key} is {v:,}, above the sane limit {limit:,}")
    return config


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header, without reading any tensor."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(100 * 2**20, p.stat().st_size - 8):
                raise CheckpointError(f"corrupted checkpoint: {p} is not a safetensors file "
                                      "(bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint: cannot read the header of {p} ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupted checkpoint: {p} has no safetensors header")
    out = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list):
            out[k] = tuple(int(x) for x in v["shape"])
    return out


def check_weights_fit_config(weights: str | os.PathLike | dict[str, tuple[int, ...]], config: Any,
                             source: str) -> None:
    """Refuse, before building a model, a config whose sizes disagree with the tensors in the
    weights file: n_layer vs the transformer blocks present, vocab_size / n_embd vs the token
    embedding, block_size vs the position embedding. Works for gptfast and Hugging Face names
    (`transformer.h.0.` / `h.0.`, `wte.weight`, `wpe.weight`). Raises `CheckpointError` naming
    the field, the value and what the file holds."""
    shapes = weights if isinstance(weights, dict) else safetensors_shapes(weights)
    where = "the state dict" if isinstance(weights, dict) else str(weights)
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"(?:^|\.)h\.(\d+)\.", k))}
    n_layer = get("n_layer")
    if layers and n_layer is not None and n_layer != max(layers) + 1:
        raise CheckpointError(f"{source}: n_layer is {n_layer:,} but {where} has "
                              f"{max(layers) + 1} transformer block(s)")
    emb = {name: shape for k, shape in shapes.items() for name in ("wte", "wpe")
           if (k == f"{name}.weight" or k.endswith(f".{name}.weight")) and len(shape) == 2}
    checks = []
    if "wte" in emb:
        checks += [("vocab_size", emb["wte"][0], "rows of wte.weight"),
                   ("n_embd", emb["wte"][1], "columns of wte.weight")]
    if "wpe" in emb:
        checks += [("block_size", emb["wpe"][0], "rows of wpe.weight")]
    for field_name, got, what in checks:
        want = get(field_name)
        if want is not None and want != got:
            raise CheckpointError(f"{source}: {field_name} is {want:,} but {where} has {got:,} {what}")


# ----------------------------------------------------------------------------- building


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding exactly `state` (fp32), checked key by key against the config."""
    # Sizes within bounds and agreeing with the tensors, before a single module is built
    # (n_layer 100000 beside a tiny file used to take minutes to refuse).
    check_config_dict(config.to_dict(), source)
    check_weights_fit_config({k: tuple(v.shape) for k, v in state.items()}, config, source)
    # Build on the meta device: no time spent on a random init that is overwritten at once.
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''})"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
            )
    fp32 = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if config.tie_weights:
        fp32["lm_head.weight"] = fp32["transformer.wte.weight"]
    model.load_state_dict(fp32, assign=True)
    if config.tie_weights:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters
    return model.eval()
