"""The one way the engine writes a file: a temporary file in the same directory, fsynced, renamed over the
target (``os.replace``), the directory fsynced. A kill at any moment leaves the old file or the new one,
never a part of either."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_save", "atomic_write", "fsync_dir", "fsync_file", "temporary_path"]


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to the disk; a no-op where directories cannot be
    opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def temporary_path(path: str | Path) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to; on leaving, it is fsynced and renamed over ``path``
    (and the directory fsynced); on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with temporary_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def atomic_save(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Atomically write ``path`` with ``write(tmp)``, a writer that takes a path (``torch.save``,
    ``matplotlib``'s ``savefig`` with a format given)."""
    with temporary_path(path) as tmp:
        write(tmp)
