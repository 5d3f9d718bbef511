"""Checkpoint writes that a kill, a full disk or a lost node cannot tear: Lightning's checkpoint IO writing
through `files.write_atomic`, the file a save replaces kept as `<name>.prev<suffix>` (e.g. `last.prev.ckpt`)
until the next save, so there is always a complete previous state.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dynamixer.errors import CheckpointWriteError
from dynamixer.machinery.files import previous_path, write_atomic

log = logging.getLogger(__name__)
# a write that fails for want of room or permission: the user's to fix, the previous checkpoint intact
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    """`torch.save(obj, file)`; a failed write raises its `OSError`."""
    writes = _Writes(file)
    try:
        torch.save(obj, writes)
        file.flush()
    except RuntimeError:
        if writes.error is None:
            raise
        raise writes.error from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, complete or not at all, keeping the replaced file as `previous_path(path)`."""
    write_atomic(path, lambda f: _save(obj, f), keep_previous=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO for our checkpoints. A save is complete or not there (`atomic_torch_save`), the
    previous checkpoint of the same name staying until the new one is complete, and carries `run_id`, the run
    it belongs to (`dynamixer.machinery.run_folder`). A load goes through our one reader
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
