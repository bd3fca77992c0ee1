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
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
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


def write_bytes_atomic(path: tp.Union[str, Path], data: bytes) -> Path:
    """Write `data` to `path` atomically; readers see the old file or the complete new one. Returns `path`."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: tp.Union[str, Path], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode('utf-8'))


def temporary_sibling(path: tp.Union[str, Path]) -> Path:
    """A fresh temporary path next to `path`, with the same suffix (audio writers pick the format from it).

    The caller writes it and then `os.replace`s it onto `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.stem}.', suffix=f'.tmp{path.suffix}', dir=str(path.parent))
    os.close(fd)
    return Path(tmp_name)
