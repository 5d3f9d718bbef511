"""Checkpoint writes that a kill, a full disk or a lost node cannot tear.

The new file is written next to its target (same folder, so the final rename never becomes a copy across
file systems), flushed and fsynced, then renamed into place; the file it replaces is kept as
`<name>.prev<suffix>` (e.g. `last.prev.ckpt`) until the next save, so there is always a complete
previous state. On Linux the file is written unnamed (`O_TMPFILE`) and only gets a name once complete,
so a kill mid-write leaves nothing behind; elsewhere it is written under a hidden temporary name that
the next run removes (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dynamixer.errors import CheckpointWriteError

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"
# a write that fails for want of room or permission: the user's to fix, the previous checkpoint intact
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


class _Writes:
    """A file object for `torch.save` that keeps the `OSError` of a failed write: torch's zip writer turns
    it into a `RuntimeError` without its errno ("unexpected pos ..."), and a full disk must be told apart."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(obj: Any, file: Any) -> None:
    """`torch.save(obj, file)`, flushed and fsynced; a failed write raises its `OSError`."""
    writes = _Writes(file)
    try:
        torch.save(obj, writes)
        file.flush()
    except RuntimeError:
        if writes.error is None:
            raise
        raise writes.error from None
    os.fsync(file.fileno())


def _write_unnamed(obj: Any, folder: Path, name: Path, before_naming: Callable[[], None]) -> bool:
    """`torch.save(obj)` into an unnamed file of `folder` that gets the name `name` once complete (and
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
        _save(obj, f)
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, complete or not at all, keeping the replaced file as `previous_path(path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        if not _write_unnamed(obj, path.parent, tmp, before_naming=lambda: _keep_previous(path)):
            with open(tmp, "wb") as f:
                _save(obj, f)
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO for our checkpoints. A save is complete or not there (`atomic_torch_save`), the
    previous checkpoint of the same name staying until the new one is complete, and carries `run_id`, the run
    it belongs to (`dynamixer.run.run_folder`). A load goes through our one reader
    (`dynamixer.checkpoint_reader`, given as `reader`); `resumed=(path, checkpoint)`, already read by it, is
    not read again. A
    removal removes only a file of a folder this IO has saved into, never a folder or a URL (the paths to
    remove come from the callbacks' state, which came from a file)."""

    def __init__(
        self,
        run_id: str | None = None,
        resumed: tuple[str, dict[str, Any]] | None = None,
        reader: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.run_id, self._resumed, self._read = run_id, resumed, reader
        self._folders: set[Path] = set()

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        if self._resumed is not None and str(path) == self._resumed[0]:
            checkpoint, self._resumed = self._resumed[1], None
            return checkpoint
        if self._read is None:
            raise RuntimeError(f"{type(self).__name__} was given no reader of checkpoints: it cannot load {path}")
        return self._read(str(path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        self._folders.add(Path(path).parent.resolve())
        if self.run_id is not None:
            checkpoint = {**checkpoint, "run_id": self.run_id}
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as err:
            if err.errno not in _FULL:
                raise
            reason = err.strerror
            kept = f"the previous {Path(path).name} is intact" if Path(path).exists() else "no earlier one exists"
            raise CheckpointWriteError(
                f"cannot write the checkpoint {path} ({reason}); {kept}. Free space in its folder (or set "
                "paths.log_dir to a disk with room), then resume with ckpt_path=auto"
            ) from None

    def remove_checkpoint(self, path: Any) -> None:
        target = Path(str(path))
        try:
            ours = "://" not in str(path) and "::" not in str(path) and target.parent.resolve() in self._folders
            ours = ours and not stat.S_ISDIR(os.lstat(target).st_mode)
        except (OSError, RuntimeError, ValueError):
            ours = False
        if not ours:
            log.warning("not removing %s: no checkpoint file this run saved", str(path)[:300])
            return
        target.unlink(missing_ok=True)
        previous_path(target).unlink(missing_ok=True)
