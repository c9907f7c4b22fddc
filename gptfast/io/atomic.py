"""Crash-safe writes: the one place gptfast replaces a file or renames a directory.

    write_file_atomic(path, lambda tmp: tmp.write_text(...))   # a file, replaced whole or not at all
    rename_atomic(src, dst)                                     # os.replace + fsync of dst's directory

The rule (POSIX rename semantics; see e.g. "Files are hard", Dan Luu, and LWN "ext4 and data
loss"): write a temporary file of ours in the same directory (a rename cannot cross filesystems),
fsync it, rename it over the target, then fsync the directory so that the rename itself survives a
power loss. A reader sees the old file or the new one, never a mix; a failure removes the
temporary and leaves the old file as it was. Only entries whose name starts with `TMP_PREFIX` are
ever created beside the target.

Used by gptfast.io.checkpoint (our checkpoints), gptfast.io.hf (save_pretrained), gptfast.gguf,
gptfast.data (the token cache) and gptfast.train (the loss plot).
"""

from __future__ import annotations

import os
import secrets
import shutil
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


def write_in_own_dir(tmp: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Run `write(p)` inside a directory of ours, then move its file to `tmp` (a name of ours).

    For writers that make their own temporary file beside the path they are given and rename it:
    safetensors >= 0.7's `save_file` writes `.tmpXXXXXX` (Rust's `tempfile` crate) in the
    target's directory. A process killed meanwhile would leave that name, which nothing can tell
    from a user's file, in the user's directory. Here it can only land in `<tmp>.d/`, which
    starts with `TMP_PREFIX` and is removed on success or failure (and by the checkpoint's
    journal recovery after a kill). Returns `tmp`."""
    tmp = Path(tmp)
    own = tmp.parent / f"{tmp.name}.d"
    own.mkdir()
    try:
        write(own / tmp.name)
        os.replace(own / tmp.name, tmp)
    finally:
        shutil.rmtree(own, ignore_errors=True)
    return tmp


def remove_own(path: str | os.PathLike) -> None:
    """Remove a temporary entry of ours (a file, or a directory made by `write_in_own_dir`).
    Refuses names without `TMP_PREFIX`; a symlink is unlinked, never followed."""
    path = Path(path)
    if not path.name.startswith(TMP_PREFIX):
        raise ValueError(f"remove_own: {path} is not a temporary of gptfast's (prefix {TMP_PREFIX!r})")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        unlink_quiet(path)


def rename_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`os.replace(src, dst)` (a file or a directory, same filesystem), then fsync `dst`'s parent
    directory so that the rename is durable."""
    os.replace(src, dst)
    fsync_dir(Path(dst).absolute().parent)


__all__ = ["TMP_PREFIX", "fsync_dir", "fsync_file", "remove_own", "rename_atomic", "write_file_atomic", "write_in_own_dir"]
