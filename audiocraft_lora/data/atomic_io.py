"""Atomic file writes: write a temporary file in the same folder, fsync it, then replace the target."""
import os
from pathlib import Path
import tempfile
import typing as tp


def write_bytes_atomic(path: tp.Union[str, Path], data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    Args:
        path (str or Path): Destination file; its parent folders are created.
        data (bytes): Content to write.
    Returns:
        Path: The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def write_text_atomic(path: tp.Union[str, Path], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode('utf-8'))


def temporary_sibling(path: tp.Union[str, Path]) -> Path:
    """A fresh temporary path in the folder of `path`, with the same suffix (audio writers pick the format from it).

    The caller writes it and then `os.replace`s it onto `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.stem}.', suffix=f'.tmp{path.suffix}', dir=str(path.parent))
    os.close(fd)
    return Path(tmp_name)
