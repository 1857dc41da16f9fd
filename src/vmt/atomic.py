"""Files replaced whole: a reader sees the old file or the new one, never half of one.

The caches and corpora vmt writes (music rolls, memory-mapped corpora, feature caches, the
MEP benchmark's LM rows) go through :func:`atomic_path` or :func:`atomic_write`: the content is written to a
temporary file beside the target and renamed over it with ``os.replace`` (atomic on POSIX and
Windows); on any error the temporary file is removed and the target is untouched. Checkpoints
are folders, made atomic by renaming a finished folder (:mod:`vmt.checkpoint`), and use
:func:`fsync_dir` from here to make the rename durable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "fsync_dir"]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``target`` (same folder, so the rename stays atomic)
    for code that writes by file name; it replaces ``target`` when the block ends cleanly
    and is removed otherwise. The folder must exist."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_write(target: str | Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO[Any]]:
    """An open temporary file (``mode`` ``"wb"`` or ``"w"``) that replaces ``target`` when the
    block ends cleanly. With ``fsync`` its content reaches the disk before the rename."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode) as handle:
        yield handle
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(target: str | Path, data: bytes, fsync: bool = False) -> None:
    """Replace ``target`` by ``data`` whole (:func:`atomic_write`)."""
    with atomic_write(target, "wb", fsync=fsync) as handle:
        handle.write(data)


def fsync_dir(folder: str | Path) -> None:
    """Make the renames inside ``folder`` durable (best effort: a no-op where folders cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
