"""Every file-system call posstate makes goes through this module.

Higher layers call the module-level functions below; they delegate to the active :class:`FileOps`
backend. Tests and the reliability harness swap the backend (see :func:`use`) to record each operation,
inject an ``OSError`` at operation *k*, or crash the process there, the way SQLite's test VFS does.
Nothing here knows about JSON, encryption or positions: it moves bytes and names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

#: Flags for a new file that must not exist yet and must not be a symlink.
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: Flags for reading a file without following a symlink planted in its place.
O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: Largest file read_file reads unless the caller gives its own cap (state files: see codec.max_file_bytes).
DEFAULT_MAX_READ_BYTES = 1024**3
#: os.fdatasync where the platform has it (Linux), else os.fsync; looked up once, not per sync.
_os_fdatasync = getattr(os, "fdatasync", os.fsync)


class NotRegularFileError(OSError):
    """A path holds a directory, FIFO, socket or device: posstate reads and replaces regular files only."""

    def __init__(self, path: StrPath, kind: str) -> None:
        super().__init__(errno.EISDIR if kind == "a directory" else errno.EINVAL, f"is {kind}, not a regular file", str(path))
        self.kind = kind


class FileTooLargeError(OSError):
    """A file is larger than the reader's cap; refused from its size, before any byte is read."""

    def __init__(self, path: StrPath, size: int, cap: int) -> None:
        super().__init__(errno.EFBIG, f"is {size} bytes, over the {cap}-byte cap", str(path))
        self.size = size
        self.cap = cap


def file_kind(mode: int) -> str:
    """What a file of st_mode *mode* is, in words for an error message."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


class FileOps:
    """The real operating system. Each method is one system call (or one read of a whole file)."""

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        _os_fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        os.replace(src, dst)

    def link(self, src: StrPath, dst: StrPath) -> None:
        os.link(src, dst, follow_symlinks=False)

    def unlink(self, path: StrPath) -> None:
        os.unlink(path)

    def fsync_dir(self, path: StrPath) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: StrPath, limit: int | None = None, max_size: int | None = DEFAULT_MAX_READ_BYTES) -> bytes:
        """The bytes of a regular file (at most *limit* of them). Anything else is NotRegularFileError before a
        byte is read, and a file over *max_size* bytes FileTooLargeError: opened with O_NONBLOCK, so a FIFO
        never blocks the open, then checked with fstat (the file opened, not a name that could change)."""
        try:
            fd = os.open(path, O_READ | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: a socket (it cannot be opened at all)
                raise
            raise NotRegularFileError(path, file_kind(os.lstat(path).st_mode)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(path, file_kind(st.st_mode))
            if max_size is not None and st.st_size > max_size:
                raise FileTooLargeError(path, st.st_size, max_size)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            want = st.st_size if limit is None else min(st.st_size, limit)
            chunks: list[bytes] = []
            got = 0
            while got < want:
                chunk = os.read(fd, want - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def mkdir(self, path: StrPath, mode: int = 0o700) -> None:
        os.mkdir(path, mode)

    def listdir(self, path: StrPath) -> list[str]:
        return os.listdir(path)

    def rmdir(self, path: StrPath) -> None:
        os.rmdir(path)

    def lstat(self, path: StrPath) -> os.stat_result:
        return os.lstat(path)

    def stat(self, path: StrPath) -> os.stat_result:
        return os.stat(path)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)


_active: FileOps = FileOps()
_swap_lock = threading.Lock()


def backend() -> FileOps:
    """The backend in use."""
    return _active


@contextlib.contextmanager
def use(ops: FileOps) -> Iterator[FileOps]:
    """Route every file operation through *ops* inside the ``with`` block (tests, harness, doctor)."""
    global _active
    with _swap_lock:
        previous, _active = _active, ops
    try:
        yield ops
    finally:
        with _swap_lock:
            _active = previous


def open_(path: StrPath, flags: int, mode: int = 0o600) -> int:
    return _active.open(path, flags, mode)


def write(fd: int, data: bytes | memoryview) -> int:
    return _active.write(fd, data)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte, looping over short writes; a write that makes no progress is ENOSPC."""
    if not data:
        return
    n = _active.write(fd, data)
    if n != len(data):  # rare: the usual case is one call, no memoryview
        _finish(lambda view, _at: _active.write(fd, view), data, n, 0)


def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
    """One ``pwrite`` call: returns how many bytes it wrote; a call that raises wrote nothing."""
    return _active.pwrite(fd, data, offset)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write every byte of *data* at *offset* (the file position is left alone), looping over short writes;
    a write that makes no progress is ENOSPC. The descriptor must not be O_APPEND (Linux would append)."""
    if not data:
        return
    n = _active.pwrite(fd, data, offset)
    if n != len(data):
        _finish(lambda view, at: _active.pwrite(fd, view, at), data, n, offset)


def _finish(write_at: Callable[[memoryview, int], int], data: bytes, n: int, offset: int) -> None:
    """The rest of a write whose first call wrote only *n* bytes (*offset*: where *data* started)."""
    view = memoryview(data)
    while True:
        if n <= 0:
            raise OSError(28, "short write made no progress")
        view, offset = view[n:], offset + n
        if not view:
            return
        n = write_at(view, offset)


#: Callbacks given the seconds each fsync, fdatasync and directory fsync took (``posstate serve``'s
#: histogram). Replaced, never mutated; empty (the usual case) costs one truth test per sync.
_sync_observers: tuple[Callable[[float], object], ...] = ()


def observe_syncs(callback: Callable[[float], object]) -> Callable[[], None]:
    """Call *callback* with the duration of every later sync in this process; returns the function that
    stops it. The callback runs on the syncing thread: it must be quick and must not raise."""
    global _sync_observers
    with _swap_lock:
        _sync_observers = (*_sync_observers, callback)

    def stop() -> None:
        global _sync_observers
        with _swap_lock:
            _sync_observers = tuple(c for c in _sync_observers if c is not callback)

    return stop


def _timed(sync: Callable[[Any], None], arg: Any) -> None:
    started = time.perf_counter()
    try:
        sync(arg)
    finally:
        took = time.perf_counter() - started
        for callback in _sync_observers:
            callback(took)


def fsync(fd: int) -> None:
    if _sync_observers:
        _timed(_active.fsync, fd)
    else:
        _active.fsync(fd)


def fdatasync(fd: int) -> None:
    if _sync_observers:
        _timed(_active.fdatasync, fd)
    else:
        _active.fdatasync(fd)


def close(fd: int) -> None:
    _active.close(fd)


def pread(fd: int, size: int, offset: int) -> bytes:
    return _active.pread(fd, size, offset)


def ftruncate(fd: int, size: int) -> None:
    _active.ftruncate(fd, size)


def replace(src: StrPath, dst: StrPath) -> None:
    _active.replace(src, dst)


def link(src: StrPath, dst: StrPath) -> None:
    _active.link(src, dst)


def unlink(path: StrPath) -> None:
    _active.unlink(path)


def fsync_dir(path: StrPath) -> None:
    if _sync_observers:
        _timed(_active.fsync_dir, path)
    else:
        _active.fsync_dir(path)


def read_file(path: StrPath, limit: int | None = None, max_size: int | None = DEFAULT_MAX_READ_BYTES) -> bytes:
    """A regular file's bytes; NotRegularFileError or FileTooLargeError (both OSError) before reading otherwise."""
    return _active.read_file(path, limit, max_size=max_size)


def mkdir(path: StrPath, mode: int = 0o700) -> None:
    _active.mkdir(path, mode)


def listdir(path: StrPath) -> list[str]:
    return _active.listdir(path)


def rmdir(path: StrPath) -> None:
    _active.rmdir(path)


def lstat(path: StrPath) -> os.stat_result:
    return _active.lstat(path)


def stat_(path: StrPath) -> os.stat_result:
    return _active.stat(path)


def fstat(fd: int) -> os.stat_result:
    return _active.fstat(fd)


def exists(path: StrPath) -> bool:
    """True if a directory entry exists at *path* (a dangling symlink counts: it is not ours to follow)."""
    try:
        _active.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a parent is a file
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # no entry can have that name
            return False
        raise
    return True


def ensure_dir(path: Path) -> None:
    """Create *path* (and parents) with mode 0700 if missing; refuse anything that is not a directory.

    A directory reached through a symlink the operator made is accepted; files are never followed.
    """
    try:
        st = _active.stat(path)
    except FileNotFoundError:
        if path.parent != path:
            ensure_dir(path.parent)
        try:
            _active.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            _active.fsync_dir(path.parent)
        st = _active.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(20, "not a directory", str(path))


def write_all_at(fd: int, data: bytes) -> None:
    """Write *data* at offset 0 of a file opened for read/write (for small bookkeeping files)."""
    os.lseek(fd, 0, os.SEEK_SET)
    write_all(fd, data)


def redirect_to_devnull(fd: int) -> None:
    """Point *fd* at /dev/null (the command line's stdout after its reader closed the pipe: whatever is still
    buffered is discarded instead of failing again at exit). Not routed through the backend: no state file."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
