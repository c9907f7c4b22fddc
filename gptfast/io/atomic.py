"""Crash-safe writes: the one place gptfast replaces a file or renames a directory.

    write_file_atomic(path, lambda tmp: tmp.write_text(...))   # a file, replaced whole or not at all
    rename_atomic(src, dst)                                     # os.replace + fsync of dst's directory

The rule (POSIX rename semantics; see e.g. "Files are hard", Dan Luu, and LWN "ext4 and data
loss"): write a temporary file of ours in the same directory (a rename cannot cross filesystems),
fsync it, rename it over the target, then fsync the directory so that the rename itself survives a
power loss. A reader sees the old file or the new one, never a mix; a failure removes the
temporary and leaves the old file as it was. Only files whose name starts with `TMP_PREFIX` are
ever created beside the target.

Used by gptfast.io.checkpoint (our checkpoints), gptfast.io.hf (save_pretrained), gptfast.gguf,
gptfast.data (the token cache) and gptfast.train (the loss plot).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".gptfast-tmp-"


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory (its entries: a rename, a new file). A no-op where directories cannot be
    opened (Windows) or fsynced (some network filesystems)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unlink_quiet(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tmp_path_for(path: str | os.PathLike, token: str | None = None) -> Path:
    """A temporary name of ours beside `path` (keeps `path`'s suffix, e.g. for matplotlib)."""
    path = Path(path).absolute()
    return path.parent / f"{TMP_PREFIX}{token or secrets.token_hex(6)}-{path.name}"


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Replace one file crash-safely without touching anything else in its directory: `write(tmp)`
    fills a temporary file of ours beside it, which is fsynced and renamed over `path`; the
    directory is then fsynced. The file keeps the mode of the one it replaces (new: 0666 - umask).
    On any failure (also KeyboardInterrupt) the temporary is removed and `path` is unchanged.
    Returns the absolute path."""
    path = Path(path).absolute()
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(path.parent)
    return path


def rename_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`os.replace(src, dst)` (a file or a directory, same filesystem), then fsync `dst`'s parent
    directory so that the rename is durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).absolute().parent)


__all__ = ["TMP_PREFIX", "fsync_dir", "fsync_file", "rename_atomic", "write_file_atomic"]
