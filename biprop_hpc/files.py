"""Atomic file replacement for checkpoints, archives and manifests.

`replace_atomically(path, write)` calls `write(tmp_path)`, flushes the temporary file to stable storage
(fsync), renames it over `path` and fsyncs the directory, so that a crash or a killed job leaves either the
old complete file or the new complete file, never a torn one, also on parallel file systems that reorder
metadata and data writes (Lustre, GPFS, NFS).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. a directory that cannot be opened on this file system: nothing to flush through it
    try:
        with contextlib.suppress(OSError):  # some file systems do not support fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(tmp)`; on any error the old file stays and the temporary one is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync(path.parent, directory=True)
    return path
