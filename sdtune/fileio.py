"""Writing files so that a crash or a kill never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SdtuneError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed and renamed onto `path`.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one,
    never a partial one. On failure the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as error:
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(path)) from error  # name the file, not its temporary
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ensure_writable_folder(folder: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Create `folder` if needed and check, before any work starts, that a file can be written in it
    and that `needed_bytes` are free there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise SdtuneError(f"cannot write to output folder {folder}: {error.strerror or error}") from None
    if free < needed_bytes:
        raise SdtuneError(
            f"output folder {folder} has {free / 2**20:.1f} MB free; this run needs about {needed_bytes / 2**20:.1f} MB"
        )
    return folder
