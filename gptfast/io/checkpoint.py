"""Checkpoints: a directory holding safetensors weights, a JSON manifest and (for training)
the optimizer / RNG state and eval history.

    <dir>/gptfast.json                 manifest: {"format", "config", "tokenizer", "layout", "files":
                                       {name: sha256}, step, losses, ...}; written last
    <dir>/model-<step>.safetensors     weights (the tied LM head is stored once, as transformer.wte.weight;
                                       quantized (`gptfast.quantize`): packed qweight + scale (+ zero)
                                       per layer, a quantized tied head once as lm_head.*, and the
                                       manifest's "weight_format" / "quantized_head" say which format
                                       `load_checkpoint` rebuilds)
    <dir>/train_state-<step>.pt        optional: optimizer state, iteration, sampler / dropout RNG states
    <dir>/history-<step>.json          optional: eval history written by `gptfast train`

The directory is the user's: a save writes only these files and removes only the files of the
checkpoint it replaces (named by the previous manifest). It never creates temporary directories,
never renames, deletes or re-permissions the directory or anything else in it, so other files,
subdirectories, the directory's mode and a mount point are all left as they are.

Crash safety: every file is written under a temporary name in the same directory, fsynced and
renamed to a fresh name (the step in the name, never an existing file); the manifest, recording
each file's sha256, is written the same way and renamed over the old manifest last. A reader
therefore sees the old manifest with its old files or the new one with its new files, never a
mix; a kill at any moment leaves a loadable checkpoint. The files of a save that was interrupted
are listed in a journal (`.gptfast-pending.json`) and removed by the next save. The sha256s are
checked on load, so a truncated or corrupted file gives a clear error instead of garbage weights.

The previous format (fixed names model.safetensors / train_state.pt / history.json, the
directory swapped as a whole) is still read, and a save into such a directory replaces its files.

Safety: loading never unpickles arbitrary objects -- weights come from safetensors and the train
state from `torch.load(weights_only=True)` (tensors, dicts, lists and plain scalars only). The
config is validated and compared with the weights file's header before a model is allocated.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import torch

from gptfast.config import GPTConfig
from gptfast.errors import CheckpointError, MissingFileError
from gptfast.io._weights import check_config_dict, check_weights_fit_config
from gptfast.io.atomic import TMP_PREFIX as _TMP_PREFIX
from gptfast.io.atomic import current_umask as _umask
from gptfast.io.atomic import fsync_dir as _fsync_dir
from gptfast.io.atomic import fsync_file as _fsync_file
from gptfast.io.atomic import remove_own, rename_atomic, write_in_own_dir
from gptfast.io.atomic import unlink_quiet as _unlink_quiet
from gptfast.model import GPT
from gptfast.tokenizers import CharTokenizer, Tokenizer, tokenizer_from_dict

# The 65 distinct characters of Tiny Shakespeare, sorted: the vocabulary of the char presets.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "shakespeare_char"
META_NAME = "gptfast.json"
# The previous format's fixed file names (still read; see `checkpoint_files`).
WEIGHTS_NAME = "model.safetensors"
TRAIN_STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.json"
FORMAT = "gptfast"
FORMAT_VERSION = 2
# role -> (name prefix, suffix) of the current format's files: model-<step>.safetensors, ...
_ROLES = {"weights": ("model", ".safetensors"), "train_state": ("train_state", ".pt"),
          "history": ("history", ".json")}
_LEGACY_NAMES = {"weights": WEIGHTS_NAME, "train_state": TRAIN_STATE_NAME, "history": HISTORY_NAME}
_PENDING_NAME = ".gptfast-pending.json"


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


def _backup_paths(d: Path) -> list[str]:
    """Backups left by the previous format's directory swap (`.NAME.old-*` beside `d`)."""
    return sorted(glob.glob(str(d.parent / f".{d.name}.old-*")))


def _recover(d: Path) -> None:
    """Previous format only: if one of its saves was killed between its two directory renames,
    `d` is missing and its backup holds the previous complete checkpoint: put it back. (The
    current format never renames, creates or removes the directory itself.)"""
    if d.exists():
        return
    backups = _backup_paths(d)
    if backups:
        rename_atomic(backups[-1], d)


def _state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)  # shared with transformer.wte.weight
    return state


def _format_fields(model: GPT) -> dict[str, Any]:
    """The manifest's record of a weight format (`gptfast.quantize`): {"weight_format": "int8",
    "quantized_head": true}; nothing for a plain model."""
    fmt = getattr(model, "weight_format", None)
    if fmt is None:
        return {}
    return {"weight_format": fmt, "quantized_head": bool(getattr(model, "quantized_head", True))}


def _model_for(config: GPTConfig, info: dict[str, Any], where: str) -> GPT:
    """An empty model of the checkpoint's config and weight format (the format's buffers
    allocated, not computed: the weights file fills them)."""
    from gptfast.quantize import FORMATS, quantize

    fmt = info.get("weight_format")
    head = info.get("quantized_head", True)
    if fmt is not None and fmt not in FORMATS:
        raise CheckpointError(f"{where}: weight_format must be one of {FORMATS} (or absent), got {fmt!r}")
    if not isinstance(head, bool):
        raise CheckpointError(f"{where}: quantized_head must be true or false, got {head!r}")
    model = GPT(config)
    if fmt is not None:
        try:
            quantize(model, fmt, head=head, _empty=True)
        except ValueError as e:  # a config the format cannot hold (widths vs groups)
            raise CheckpointError(f"{where}: {e}") from None
    return model


def _check_state_fits(model: GPT, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of the file has the model's name, shape and dtype (load_state_dict would
    convert a dtype silently: a float32 scale into a float16 buffer, an int8 into a uint8)."""
    want = model.state_dict()
    for k, t in state.items():
        w = want.get(k)
        if w is None:
            continue  # load_state_dict names unexpected keys
        if tuple(t.shape) != tuple(w.shape) or t.dtype != w.dtype:
            raise CheckpointError(f"{where}: {k} is {t.dtype} {tuple(t.shape)} but the config and weight format "
                                  f"need {w.dtype} {tuple(w.shape)}")


def _safe_name(name: Any) -> bool:
    """A plain file name inside the checkpoint directory (a manifest must not make us read or
    delete anything outside it, nor the manifest itself)."""
    return (isinstance(name, str) and name not in ("", ".", "..", META_NAME, _PENDING_NAME)
            and os.path.basename(name) == name and "/" not in name and "\\" not in name)


def checkpoint_files(info: dict[str, Any]) -> dict[str, str]:
    """{role: file name} of a checkpoint's files, roles "weights", "train_state", "history".

    The current format lists them in `info["layout"]`; the previous format used the fixed names
    model.safetensors / train_state.pt / history.json."""
    layout = info.get("layout")
    if isinstance(layout, dict):
        return {role: name for role, name in layout.items() if role in _ROLES and _safe_name(name)}
    return dict(_LEGACY_NAMES)


def checkpoint_path(directory: str | os.PathLike, role: str = "weights") -> Path:
    """Path of one of a checkpoint's files ("weights", "train_state" or "history")."""
    d = _checkpoint_dir(directory)
    name = checkpoint_files(read_checkpoint_info(d)).get(role)
    if name is None:
        raise MissingFileError(f"checkpoint {d} has no {role} file")
    return d / name


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _finish_interrupted_save(d: Path) -> None:
    """A save killed before its manifest was committed leaves files that no manifest references;
    one killed just after leaves the replaced checkpoint's files. Its journal
    (`.gptfast-pending.json`, written before anything else) names both sets: remove exactly those
    that the current manifest does not use, then the journal."""
    journal = d / _PENDING_NAME
    if not journal.exists():
        return
    pending = _read_json_or_none(journal)
    info = _read_json_or_none(d / META_NAME)
    live = set(checkpoint_files(info).values()) if isinstance(info, dict) else set()
    if isinstance(pending, dict):
        # "files": the interrupted save's new files; "old": the files of the checkpoint it was
        # replacing (removed once its manifest is committed). Whichever set is not live goes.
        for name in [*pending.get("files", []), *pending.get("old", [])]:
            if _safe_name(name) and name not in live:
                _unlink_quiet(d / name)
        token = pending.get("token")
        if isinstance(token, str) and token.isalnum():
            for p in d.glob(f"{_TMP_PREFIX}{token}-*"):
                remove_own(p)  # our temporaries, and write_in_own_dir's directories
    # An unreadable journal was cut short while being written, before any other file existed.
    _unlink_quiet(journal)
    _fsync_dir(d)


def save_checkpoint(
    directory: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer,
    *,
    train_state: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    _fail_after: str | None = None,
    **meta: Any,
) -> Path:
    """Write a checkpoint into `directory`, crash-safely; returns the directory.

    Only gptfast's own files are written: `model-<step>.safetensors`, `train_state-<step>.pt`,
    `history-<step>.json` and the manifest `gptfast.json`. Anything else in the directory (a
    user's files, subdirectories, its permissions, a mount point) is never touched.

    Order (the manifest is the commit point): each new file is written under a temporary name in
    the same directory, fsynced and renamed to a name no file has yet; the directory is fsynced;
    the manifest (the sha256 of every file) is written the same way and renamed over the old one;
    only then are the files of the replaced checkpoint removed. A crash at any moment leaves the
    old manifest with its old, intact files or the new one with its new files; the files of an
    interrupted save are named in a journal written first and removed by the next save.

    Args:
        directory: target directory (created, with parents, if missing).
        model: a `GPT` (unwrap DDP first). Saved as safetensors, fp32/bf16 as the parameters are.
        tokenizer: stored as its `to_dict()` description.
        train_state: optional dict of tensors / plain Python values (optimizer state, RNG
            states, iteration) written with `torch.save`.
        history: optional list of eval records (JSON).
        **meta: JSON-serialisable metadata (step, train_loss, val_loss, ...).
    """
    from safetensors.torch import save_file

    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"checkpoint target {d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_save(d)
    old_info = _read_json_or_none(d / META_NAME) if (d / META_NAME).exists() else None
    old_files = set(checkpoint_files(old_info).values()) if isinstance(old_info, dict) else set()

    # safetensors >= 0.7 makes its own `.tmpXXXXXX` beside the path it is given: keep that in a
    # directory of ours so that a kill cannot leave a name in the user's directory.
    writers: dict[str, Any] = {
        "weights": lambda p: write_in_own_dir(p, lambda q: save_file(_state_dict_for_save(model), str(q)))
    }
    if train_state is not None:
        writers["train_state"] = lambda p: torch.save(train_state, p)
    if history is not None:
        writers["history"] = lambda p: p.write_text(json.dumps(history, indent=1))
    step = meta.get("step")
    tag = str(step) if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else "0"
    for n in range(10_000):  # a name no file has: never overwrite, never collide with the live set
        suffix = tag if n == 0 else f"{tag}-{n}"
        layout = {role: f"{_ROLES[role][0]}-{suffix}{_ROLES[role][1]}" for role in writers}
        if not any((d / name).exists() or name in old_files for name in layout.values()):
            break
    else:  # pragma: no cover
        raise CheckpointError(f"cannot find a free file name for the checkpoint in {d}")
    token = secrets.token_hex(6)
    journal = d / _PENDING_NAME
    created: list[Path] = []
    committed = False
    mode = 0o666 & ~_umask()
    try:
        with open(journal, "w") as f:
            json.dump({"token": token, "files": sorted(layout.values()), "old": sorted(old_files)}, f)
            f.flush()
            os.fsync(f.fileno())
        created.append(journal)
        _fsync_dir(d)
        files: dict[str, str] = {}
        for role, write in writers.items():
            tmp = d / f"{_TMP_PREFIX}{token}-{layout[role]}"
            created.append(tmp)
            write(tmp)
            if _fail_after == role:  # test hook: simulate a crash mid-save
                raise RuntimeError(f"simulated failure after writing the {role}")
            os.chmod(tmp, mode)  # safetensors writes 0600; our files get the usual 0666 - umask
            _fsync_file(tmp)
            files[layout[role]] = _sha256(tmp)
            final = d / layout[role]
            os.replace(tmp, final)
            created.append(final)
        _fsync_dir(d)  # the new files are on disk under their names before the manifest names them
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(),
            **meta,
            **_format_fields(model),
            "layout": layout,
            "files": files,
        }
        if "git_sha" not in info:
            info["git_sha"] = git_sha()
        tmp = d / f"{_TMP_PREFIX}{token}-{META_NAME}"
        created.append(tmp)
        tmp.write_text(json.dumps(info, indent=2))
        try:  # keep the permissions a user gave the existing manifest
            os.chmod(tmp, os.stat(d / META_NAME).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        if _fail_after == "manifest":
            raise RuntimeError("simulated failure before the manifest is committed")
        os.replace(tmp, d / META_NAME)  # the commit point
        committed = True
        _fsync_dir(d)
    except BaseException:
        if not committed:
            for p in reversed(created):
                _unlink_quiet(p)
            _fsync_dir(d)
        raise
    # The replaced checkpoint's files: ours (its manifest named them), no longer referenced.
    for name in old_files - set(layout.values()):
        if (d / name).is_file():
            _unlink_quiet(d / name)
    _unlink_quiet(journal)
    _fsync_dir(d)
    return d


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if d.is_file():
        d = d.parent
    _recover(d)
    if not d.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    return d


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `gptfast.json` of a checkpoint directory (validated, files not hashed)."""
    d = _checkpoint_dir(path)
    meta_path = d / META_NAME
    if not meta_path.exists():
        raise MissingFileError(f"not a gptfast checkpoint: {meta_path} is missing")
    try:
        info = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted checkpoint: {meta_path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or "config" not in info or "tokenizer" not in info:
        raise CheckpointError(f"corrupted checkpoint: {meta_path} lacks 'config' / 'tokenizer'")
    if not isinstance(info["config"], dict):
        raise CheckpointError(f"corrupted checkpoint: {meta_path}: 'config' must be an object")
    return info


def _verify_file(d: Path, role: str, info: dict[str, Any]) -> Path:
    name = checkpoint_files(info).get(role)
    if name is None:
        raise MissingFileError(f"checkpoint {d} has no {role} file")
    p = d / name
    if not p.exists():
        raise MissingFileError(f"not a gptfast checkpoint: {p} is missing")
    expected = (info.get("files") or {}).get(name)
    if expected is not None and _sha256(p) != expected:
        raise CheckpointError(
            f"corrupted checkpoint: {p} does not match the sha256 recorded in {META_NAME} "
            "(truncated or modified file)"
        )
    return p


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, metadata) from a gptfast checkpoint directory (or a file
    in it). Raises `FileNotFoundError` / `CheckpointError` (a ValueError) on a missing,
    truncated, corrupted or implausible checkpoint -- checked before any memory is allocated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _checkpoint_dir(path)
    info = read_checkpoint_info(d)
    meta_path = d / META_NAME
    check_config_dict(info["config"], str(meta_path))
    try:
        config = GPTConfig.from_dict(info["config"])
        tokenizer = tokenizer_from_dict(info["tokenizer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"corrupted checkpoint {d}: {e}") from None
    weights_path = _verify_file(d, "weights", info)
    check_weights_fit_config(weights_path, config, str(meta_path))
    model = _model_for(config, info, str(meta_path))
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupted checkpoint: cannot read {weights_path} ({e})") from None
    if config.tie_weights and "transformer.wte.weight" in state:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    _check_state_fits(model, state, f"checkpoint {d}")
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
    p = _verify_file(d, "train_state", info)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refused, ...
        raise CheckpointError(f"corrupted checkpoint: cannot read {p} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupted checkpoint: {p} does not hold a dict")
    return state


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The eval history saved with a checkpoint (`[]` when it has none)."""
    d = _checkpoint_dir(path)
    info = read_checkpoint_info(d)
    name = checkpoint_files(info).get("history")
    if name is None or not (d / name).exists():
        return []
    p = _verify_file(d, "history", info)
    history = _read_json_or_none(p)
    if not isinstance(history, list):
        raise CheckpointError(f"corrupted checkpoint: {p} does not hold a JSON list")
    return history


def default_model() -> tuple[GPT, Tokenizer]:
    """The embedded Shakespeare model; until one is shipped, a random `tiny` model (with a note)."""
    if (DEFAULT_MODEL_DIR / META_NAME).exists():
        model, tokenizer, _ = load_checkpoint(DEFAULT_MODEL_DIR)
        return model, tokenizer
    import sys

    print("gptfast: no embedded model shipped yet; using a randomly initialised 'tiny' model",
          file=sys.stderr)
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny")).eval(), default_tokenizer()
