"""Writing files so that a crash or a kill never leaves a half-written one."""

from __future__ import annotations

import contextlib
import json
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


def human_bytes(n: float) -> str:
    """A size as people read it: 512 B, 3.2 MB, 1.4 TB (units of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike, missing: str | None = None, damaged: str = "not valid JSON"):
    """The JSON in `path`; a one-line error when it is damaged, and when it is missing, `missing`
    (or None returned when no message is given)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is None:
            return None
        raise SdtuneError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SdtuneError(f"{path}: {damaged} ({error})") from None


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


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically, with the same bytes for the same tensors and metadata.

    safetensors writes the metadata in hash-map order, which changes from process to process; the
    header is rewritten with the metadata keys sorted, so equal adapters are equal files.
    """
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_safetensors_metadata(tmp)


def _sort_safetensors_metadata(path: Path) -> None:
    import json
    import shutil
    import struct

    with open(path, "rb+") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the usual case: same length, rewrite in place (padding with spaces is allowed)
            handle.seek(8)
            handle.write(text + b" " * (length - len(text)))
            return
        padded = text + b" " * (-len(text) % 8)
        with open(path.with_name(path.name + ".header"), "wb") as out:
            out.write(struct.pack("<Q", len(padded)) + padded)
            shutil.copyfileobj(handle, out, 1 << 24)
    os.replace(path.with_name(path.name + ".header"), path)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or unlink inside `path` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under `root`, then every directory, so a rename of `root` publishes complete files."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_directory(path)
    fsync_directory(root)


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike, replace: bool = True) -> None:
    """Flush `staging` and rename it to `final`; readers see the old `final` or the complete new one.

    An existing `final` is first renamed aside and removed afterwards, so a crash in between leaves
    either name complete or absent, never half-written. With `replace=False` a `final` that holds
    anything is kept and the rename fails with an OSError (an empty one is replaced).
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    aside = None
    if replace and final.exists():
        aside = final.with_name(f".{final.name}.replaced")
        remove_directory(aside)
        os.replace(final, aside)
    os.replace(staging, final)
    fsync_directory(final.parent)
    if aside is not None:
        remove_directory(aside)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a directory tree by renaming it to a hidden name first, so it never lingers half-deleted."""
    import shutil

    path = Path(path)
    if not path.exists():
        return
    doomed = path if path.name.startswith(".") else path.with_name(f".{path.name}.deleting")
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        fsync_directory(path.parent)
    shutil.rmtree(doomed)


def check_folder_free(output: Path) -> None:
    """Refuse an `--output` folder that exists and is not empty."""
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise SdtuneError(f"--output {output} already exists; give a new folder (or remove it)")


def write_folder(output: Path, fill) -> Path:
    """Build a folder with `fill(tmp)` beside `output`, then rename it onto `output` (absent or empty)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    check_folder_free(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        fill(tmp)
        publish_directory(tmp, output, replace=False)  # an empty `output` is replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------
# One run per output folder

LOCK_FILE = ".sdtune.lock"


class OutputLock:
    """An exclusive lock on an output folder, held for a whole run.

    The lock is `flock` on `FOLDER/.sdtune.lock`, which the kernel releases when its process dies
    (even by SIGKILL), so the lock of a killed run is taken over at once. The file holds the
    holder's pid and host for the refusal message. Where the file system has no `flock`, the pid is
    checked instead: a lock whose process no longer runs on this host is taken over.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        from .errors import SdtuneError

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = not _try_flock(fd)
            except OSError:  # no flock here (some network file systems): fall back to the pid
                held = _holder_alive(_read_holder(fd))
            if held:
                holder = _read_holder(fd)
                os.close(fd)
                who = f"pid {holder[0]} on {holder[1]}" if holder else "another process"
                raise SdtuneError(
                    f"output folder {self.folder} is in use by another sdtune run ({who}); "
                    f"wait for it to finish or choose another --output"
                )
            try:  # the holder may have removed the file between our open and lock: retry on the new one
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {_hostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # removed while still held, so no one can lock the old file meanwhile
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_flock(fd: int) -> bool:
    """True when the exclusive lock was taken, False when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _read_holder(fd: int) -> tuple[int, str] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    fields = os.read(fd, 256).decode(errors="replace").split()
    try:
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (IndexError, ValueError):
        return None


def _holder_alive(holder: tuple[int, str] | None) -> bool:
    if holder is None:
        return False
    pid, host = holder
    if host and host != _hostname():
        return True  # cannot check a process on another machine: assume it runs
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
