"""A recording, fault-injecting file-operations backend (the idea of SQLite's test VFS).

:class:`HarnessOps` subclasses :class:`posstate.storage.fileops.FileOps`; install it with
``with posstate.storage.fileops.use(ops):``. It records every operation (name, path, sizes, offsets, and optionally the
bytes written) and can, at the *k*-th counted operation, raise a chosen ``OSError`` (once, or every time
after), perform a short write, skip the call (turn it into a no-op: used to prove that each fsync
matters), or kill the process with SIGKILL before or after the call. ``posstate doctor`` and
``benchmarks/reliability.py`` use it, so it lives in the library; it never touches anything unless a fault
is armed.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from posstate.storage.fileops import DEFAULT_MAX_READ_BYTES, FileOps, StrPath

#: Operations that change something on disk (or that a crash between them can expose).
MUTATING: frozenset[str] = frozenset(
    {"open", "write", "fsync", "fdatasync", "close", "ftruncate", "replace", "link", "unlink", "fsync_dir", "mkdir"}
)
#: Mutating operations plus whole-file reads (a read can fail with EIO too).
MUTATING_AND_READS: frozenset[str] = MUTATING | {"read_file", "pread"}
#: The errors the fault tests inject, by name.
ERRNOS: dict[str, int] = {
    "ENOSPC": _errno.ENOSPC,
    "EIO": _errno.EIO,
    "EROFS": _errno.EROFS,
    "EDQUOT": _errno.EDQUOT,
    "EINTR": _errno.EINTR,
}

Action = Literal["raise", "short", "skip", "crash_before", "crash_after"]


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do at the *at*-th counted operation (1-based) among the operations named in *ops*.

    ``persistent=True`` repeats the fault at every counted operation after it (a disk that stays full);
    for ``short`` that means every later write writes nothing (write_all then reports ENOSPC).
    """

    at: int
    action: Action = "raise"
    errno: int = _errno.EIO
    persistent: bool = False
    ops: frozenset[str] = MUTATING_AND_READS


@dataclass(frozen=True, slots=True)
class Op:
    """One recorded operation. ``size`` is bytes written/read; ``offset`` the file offset of a write."""

    index: int
    name: str
    path: str | None = None
    dst: str | None = None
    size: int | None = None
    offset: int | None = None
    flags: int | None = None
    fd: int | None = None
    data: bytes | None = None
    faulted: str | None = None  # the action taken at this op, if any
    error: int | None = None  # errno of a real OSError the operating system raised (ENOENT, EEXIST...)
    thread: str = ""  # name of the thread that made it (the background compaction's: "posstate-compact-...")


@dataclass(slots=True)
class _FdInfo:
    path: str
    offset: int = 0
    append: bool = False  # O_APPEND: every write goes to the end of the file (recorded with offset None)


@dataclass
class HarnessOps(FileOps):
    """Record every operation; apply *fault* at its counted operation. Thread-safe recording.

    ``keep_data=True`` keeps the bytes of every write (the power-loss replay needs them). ``counting``
    can be switched off and on to count only the operations of one save.
    """

    fault: Fault | None = None
    keep_data: bool = False
    counting: bool = True
    #: Threads (by name) whose operations pass through unrecorded and uncounted. By default the background
    #: backup thread (issue 14.2): a save's or an update's recording is the caller's work, in a fixed order;
    #: the backup's own operations have their own crash and fault tests (set this to frozenset() there).
    ignore_threads: frozenset[str] = frozenset({"posstate-backup"})
    ops: list[Op] = field(default_factory=list)
    counted: int = 0
    fired: int = 0
    #: Count and record only the operations of threads whose name starts with this (e.g. "posstate-compact",
    #: the background compaction of issue 14); None: every thread.
    thread_prefix: str | None = None
    #: Leave out the operations of threads whose name starts with this (the caller's operations only).
    skip_thread_prefix: str | None = None
    #: Record them, but never count them (a power-loss replay needs every write; faults hit the caller's).
    uncounted_thread_prefix: str | None = None

    def _mine(self) -> bool:
        name = threading.current_thread().name
        if name in self.ignore_threads:
            return False
        if self.skip_thread_prefix is not None and name.startswith(self.skip_thread_prefix):
            return False
        return self.thread_prefix is None or name.startswith(self.thread_prefix)

    _fds: dict[int, _FdInfo] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ bookkeeping
    def _decide(self, name: str) -> Action | None:
        """Count *name* if it is counted; return the fault action to take now, if any."""
        f = self.fault
        if not self._mine():
            return None
        if self.uncounted_thread_prefix is not None and threading.current_thread().name.startswith(self.uncounted_thread_prefix):
            # Never counted; failed too once a persistent fault has started (a disk that stays broken).
            if f is not None and f.persistent and name in f.ops and self.counting and self.counted >= f.at:
                with self._lock:
                    self.fired += 1
                return f.action
            return None
        with self._lock:
            if not self.counting or f is None or name not in f.ops:
                return None
            self.counted += 1
            hit = self.counted == f.at or (f.persistent and self.counted > f.at)
            if hit:
                self.fired += 1
                return f.action
            return None

    def _record(self, name: str, action: Action | None = None, **kw: object) -> None:
        if not self._mine():
            return
        with self._lock:
            self.ops.append(Op(index=len(self.ops), name=name, faulted=action, thread=threading.current_thread().name, **kw))  # type: ignore[arg-type]

    def _error(self, name: str, path: object) -> OSError:
        assert self.fault is not None
        code = self.fault.errno
        return OSError(code, f"injected {_errno.errorcode.get(code, code)} at {name}", str(path) if path is not None else None)

    def _before(self, name: str, path: object, **kw: object) -> Action | None:
        """Apply the pre-call part of a fault. Returns the action still to apply after the call."""
        action = self._decide(name)
        if action is None:
            return None
        if action == "crash_before":
            crash()
        if action == "raise":
            self._record(name, action, path=str(path) if path is not None else None, **kw)
            raise self._error(name, path)
        return action

    def _after(self, action: Action | None) -> None:
        if action == "crash_after":
            crash()

    def path_of(self, fd: int) -> str | None:
        info = self._fds.get(fd)
        return info.path if info else None

    def open_files(self) -> dict[int, tuple[str, bool]]:
        """Descriptors opened through this backend and still open: fd -> (path, opened with O_APPEND)."""
        with self._lock:
            return {fd: (info.path, info.append) for fd, info in self._fds.items()}

    def named(self, names: Iterable[str]) -> list[Op]:
        wanted = set(names)
        return [op for op in self.ops if op.name in wanted]

    # ------------------------------------------------------------------ operations
    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        action = self._before("open", path, flags=flags)
        if action == "skip":
            raise self._error("open", path)  # an open cannot be skipped; treat as a failure
        try:
            fd = super().open(path, flags, mode)
        except OSError as exc:
            self._record("open", action, path=str(path), flags=flags, error=exc.errno)
            raise
        self._fds[fd] = _FdInfo(str(path), append=bool(flags & os.O_APPEND))
        self._record("open", action, path=str(path), flags=flags, fd=fd)
        self._after(action)
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        info = self._fds.get(fd)
        offset = info.offset if info and not info.append else None
        n = self._write(fd, data, offset, lambda chunk: FileOps.write(self, fd, chunk))
        if info:
            info.offset += n
        return n

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Counted and recorded as a ``write`` (with its offset), so every fault matrix over writes covers
        positioned writes too (the journal's records)."""
        return self._write(fd, data, offset, lambda chunk: FileOps.pwrite(self, fd, chunk, offset))

    def _write(self, fd: int, data: bytes | memoryview, offset: int | None, call: Callable[[bytes], int]) -> int:
        path = self.path_of(fd)
        action = self._before("write", path, fd=fd, size=len(data), offset=offset)
        chunk = bytes(data)
        if action == "short":
            first = self.fault is not None and self.counted == self.fault.at
            chunk = chunk[: len(chunk) // 2] if first else b""
        n = len(chunk) if action == "skip" or not chunk else call(chunk)
        self._record("write", action, path=path, fd=fd, size=n, offset=offset, data=chunk[:n] if self.keep_data else None)
        self._after(action)
        return n

    def _simple(self, name: str, fd: int, call: str) -> None:
        path = self.path_of(fd)
        action = self._before(name, path, fd=fd)
        if action != "skip":
            getattr(super(), call)(fd)
        self._record(name, action, path=path, fd=fd)
        self._after(action)

    def fsync(self, fd: int) -> None:
        self._simple("fsync", fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._simple("fdatasync", fd, "fdatasync")

    def close(self, fd: int) -> None:
        path = self.path_of(fd)
        action = self._before("close", path, fd=fd)
        # A close always releases the descriptor (as on Linux, even when it reports an error).
        self._fds.pop(fd, None)
        super().close(fd)
        self._record("close", action, path=path, fd=fd)
        self._after(action)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        action = self._before("pread", self.path_of(fd), fd=fd, size=size, offset=offset)
        out = super().pread(fd, size, offset)
        self._record("pread", action, path=self.path_of(fd), fd=fd, size=len(out), offset=offset)
        self._after(action)
        return out

    def ftruncate(self, fd: int, size: int) -> None:
        action = self._before("ftruncate", self.path_of(fd), fd=fd, size=size)
        if action != "skip":
            super().ftruncate(fd, size)
        self._record("ftruncate", action, path=self.path_of(fd), fd=fd, size=size)
        self._after(action)

    def _two(self, name: str, src: StrPath, dst: StrPath) -> None:
        action = self._before(name, src, dst=str(dst))
        if action == "skip":
            raise self._error(name, src)  # a rename cannot be skipped silently; treat as a failure
        getattr(super(), name)(src, dst)
        self._record(name, action, path=str(src), dst=str(dst))
        self._after(action)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        self._two("replace", src, dst)

    def link(self, src: StrPath, dst: StrPath) -> None:
        self._two("link", src, dst)

    def unlink(self, path: StrPath) -> None:
        action = self._before("unlink", path)
        if action != "skip":
            super().unlink(path)
        self._record("unlink", action, path=str(path))
        self._after(action)

    def fsync_dir(self, path: StrPath) -> None:
        action = self._before("fsync_dir", path)
        if action != "skip":
            super().fsync_dir(path)
        self._record("fsync_dir", action, path=str(path))
        self._after(action)

    def read_file(self, path: StrPath, limit: int | None = None, max_size: int | None = DEFAULT_MAX_READ_BYTES) -> bytes:
        action = self._before("read_file", path)
        try:
            out = super().read_file(path, limit, max_size)
        except OSError as exc:
            self._record("read_file", action, path=str(path), error=exc.errno)
            raise
        self._record("read_file", action, path=str(path), size=len(out))
        self._after(action)
        return out

    def mkdir(self, path: StrPath, mode: int = 0o700) -> None:
        action = self._before("mkdir", path)
        super().mkdir(path, mode)
        self._record("mkdir", action, path=str(path))
        self._after(action)


def crash() -> None:
    """Die now, the way kill -9 or a power cut ends a process: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover - SIGKILL cannot be caught


__all__ = ["ERRNOS", "MUTATING", "MUTATING_AND_READS", "Action", "Fault", "HarnessOps", "Op", "crash"]


def _copy_if_present(src: str, dst: str) -> None:
    # Renamed or removed while the tree was copied (a temp of a background backup): not in the image.
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(src, dst)


def copy_tree(src: StrPath, dst: StrPath, **kw: object) -> None:
    """``shutil.copytree`` of a directory a live manager may be writing (its background backup thread makes and
    removes temps): a file that vanishes between the listing and the copy is simply not in the copy, as if
    the image had been taken a moment later for that file."""
    shutil.copytree(src, dst, copy_function=_copy_if_present, **kw)  # type: ignore[arg-type]
