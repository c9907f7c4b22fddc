"""Checkpoints: a directory holding safetensors weights, a JSON description and (for training)
the optimizer / RNG state.

    <dir>/model.safetensors   weights (the tied LM head is stored once, as transformer.wte.weight)
    <dir>/gptfast.json        {"format", "config", "tokenizer", "files": {name: sha256}, step, losses, ...}
    <dir>/train_state.pt      optional: optimizer state, iteration, sampler / dropout RNG states
    <dir>/history.json        optional: eval history written by `gptfast train`

Safety: loading never unpickles arbitrary objects -- weights come from safetensors and the train
state from `torch.load(weights_only=True)` (tensors, dicts, lists and plain scalars only).

Atomicity: `save_checkpoint` writes the complete new checkpoint into a temporary directory beside
the target and then swaps it in with two renames (target -> backup, temp -> target) before the
backup is deleted. A crash at any moment leaves either the old or the new checkpoint complete:
the only window where `<dir>` itself is missing is between the two renames, and loading then
restores the backup (`_recover`). Integrity: the JSON records each file's sha256, checked on
load, so a truncated or corrupted file gives a clear error instead of garbage weights.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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
TRAIN_STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"
FORMAT = "gptfast"
_MANAGED = {WEIGHTS_NAME, META_NAME, TRAIN_STATE_NAME, HISTORY_NAME}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or does not fit the request."""


def default_tokenizer() -> CharTokenizer:
    return CharTokenizer(SHAKESPEARE_CHARS)


def git_sha(repo: str | os.PathLike | None = None) -> str | None:
    """The current git commit of `repo` (default: this source tree), or None outside git."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _backup_paths(d: Path) -> list[str]:
    return sorted(glob.glob(str(d.parent / f".{d.name}.old-*")))


def _recover(d: Path) -> None:
    """If a save was killed between its two renames, `d` is missing and its backup holds the
    previous complete checkpoint: put it back."""
    if d.exists():
        return
    backups = _backup_paths(d)
    if backups:
        os.replace(backups[-1], d)


def _state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)  # shared with transformer.wte.weight
    return state


def save_checkpoint(
    directory: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    train_state: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    keep_files: bool = True,
    _fail_after: str | None = None,
    **meta: Any,
) -> Path:
    """Write a checkpoint directory atomically; returns the directory.

    Args:
        directory: target directory (created; an existing checkpoint there is replaced whole).
        model: a `GPT` (unwrap DDP first). Saved as safetensors, fp32/bf16 as the parameters are.
        tokenizer: stored as its `to_dict()` description.
        train_state: optional dict of tensors / plain Python values (optimizer state, RNG
            states, iteration) written with `torch.save` to `train_state.pt`.
        history: optional list of eval records written to `history.json`.
        keep_files: copy other files already in `directory` (a plot, a log) into the new one.
        **meta: JSON-serialisable metadata (step, train_loss, val_loss, ...).
    """
    from safetensors.torch import save_file

    d = Path(directory).absolute()
    d.parent.mkdir(parents=True, exist_ok=True)
    _recover(d)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"checkpoint target {d} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
    try:
        save_file(_state_dict_for_save(model), str(tmp / WEIGHTS_NAME))
        files = [WEIGHTS_NAME]
        if _fail_after == WEIGHTS_NAME:  # test hook: simulate a crash mid-write
            raise RuntimeError("simulated failure while writing the checkpoint")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_NAME)
            files.append(TRAIN_STATE_NAME)
        if history is not None:
            (tmp / HISTORY_NAME).write_text(json.dumps(history, indent=1))
            files.append(HISTORY_NAME)
        info = {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(),
            **meta,
            "files": {name: _sha256(tmp / name) for name in files},
        }
        if "git_sha" not in info:
            info["git_sha"] = git_sha()
        (tmp / META_NAME).write_text(json.dumps(info, indent=2))
        if keep_files and d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.name not in _MANAGED:  # a stale train state must not survive
                    shutil.copy2(p, tmp / p.name)
        # mkdtemp makes the directory private (0700) and safetensors writes 0600: give the
        # checkpoint the usual permissions (0777 / 0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            os.chmod(p, 0o666 & ~umask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if _fail_after == "swap":
            raise RuntimeError("simulated failure before the swap")
        backup = None
        if d.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{d.name}.old-", dir=d.parent))
            os.replace(d, backup)  # renaming a directory onto an empty directory is allowed
        os.replace(tmp, d)
        _fsync_dir(d.parent)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if d.is_file():
        d = d.parent
    _recover(d)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return d


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `gptfast.json` of a checkpoint directory (validated, files not hashed)."""
    d = _checkpoint_dir(path)
    meta_path = d / META_NAME
    if not meta_path.exists():
        raise FileNotFoundError(f"not a gptfast checkpoint: {meta_path} is missing")
    try:
        info = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint: {meta_path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or "config" not in info or "tokenizer" not in info:
        raise CheckpointError(f"corrupted checkpoint: {meta_path} lacks 'config' / 'tokenizer'")
    return info


def _verify_file(d: Path, name: str, info: dict[str, Any]) -> Path:
    p = d / name
    if not p.exists():
        raise FileNotFoundError(f"not a gptfast checkpoint: {p} is missing")
    expected = (info.get("files") or {}).get(name)
    if expected is not None and _sha256(p) != expected:
        raise CheckpointError(
            f"corrupted checkpoint: {p} does not match the sha256 recorded in {META_NAME} "
            "(truncated or modified file)"
        )
    return p


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, metadata) from a gptfast checkpoint directory (or its
    model.safetensors). Raises `FileNotFoundError` / `CheckpointError` (a ValueError) on a
    missing, truncated or corrupted checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _checkpoint_dir(path)
    info = read_checkpoint_info(d)
    weights_path = _verify_file(d, WEIGHTS_NAME, info)
    try:
        config = GPTConfig.from_dict(info["config"])
        tokenizer = tokenizer_from_dict(info["tokenizer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"corrupted checkpoint {d}: {e}") from None
    model = GPT(config)
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupted checkpoint: cannot read {weights_path} ({e})") from None
    if config.tie_weights and "transformer.wte.weight" in state:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise CheckpointError(
            f"checkpoint {d}: weights do not match its config ({first[0].strip()})"
        ) from None
    model.to(device).eval()
    return model, tokenizer, info


def load_train_state(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """The optimizer / RNG / iteration state saved beside the weights (`torch.load` with
    `weights_only=True`: no arbitrary objects are unpickled)."""
    d = _checkpoint_dir(path)
    info = read_checkpoint_info(d)
    p = _verify_file(d, TRAIN_STATE_NAME, info)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refused, ...
        raise CheckpointError(f"corrupted checkpoint: cannot read {p} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupted checkpoint: {p} does not hold a dict")
    return state


def load_any(path: str | os.PathLike) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from any checkpoint format gptfast reads: a gptfast checkpoint, a
    Hugging Face GPT-2 directory or hub name, a nanoGPT ckpt.pt (see `gptfast.interop.load_any`)."""
    from gptfast.interop import load_any as _load_any

    return _load_any(path)


def default_model() -> tuple[GPT, Tokenizer]:
    """The embedded Shakespeare model; until one is shipped, a random `tiny` model (with a note)."""
    if (DEFAULT_MODEL_DIR / META_NAME).exists():
        return load_any(DEFAULT_MODEL_DIR)
    import sys

    print("gptfast: no embedded model shipped yet; using a randomly initialised 'tiny' model",
          file=sys.stderr)
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval(), default_tokenizer()
