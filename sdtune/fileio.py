"""Writing files so that a crash or a kill never leaves a half-written one, nor a temporary one for long.

Every file is written to a hidden temporary beside it, `.NAME.PID.XXXXXXXX.tmp`, and renamed onto
`NAME`; every folder is built as `.NAME.PID.XXXXXXXX.tmp/` and renamed. A kill can leave such a
temporary: each command sweeps those of the files it writes when it starts (`sweep_temporaries`),
once it holds the lock of the folder or file it writes (`OutputLock`), so a temporary older than the
lock is a dead command's. Files get the mode the umask gives (as `open` does), not the 0600 of
`tempfile`. A write that fails names the file, and a full disk says how much room is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import SdtuneError, TrainingFailed, shell_word

TEMP_SUFFIX = ".tmp"
HEADER_SUFFIX = ".header"  # the rewritten safetensors header's temporary (`save_safetensors`)
# what a full disk (or quota) looks like, through Python, safetensors' Rust writer or torch's zip writer
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFull(TrainingFailed):
    """A write failed for want of room: exit code 1, naming the file and the room left."""


# ---------------------------------------------------------------------------------------------
# Modes, temporaries and write failures


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open` (0666) or `mkdir` (0777) would give a new file or folder under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def temp_prefix(name: str) -> str:
    """The start of a temporary's name for the file or folder `name`: hidden, with the writer's pid."""
    return f".{name}.{os.getpid()}."


def temp_path(path: Path) -> Path:
    """A new temporary's name beside `path` (not yet created): a caller holds the name before the file
    exists, so an interrupt right after its creation still finds it to remove."""
    import secrets

    return path.with_name(f"{temp_prefix(path.name)}{secrets.token_hex(4)}{TEMP_SUFFIX}")


def make_temp_file(tmp: Path) -> Path:
    """Create the temporary file `tmp` (from `temp_path`), empty, with the mode the umask gives."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # open() applies the umask
    os.close(fd)
    return tmp


def make_temp_folder(tmp: Path) -> Path:
    """Create the temporary folder `tmp` (from `temp_path`), with the mode the umask gives."""
    tmp.mkdir(0o777)
    return tmp


def temporary_target(name: str) -> str | None:
    """The file or folder name a temporary named `name` was for (`.adapter.safetensors.123.ab_c9xyz.tmp`
    is adapter.safetensors's), also for names without the pid that older versions wrote; None when
    `name` is not a temporary."""
    if not name.startswith("."):
        return None
    stem = name[1:]
    for suffix in (TEMP_SUFFIX + HEADER_SUFFIX, TEMP_SUFFIX):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        return None
    target, dot, _random = stem.rpartition(".")
    if not dot or not target:
        return None
    head, dot, pid = target.rpartition(".")
    return head if dot and head and pid.isdigit() else target


def sweep_temporaries(folder: str | os.PathLike, owns: Callable[[str], bool], older_than: float) -> list[Path]:
    """Remove the temporaries in `folder` (files and folders) of the names `owns` accepts that were last
    written before `older_than` (the time the caller's lock was taken): a killed command's. Returns
    what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        target = temporary_target(path.name)
        if target is None or not owns(target):
            continue
        try:
            if path.lstat().st_mtime >= older_than:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # swept next time
        removed.append(path)
    return removed


def sweep_dead_temporaries(folder: str | os.PathLike, owns: Callable[[str], bool], legacy_age: float = 86400.0) -> list[Path]:
    """Remove the temporaries in a folder that several commands share without a lock (sdtune's cache):
    those whose writer (the pid in their name) no longer runs, and unnamed ones older than `legacy_age` seconds."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    stale_before = time.time() - legacy_age
    dead = []
    for path in entries:
        target = temporary_target(path.name)
        if target is None or not owns(target):
            continue
        pid = temporary_pid(path.name)
        try:
            gone = _pid_gone(pid) if pid is not None else path.lstat().st_mtime < stale_before
        except OSError:
            continue
        if gone:
            dead.append(path)
    for path in dead:
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return dead


def temporary_pid(name: str) -> int | None:
    """The writer's pid in a temporary's name, if it has one."""
    target = temporary_target(name)
    if target is None:
        return None
    rest = name[1 + len(target) :].split(".")
    return int(rest[1]) if len(rest) > 3 and rest[1].isdigit() else None


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_disk_full(error: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether `error` is a write that failed for want of room. torch's zip writer does not say why it
    failed: a failure that is not an OSError counts when `folder` has (almost) no room left."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    if any(marker in text for marker in DISK_FULL_TEXTS):
        return True
    if folder is not None and not isinstance(error, OSError):  # torch's writer: "file write failed", "iostream error", ...
        return free_bytes(folder) < 2**20
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def human_size(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def disk_full(path: str | os.PathLike) -> DiskFull:
    """The one-line error of a write to `path` that found the disk full."""
    path = Path(path)
    return DiskFull(f"{path}: No space left on device ({human_size(free_bytes(path.parent))} free in {path.parent})")


@contextlib.contextmanager
def failures_named(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a failed write into a one-line error naming `path` (not a temporary): a full disk with the
    room left, any other OSError with its reason."""
    path = Path(path)
    try:
        yield
    except SdtuneError:
        raise
    except Exception as error:
        if is_disk_full(error, folder if folder is not None else path.parent):
            raise disk_full(path) from None
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed and renamed onto `path`.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one,
    never a partial one. On failure (or an interrupt) the temporary file is removed and `path` is
    untouched; a kill -9 leaves it for the next command's sweep.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with failures_named(path):
            make_temp_file(tmp)
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fchmod(handle.fileno(), default_mode())  # some writers (safetensors) make their file 0600
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + HEADER_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`source`'s bytes as `target`, written atomically (`atomic_write`)."""
    with atomic_write(target) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def written_together(paths: list[Path]) -> Iterator[None]:
    """The files of one output (a LoRA, its summary, its token file), written in the block: an interrupt or a
    failure once one of them has changed removes them all, so none is left without the others (each file alone is
    written atomically; the set is not). Before the first changes, earlier files stay as they were."""

    def state(path: Path) -> tuple | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    before = [state(path) for path in paths]
    try:
        yield
    except BaseException:
        if [state(path) for path in paths] != before:
            for path in paths:
                path.unlink(missing_ok=True)
        raise


def counted(count: int, noun: str) -> str:
    """`1 image`, `2 images`, `1,000 steps`: the count and its noun, singular for one."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


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


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file where `folder` or one of its parents should be a folder, if any (mkdir's own error,
    "File exists" or "Not a directory", does not say which)."""
    for path in [Path(folder), *Path(folder).parents]:
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def check_no_file_in_the_way(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any work and without creating anything, a `folder` that a file stands in the way of."""
    blocker = file_in_the_way(folder)
    if blocker:
        raise SdtuneError(f"cannot write to {what} {folder}: {blocker} is a file, not a folder")


def ensure_writable_folder(folder: str | os.PathLike, needed_bytes: int = 0, what: str | None = None) -> Path:
    """Create `folder` if needed and check, before any work starts, that a file can be written in it
    and that `needed_bytes` are free there. `what` names the output in the message (default: the folder)."""
    folder = Path(folder)
    what = what or f"output folder {folder}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as error:
        target = f"to {what}" if what.startswith("output folder") else what
        blocker = file_in_the_way(folder)
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror or error
        raise SdtuneError(f"cannot write {target}: {reason}") from None
    if free < needed_bytes:
        raise SdtuneError(f"{what} has {free / 2**20:.1f} MB free; this run needs about {needed_bytes / 2**20:.1f} MB")
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
        with open(path.with_name(path.name + HEADER_SUFFIX), "wb") as out:
            out.write(struct.pack("<Q", len(padded)) + padded)
            shutil.copyfileobj(handle, out, 1 << 24)
    os.replace(path.with_name(path.name + HEADER_SUFFIX), path)


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


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes the umask gives new files and folders (writers
    such as safetensors make their files 0600, tempfile its folders 0700)."""
    root = Path(root)
    file_mode, folder_mode = default_mode(), default_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, folder_mode if path.is_dir() else file_mode)


def publish_once(final: Path, fill: Callable[[Path], None]) -> None:
    """`fill(staging)` a new folder, then publish it as `final`, unless another process published `final`
    first (then its copy stays and this one is dropped)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(final)
    try:
        fill(staging)
        try:
            publish_directory(staging, final, replace=False)
        except OSError:
            pass  # another process published it first
    finally:
        if staging.exists():
            remove_directory(staging)


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike, replace: bool = True) -> None:
    """Flush `staging` and rename it to `final`; readers see the old `final` or the complete new one.
    Its files and folders get the modes the umask gives.

    An existing `final` is first renamed aside (to a temporary name the next sweep recognises) and
    removed afterwards, so a crash in between leaves either name complete or absent, never
    half-written. With `replace=False` a `final` that holds anything is kept and the rename fails
    with an OSError (an empty one is replaced).
    """
    staging, final = Path(staging), Path(final)
    apply_default_modes(staging)
    fsync_tree(staging)
    aside = None
    if replace and final.exists():
        aside = final.with_name(f"{temp_prefix(final.name)}replaced{TEMP_SUFFIX}")
        remove_directory(aside)
        os.replace(final, aside)
    os.replace(staging, final)
    fsync_directory(final.parent)
    if aside is not None:
        remove_directory(aside)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a directory tree by renaming it to a hidden temporary name first, so it never lingers
    half-deleted under its own name (a kill leaves it to the next sweep)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    doomed = path if path.name.startswith(".") else path.with_name(f"{temp_prefix(path.name)}deleting{TEMP_SUFFIX}")
    if doomed != path:
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        fsync_directory(path.parent)
    shutil.rmtree(doomed)


def check_output_target(output: str | os.PathLike, sources: list[str | os.PathLike], overwrite: bool = False) -> Path:
    """Refuse an `--output` that is, or holds, one of the files the command reads (whatever
    `overwrite` says), and one that exists unless `overwrite` is given (an empty folder is free)."""
    output = Path(output)
    resolved = output.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise SdtuneError(f"--output {shell_word(output)} is where the input {source} is; write to another path")
    if not overwrite and output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise SdtuneError(f"--output {shell_word(output)} already exists; give a new path, or --overwrite to replace it")
    return output


def check_folder_free(output: Path) -> None:
    """Refuse an `--output` folder that exists and is not empty."""
    check_output_target(output, [])


def write_folder(output: Path, fill, overwrite: bool = False) -> Path:
    """Build a folder with `fill(tmp)` beside `output`, then rename it onto `output` (absent or empty,
    or replaced with `overwrite`). A write that finds the disk full names `output` and the room left."""
    output.parent.mkdir(parents=True, exist_ok=True)
    check_output_target(output, [], overwrite)
    tmp = temp_path(output)
    try:
        with failures_named(output, folder=output.parent):
            make_temp_folder(tmp)
            fill(tmp)
            publish_directory(tmp, output, replace=overwrite)  # an empty `output` is replaced anyway
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------
# One command per output

LOCK_FILE = ".sdtune.lock"
# the locks this process holds, for `release_held_locks`
HELD_LOCKS: set["OutputLock"] = set()


def file_lock_name(name: str) -> str:
    """The lock file of a single output file (an export) or folder built beside it (a merge)."""
    return f".{name}.sdtune.lock"


LOCK_POLL_SECONDS = 0.1  # how often a lock that waits (`OutputLock.wait`) tries again


class LockHeld(SdtuneError):
    """Another process holds the lock (past the wait, where the lock waits); `holder` names it."""

    holder = "another process"


class OutputLock:
    """An exclusive lock on an output folder (or, with `name`, on one output in it), held for a whole command.

    The lock is `flock` on `FOLDER/.sdtune.lock`, which the kernel releases when its process dies
    (even by SIGKILL), so the lock of a killed command is taken over at once. The file holds the
    holder's pid and host for the refusal message. Where the file system has no `flock`, the pid is
    checked instead: a lock whose process no longer runs on this host is taken over. `acquired_at`
    (the lock file's modification time) tells the holder's temporaries from those a killed command
    left before it. `wait`: seconds to wait for a holder to let go (writers taking turns) before refusing.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_FILE, what: str | None = None, wait: float = 0.0):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or f"output folder {self.folder}"
        self.wait = wait
        self.acquired_at = 0.0
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        fd = None
        deadline = time.monotonic() + self.wait
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
                try:
                    held = not _try_flock(fd)
                except OSError:  # no flock here (some network file systems): fall back to the pid
                    held = holder_alive(read_holder(fd))
                if held:
                    holder = read_holder(fd)
                    os.close(fd)
                    fd = None
                    if time.monotonic() < deadline:
                        time.sleep(LOCK_POLL_SECONDS)
                        continue
                    who = f"pid {holder[0]} on {holder[1]}" if holder else "another process"
                    waited = f" for over {self.wait:g} s" if self.wait else ""
                    refusal = LockHeld(f"{self.what} is in use by another sdtune run ({who}){waited}; "
                                       f"wait for it to finish or choose another --output")
                    refusal.holder = who
                    raise refusal
                if self._is_ours(fd):  # else the holder removed the file between our open and lock: retry on the new one
                    break
                os.close(fd)
                fd = None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {_hostname()}\n".encode())
            os.fsync(fd)
            # the file system's clock, as the temporaries' times are: theirs are older, or this holder's
            self.acquired_at = os.fstat(fd).st_mtime
            self._fd = fd
            HELD_LOCKS.add(self)
            return self
        except BaseException:  # an interrupt mid-way: leave no lock file behind, as `release` would not be called
            if fd is not None:
                with contextlib.suppress(OSError):
                    # flock again: ours already, or free (the interrupt came before we took it), or another's
                    if _try_flock(fd) and self._is_ours(fd):
                        self.path.unlink()  # no one else can hold or remove it while our flock holds
                self._fd = None
                HELD_LOCKS.discard(self)
                os.close(fd)
            raise

    def _is_ours(self, fd: int) -> bool:
        """Whether `fd` is the file at the lock's path (not one a holder removed after we opened it)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def sweep(self, owns: Callable[[str], bool], folder: str | os.PathLike | None = None) -> list[Path]:
        """Remove the temporaries of the names `owns` accepts that a killed command left in `folder`
        (default: the locked folder): those written before this lock was taken."""
        return sweep_temporaries(self.folder if folder is None else folder, owns, self.acquired_at)

    def release(self) -> None:
        if self._fd is None:
            return
        fd = self._fd
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # removed while still held, so no one can lock the old file meanwhile
        self._fd = None
        os.close(fd)
        HELD_LOCKS.discard(self)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def release_held_locks() -> None:
    """Release every lock this process still holds: what the CLI does once SIGINT or SIGTERM has ended a command, as
    the interrupt may have come as a lock was being released (its `finally`), where nothing would release it again."""
    for lock in list(HELD_LOCKS):
        with contextlib.suppress(OSError):
            lock.release()


@contextlib.contextmanager
def output_file_lock(output: str | os.PathLike) -> Iterator[OutputLock]:
    """Hold the lock of one output (a file, or a folder built beside it and renamed onto it) once its
    folder is known to be writable, after sweeping the temporaries a killed command left of it.
    `sdtune export` and `sdtune merge` write this way."""
    output = Path(output)
    ensure_writable_folder(output.parent, what=f"--output {shell_word(output)}")
    with OutputLock(output.parent, file_lock_name(output.name), what=f"--output {shell_word(output)}") as lock:
        lock.sweep(lambda name: name == output.name)
        yield lock


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


def read_holder(fd: int) -> tuple[int, str] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    fields = os.read(fd, 256).decode(errors="replace").split()
    try:
        return int(fields[0]), fields[1] if len(fields) > 1 else ""
    except (IndexError, ValueError):
        return None


def holder_alive(holder: tuple[int, str] | None) -> bool:
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
