"""Atomic file writes: a temp file in the same directory, fsync, then `os.replace`.

A crash (or kill -9) at any point leaves either the previous file or the new one, never a truncated file.
"""
import contextlib
import os
from pathlib import Path
import tempfile
import typing as tp

import torch


@contextlib.contextmanager
def atomic_write(path: tp.Union[str, Path], mode: str = 'wb') -> tp.Iterator[tp.IO]:
    """Open a temp file next to `path`; on success fsync it and atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: tp.Any, path: tp.Union[str, Path]) -> None:
    """`torch.save` through `atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_text(text: str, path: tp.Union[str, Path]) -> None:
    with atomic_write(path, 'w') as f:
        f.write(text)
