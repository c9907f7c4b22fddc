"""Text loading, token caching and batching for training gptfast models.

* :func:`load_text` / :func:`encode_file` turn a UTF-8 text file into a 1-D numpy array of
  token ids; BPE ids are cached on disk as a raw ``uint16`` ``.bin`` file (the format of
  nanoGPT's ``prepare.py``) plus a small JSON meta that says which text and tokenizer
  produced it.
* :func:`train_val_split` splits ids into the first 90 % / last 10 % (as nanoGPT).
* :class:`BatchSampler` draws random ``(x, y)`` blocks for next-token prediction, like
  nanoGPT's ``get_batch``, but from its own seeded ``torch.Generator`` whose state can be
  saved and restored for exact training resume.
* :class:`SlidingWindowDataset` / :func:`create_dataloader` give the deterministic
  sliding-window view of "Build a Large Language Model (From Scratch)" (``GPTDatasetV1``,
  ``create_dataloader_v1``), used for evaluation / epoch-style training.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizers import CharTokenizer, Tokenizer
from gptfast.errors import InputError, MissingFileError
from gptfast.io.atomic import write_file_atomic

__all__ = [
    "load_text",
    "encode_file",
    "cache_paths",
    "train_val_split",
    "BatchSampler",
    "SlidingWindowDataset",
    "create_dataloader",
]

IdsLike = Sequence[int] | np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------
# Text files and the token cache
# --------------------------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"text file not found: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"expected a text file, got a directory: {path}")
    return path.read_bytes()


def _decode_text(data: bytes, path: str | os.PathLike) -> str:
    if not data:
        raise InputError(f"text file is empty: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"text file is not valid UTF-8: {path} ({e})") from e


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: the file is empty or not valid UTF-8.
    """
    return _decode_text(_read_bytes(path), path)


def _user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gptfast/data`` (``~/.cache/gptfast/data`` when unset), following the
    XDG base-directory spec: an empty or relative XDG_CACHE_HOME is ignored."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "gptfast" / "data"


def _dir_is_writable(d: Path) -> bool:
    """Whether we may create files in ``d`` (an existing directory). Only a fast first
    guess: writes still catch OSError (e.g. a read-only mount, or running as root where
    permission bits do not apply to os.access)."""
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def _tokenizer_tag(tokenizer: Tokenizer) -> str:
    """Short, filename-safe id of a tokenizer, so caches of different tokenizers coexist."""
    desc = tokenizer.to_dict()
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:10]
    kind = "".join(c for c in str(desc.get("type", "tok")) if c.isalnum()) or "tok"
    return f"{kind}-{digest}"


def cache_paths(path: str | os.PathLike, tokenizer: Tokenizer,
                cache_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(bin_path, meta_path)`` of the token cache of text file ``path`` in ``cache_dir``.

    Next to the text file the names are ``<name>.<tok>.bin`` / ``.json``; in any other
    directory (a shared cache dir) a hash of the text file's absolute path is added so two
    ``input.txt`` from different folders do not evict each other.
    """
    path = Path(path).resolve()
    cache_dir = Path(cache_dir).resolve()
    stem = f"{path.name}.{_tokenizer_tag(tokenizer)}"
    if cache_dir != path.parent:
        stem += "." + hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json"


def _read_cache(bin_path: Path, meta_path: Path, sha256: str, tok_dict: dict) -> np.ndarray | None:
    """Return the cached ids if the meta matches this text + tokenizer, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if (not isinstance(meta, dict) or meta.get("sha256") != sha256
                or meta.get("tokenizer") != tok_dict or meta.get("dtype") != "uint16"):
            return None
        ids = np.fromfile(bin_path, dtype=np.uint16)
    except (OSError, ValueError):  # missing / unreadable / corrupt JSON: rebuild
        return None
    # A truncated .bin (e.g. disk full during an old non-atomic copy) must not be trusted.
    if ids.shape[0] != meta.get("num_tokens"):
        return None
    return ids


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (gptfast.io.atomic): readers see the old file or the
    new one, never a partial write."""
    write_file_atomic(dest, lambda tmp: tmp.write_bytes(data))


def _write_cache(bin_path: Path, meta_path: Path, ids: np.ndarray, meta: dict) -> None:
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    # Data first, meta last: the meta acts as the commit record, so a crash in between
    # leaves a meta that does not describe the new .bin only if both came from the same
    # text + tokenizer (identical content) -- otherwise sha256/num_tokens mismatch.
    _atomic_write_bytes(bin_path, ids.astype(np.uint16, copy=False).tobytes())
    _atomic_write_bytes(meta_path, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def encode_file(path: str | os.PathLike, tokenizer: Tokenizer,
                cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Tokenize a UTF-8 text file.

    Returns:
        1-D ``numpy.ndarray`` of token ids, shape ``(num_tokens,)``, dtype ``uint16`` when
        the vocabulary fits in 16 bits (``vocab_size <= 65536``, e.g. GPT-2's 50257 and any
        char vocabulary), else ``int64``. Cast with ``.astype(np.int64)`` before arithmetic.

    Caching (BPE tokenizers, i.e. anything but :class:`CharTokenizer`, whose encoding is a
    dict lookup and as fast as reading a cache): the ids are stored as raw ``uint16`` in
    ``<text>.<tokenizer>.bin`` with a JSON meta ``{"sha256", "tokenizer", "num_tokens",
    "dtype"}``. The cache is reused when the sha256 of the text bytes and the tokenizer's
    ``to_dict()`` match, and rebuilt otherwise.

    Args:
        cache_dir: where to keep the cache. Default: next to the text file if that
            directory is writable, else ``$XDG_CACHE_HOME/gptfast/data``
            (``~/.cache/gptfast/data``). If no location is writable the ids are returned
            uncached with a warning.
    """
    data = _read_bytes(path)
    text = _decode_text(data, path)
    fits_uint16 = tokenizer.vocab_size <= 2**16
    out_dtype = np.uint16 if fits_uint16 else np.int64

    if isinstance(tokenizer, CharTokenizer) or not fits_uint16:
        return np.asarray(tokenizer.encode(text), dtype=out_dtype)

    sha256 = hashlib.sha256(data).hexdigest()
    tok_dict = tokenizer.to_dict()
    if cache_dir is not None:
        read_dirs = write_dirs = [Path(cache_dir)]
    else:
        text_dir = Path(path).resolve().parent
        user_dir = _user_cache_dir()
        # Always look next to the file first (a cache shipped with read-only data is still
        # valid), but only write there when we can.
        read_dirs = [text_dir, user_dir]
        write_dirs = [text_dir, user_dir] if _dir_is_writable(text_dir) else [user_dir]

    for d in read_dirs:
        cached = _read_cache(*cache_paths(path, tokenizer, d), sha256, tok_dict)
        if cached is not None:
            return cached

    ids_list = tokenizer.encode(text)
    ids = np.asarray(ids_list, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**16):
        raise InputError(f"encode_file: token ids outside [0, 65536) from {tokenizer!r}; cannot cache as uint16")
    ids = ids.astype(np.uint16)
    meta = {"sha256": sha256, "tokenizer": tok_dict, "num_tokens": int(ids.shape[0]), "dtype": "uint16"}

    errors = []
    for d in write_dirs:
        try:
            _write_cache(*cache_paths(path, tokenizer, d), ids, meta)
            break
        except OSError as e:  # read-only filesystem, permissions, disk full: try the next one
            errors.append(f"{d}: {e}")
    else:
        if cache_dir is not None:
            raise OSError(f"encode_file: cannot write the token cache to {cache_dir}: {errors[0]}")
        warnings.warn(f"encode_file: no writable cache location for {path} ({'; '.join(errors)}); "
                      "returning uncached token ids", RuntimeWarning, stacklevel=2)
    return ids


# --------------------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------------------


def _as_1d_array(ids: IdsLike, name: str) -> np.ndarray:
    """View ``ids`` as a 1-D integer numpy array without copying when possible (numpy arrays
    and memmaps pass through, keeping their compact dtype; tensors are moved to CPU)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size == 0:
        arr = arr.astype(np.int64)
    return arr


def train_val_split(ids: IdsLike, train_frac: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Split ids into the first ``train_frac`` and the remaining tokens (nanoGPT's split:
    contiguous, not shuffled, so no validation text leaks into training windows).

    Returns ``(train, val)`` 1-D arrays (views of the input when it is a numpy array);
    ``len(train) == int(len(ids) * train_frac)``.
    """
    if not 0.0 < train_frac < 1.0:
        raise InputError(f"train_frac must be in (0, 1), got {train_frac}")
    arr = _as_1d_array(ids, "ids")
    n = int(len(arr) * train_frac)
    return arr[:n], arr[n:]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class BatchSampler:
    """Random contiguous blocks of tokens for next-token prediction (nanoGPT's ``get_batch``).

    ``get_batch(split)`` returns ``(x, y)``: int64 tensors of shape
    ``(batch_size, block_size)`` on ``device`` with ``y[:, t] == x[:, t + 1]`` for
    ``t < block_size - 1`` -- ``y`` is ``x`` shifted one token left, i.e. the target for
    each position. Block starts are uniform over ``[0, len(ids) - block_size)`` (every start
    whose target block still fits), drawn from one ``torch.Generator`` shared by both splits.

    Args:
        train_ids, val_ids: 1-D token ids (numpy array / memmap, tensor or list). Kept in
            their compact dtype (e.g. uint16); only the sampled blocks are cast to int64.
        block_size: context length T (> 0). batch_size: B (> 0).
        device: where the returned tensors live.
        generator: a CPU ``torch.Generator`` to draw offsets from (used as is, not copied).
        seed: seed for a fresh generator (mutually exclusive with ``generator``). With
            neither, the generator is seeded nondeterministically.
    """

    SPLITS = ("train", "val")

    def __init__(self, train_ids: IdsLike, val_ids: IdsLike, block_size: int, batch_size: int,
                 device: str | torch.device = "cpu", generator: torch.Generator | None = None,
                 seed: int | None = None):
        self.block_size = _check_positive_int("block_size", block_size)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.data = {"train": _as_1d_array(train_ids, "train_ids"), "val": _as_1d_array(val_ids, "val_ids")}
        for split, arr in self.data.items():
            if len(arr) <= self.block_size:
                raise InputError(
                    f"the {split} split has {len(arr)} tokens, too few for one block of "
                    f"block_size={self.block_size} (need at least {self.block_size + 1}: "
                    "the inputs plus one shifted target)"
                )
        self.device = torch.device(device)
        if generator is not None and seed is not None:
            raise InputError("pass either generator or seed to BatchSampler, not both")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        elif generator.device.type != "cpu":
            raise InputError(f"BatchSampler needs a CPU torch.Generator, got one on {generator.device}")
        self.generator = generator
        # Offsets 0..block_size inclusive: one extra column gives the shifted targets.
        self._window = np.arange(self.block_size + 1, dtype=np.int64)

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a batch from ``split`` ("train" or "val").

        Returns:
            x, y: ``torch.int64`` tensors of shape ``(batch_size, block_size)`` on
            ``self.device``; ``y`` is ``x`` shifted left by one token.
        """
        if split not in self.SPLITS:
            raise InputError(f"split must be 'train' or 'val', got {split!r}")
        data = self.data[split]
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=self.generator)
        # One fancy-index gather of (B, T+1) tokens: touches only the sampled windows, which
        # matters when `data` is a memmap of a large corpus.
        chunk = data[starts.numpy()[:, None] + self._window[None, :]]
        chunk = torch.from_numpy(chunk.astype(np.int64, copy=False))
        x, y = chunk[:, :-1], chunk[:, 1:]
        if self.device.type == "cuda":
            # Pinned memory + non_blocking lets the host->device copy overlap with compute
            # (as in nanoGPT's get_batch).
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        else:
            x, y = x.contiguous(), y.contiguous()
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor) for checkpointing; restore it with
        :meth:`load_state_dict` to continue the exact same sequence of batches."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "generator" not in state:
            raise InputError("BatchSampler.load_state_dict: expected a dict with a 'generator' key "
                             "(from BatchSampler.state_dict())")
        gen_state = state["generator"]
        if not isinstance(gen_state, torch.Tensor):  # e.g. after a JSON round trip as a list
            gen_state = torch.tensor(gen_state, dtype=torch.uint8)
        self.generator.set_state(gen_state.to(device="cpu", dtype=torch.uint8))


# --------------------------------------------------------------------------------------
# Sliding-window dataset ("Build a Large Language Model (From Scratch)", GPTDatasetV1)
# --------------------------------------------------------------------------------------


class SlidingWindowDataset(Dataset):
    """Fixed windows over a token sequence, as GPTDatasetV1 in Raschka's "Build a Large
    Language Model (From Scratch)" (ch. 2), computed lazily instead of materialised.

    Sample ``i`` starts at ``s = i * stride`` for ``s in range(0, len(ids) - max_length,
    stride)`` and is ``(ids[s : s + max_length], ids[s + 1 : s + max_length + 1])`` -- two
    int64 tensors of shape ``(max_length,)``. ``stride == max_length`` gives
    non-overlapping windows; a smaller stride overlaps them.
    """

    def __init__(self, ids: IdsLike, max_length: int, stride: int):
        self.max_length = _check_positive_int("max_length", max_length)
        self.stride = _check_positive_int("stride", stride)
        arr = _as_1d_array(ids, "ids")
        if len(arr) <= self.max_length:
            raise InputError(
                f"SlidingWindowDataset: {len(arr)} tokens are too few for one sample of "
                f"max_length={self.max_length} (need at least {self.max_length + 1})"
            )
        self.ids = torch.from_numpy(arr.astype(np.int64))
        # len(range(0, n - max_length, stride)) == ceil((n - max_length) / stride)
        self._len = len(range(0, len(arr) - self.max_length, self.stride))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"SlidingWindowDataset index out of range (len {self._len})")
        s = i * self.stride
        # Views into the shared id tensor (the DataLoader's collate copies them anyway).
        return self.ids[s:s + self.max_length], self.ids[s + 1:s + self.max_length + 1]


def create_dataloader(ids: IdsLike, batch_size: int, max_length: int, stride: int,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      generator: torch.Generator | None = None) -> DataLoader:
    """DataLoader over a :class:`SlidingWindowDataset` (the book's ``create_dataloader_v1``,
    taking token ids instead of raw text). Batches are ``(x, y)`` int64 tensors of shape
    ``(batch_size, max_length)``. Pass ``generator`` for a reproducible shuffle order."""
    batch_size = _check_positive_int("batch_size", batch_size)
    dataset = SlidingWindowDataset(ids, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
