"""Files written whole or not at all: the one way the machinery (and every writer of a run folder) writes.

The new file is written next to its target (same folder, so the final rename never becomes a copy across
file systems), flushed and fsynced, then renamed into place; it is never written through a link at its name.
On Linux it is written unnamed (`O_TMPFILE`) and only gets a name once complete, so a kill mid-write leaves
nothing behind; elsewhere it is written under a hidden temporary name that the next run removes
(`remove_stale_temporaries`). With `keep_previous` the file it replaces is kept as `<name>.prev<suffix>`
(e.g. `last.prev.ckpt`) until the next write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], keep_previous: bool = False) -> Path:
    """`write(file)` into a new file that takes the name `path` once complete (see the module's docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    keep = (lambda: _keep_previous(path)) if keep_previous else (lambda: None)
    try:
        if not _write_unnamed(write, path.parent, tmp, before_naming=keep):
            tmp.unlink(missing_ok=True)  # a leftover of a killed write (or a planted link): never written through
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                _write_whole(write, f)
            keep()
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """`data` (text as UTF-8) written to `path` whole (`write_atomic`)."""
    return write_atomic(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def previous_path(path: str | os.PathLike) -> Path:
    """Where the file replaced by a save of `path` is kept: `last.ckpt` -> `last.prev.ckpt`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed saves left in `folder`; returns them."""
    stale = sorted(Path(folder).glob(f".*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _keep_previous(path: Path) -> None:
    """Keep the file at `path`, if any, as `previous_path(path)` (a hard link, or a copy)."""
    if path.exists():
        keep = _temporary_path(previous_path(path))
        try:
            os.link(path, keep)
        except OSError:  # no hard links on this file system
            shutil.copy2(path, keep)
        os.replace(keep, previous_path(path))


def _write_whole(write: Callable[[BinaryIO], None], file: BinaryIO) -> None:
    write(file)
    file.flush()
    os.fsync(file.fileno())


def _write_unnamed(
    write: Callable[[BinaryIO], None], folder: Path, name: Path, before_naming: Callable[[], None]
) -> bool:
    """`write(file)` into an unnamed file of `folder` that gets the name `name` once complete (and
    `before_naming` has run). False where the file system cannot do that (no `O_TMPFILE`, or no link
    from /proc)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return False
    try:
        fd = os.open(folder, flag | os.O_WRONLY, 0o644)
    except OSError:
        return False
    with os.fdopen(fd, "wb") as f:
        _write_whole(write, f)
        before_naming()  # so that the name exists only for the instant until it replaces the target
        try:
            # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: Python uses it only with a src_dir_fd
            proc_fds = os.open("/proc/self/fd", os.O_RDONLY)
            try:
                os.link(str(f.fileno()), name, src_dir_fd=proc_fds, follow_symlinks=True)
            finally:
                os.close(proc_fds)
        except OSError:
            return False
    return True
