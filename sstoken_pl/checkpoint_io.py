"""``AtomicCheckpointIO``: checkpoints that an interrupted save never corrupts.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and then writes it over the target
path; a crash, a full disk or a kill during that write leaves a truncated file where the previous checkpoint (for
example ``last.ckpt``) was. This plugin writes local checkpoints to a temporary file in the same folder, flushes and
``fsync``s it, and only then renames it over the target (``os.replace``, atomic on POSIX and Windows), so the target
is always either the old checkpoint or the new one, whole. It also streams ``torch.save`` straight to the file, with
no in-memory copy of the checkpoint. Remote paths (``s3://``, ...) are left to ``TorchCheckpointIO``.

The CLI uses it by default. In a Lightning project of your own::

    trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: temporary file in the same folder, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)  # the rename itself survives a power loss


def _fsync_dir(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
