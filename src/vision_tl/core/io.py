"""File helpers every command reads and writes through.

- A file is written whole or not at all (`atomic_write`): a temporary file beside the
  target, in the target's own folder (so on the same filesystem), flushed, fsynced and
  renamed over it. A full disk or a kill midway leaves the previous file as it was and no
  temporary behind, and the error names the target, not the temporary.
- A file is read only when it is a regular file within a byte limit (`open_regular`): a
  named pipe, a device such as `/dev/zero` or a folder is refused before a byte is read,
  and so is a multi-gigabyte file named `.jpg`.
- A name with any bytes in it can be written (`printable`): `os.walk` gives names that are
  not UTF-8 as `str` with surrogate escapes, which no UTF-8 text file accepts; they are
  written with the undecodable bytes as `\\xNN`, and the real path is kept for reading.
- A JSON file is read tolerantly (`read_json`): missing, half-written or damaged is None.
- Work that several jobs may start at once is claimed with a file (`claim`), not a lock:
  it works on file systems without `flock` (Lustre without its mount option, some NFS),
  and the claim of a job that died is broken once it goes stale.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# No file larger than this is read as an image unless the command says otherwise
# (`data.max_file_bytes`): an 89-megapixel photo is far smaller.
DEFAULT_MAX_FILE_BYTES = 2**30
_CHUNK = 2**20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class RefusedFile(ValueError):
    """A file that is not read at all: not a regular file, or larger than the byte limit."""


def printable(text: str) -> str:
    """`text` as UTF-8 can hold it: undecodable bytes of a file name (surrogate escapes)
    become `\\xNN`; any other text is returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_regular(path: str | Path, info: os.stat_result, max_bytes: int | None) -> None:
    """Raise `RefusedFile` unless `info` is a regular file of at most `max_bytes`."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((words for test, words in _KINDS if test(info.st_mode)), "a special file")
        raise RefusedFile(f"not a regular file: {kind}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise RefusedFile(
            f"larger than data.max_file_bytes={max_bytes} ({info.st_size} bytes, not read)"
        )


def open_regular(path: str | Path, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> IO[bytes]:
    """Open `path` for reading when it is a regular file of at most `max_bytes`, else raise
    `RefusedFile`, before anything is read. The file is checked by name, then opened
    without blocking (a pipe swapped in meanwhile cannot hang the open) and checked again
    by the descriptor, so the file read is the file checked."""
    check_regular(path, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(path, os.fstat(fd), max_bytes)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(handle: IO[bytes], max_bytes: int | None) -> bytes:
    """The rest of `handle`, refused when longer than `max_bytes` (a file that grew since
    it was checked): never more than `max_bytes` + 1 bytes are read, and no buffer larger
    than the file is asked for."""
    try:
        expected = os.fstat(handle.fileno()).st_size - handle.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):
        expected = _CHUNK
    return _read_to_limit(handle.read, expected, max_bytes)


def read_regular(
    path: str | Path, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES
) -> tuple[bytes, os.stat_result]:
    """The whole of `path` and its status (from the descriptor read), under `open_regular`'s
    checks, through the descriptor alone: no file object, so reading many small files
    costs less than half of `open_regular` + `read_limited` (10 against 22 us a 1 KB file)."""
    check_regular(path, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        check_regular(path, info, max_bytes)
        return _read_to_limit(functools.partial(os.read, fd), info.st_size, max_bytes), info
    finally:
        os.close(fd)


def _read_to_limit(read: Callable[[int], bytes], expected: int, max_bytes: int | None) -> bytes:
    """Everything `read` gives, `expected` bytes asked for first; `RefusedFile` past
    `max_bytes` (never more than `max_bytes` + 1 bytes are read)."""
    limit = sys.maxsize - 1 if max_bytes is None else max_bytes
    parts = [read(max(0, min(expected, limit)) + 1)]
    total = len(parts[0])
    while parts[-1] and total <= limit:  # it grew since it was checked
        parts.append(read(min(_CHUNK, limit + 1 - total)))
        total += len(parts[-1])
    if total > limit:
        raise RefusedFile(f"larger than data.max_file_bytes={max_bytes} (read no further)")
    return parts[0] if len(parts) == 1 else b"".join(parts)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Write `path` through a temporary file beside it, renamed over it only when the
    block ends without an error (after flush and fsync). On any error, a full disk or a
    signal included, the temporary is removed, `path` keeps its previous content, and an
    OS error names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # Created with the usual permissions (umask applies), unlike mkstemp's 0600.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o666)
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename != str(path):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically; undecodable bytes of file names in it become `\\xNN`."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(printable(text))


def write_json(path: str | Path, data: Any) -> None:
    """Write atomically: a reader never sees half a file, a full disk keeps the old one."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(frame: Any, path: str | Path, **to_csv: Any) -> None:
    """`frame.to_csv(path, **to_csv)` (a pandas DataFrame), atomically, with every text
    cell and column name `printable`: a file name with any bytes in it is a row, not a
    crash halfway through the file."""
    frame = frame.rename(columns=lambda c: printable(c) if isinstance(c, str) else c)
    for column in frame.columns:
        if frame[column].dtype.kind not in "biufcmM":  # text (object or str), not numbers
            frame[column] = frame[column].map(lambda v: printable(v) if isinstance(v, str) else v)
    buffer = io.StringIO()
    frame.to_csv(buffer, **to_csv)
    write_text(path, buffer.getvalue())


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object's content, or None when the file is missing, half-written (a job
    still running), damaged or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive POSIX lock on the file `path` for the block (waiting for it): one
    process at a time, and a lock that dies with its process."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic renames still keep each file whole
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# A claim not refreshed for this long belongs to a process that died: it may be broken.
CLAIM_STALE_S = 120.0


def _claim_age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def claim(
    path: str | Path, stale_after: float = CLAIM_STALE_S, poll: float = 0.2
) -> Iterator[None]:
    """Hold the claim file `path` for the block, waiting while another process holds it.

    The claim is created with `O_EXCL` (atomic on local and network file systems, no
    `flock` needed) and its mtime refreshed every `stale_after / 4` s by a thread while the
    block runs. A claim not refreshed for `stale_after` s is broken: renamed away first,
    so of two processes that find it stale only one breaks it. The block's caller checks,
    once it holds the claim, whether another process finished the work meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(4)}\n"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = _claim_age(path)
            if age is not None and age > stale_after:
                aside = path.with_name(f"{path.name}.stale.{secrets.token_hex(4)}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)
                    os.unlink(aside)
            else:
                time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        break
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(stale_after / 4):
            with contextlib.suppress(OSError):
                os.utime(path)

    beat = threading.Thread(target=refresh, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            if path.read_text() == token:  # still ours: not broken as stale meanwhile
                path.unlink()
