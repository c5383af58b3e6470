"""The single-writer lock: ``flock`` on a separate lock file beside the state file.

The lock is on its own file because ``os.replace`` swaps the state file's inode on every save. ``flock``
belongs to an open file description, so a second manager in the same process is refused exactly like one
in another process, and the kernel frees the lock when the holder dies (kill -9 included). The holder
writes ``pid host`` into the file so a refused writer can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from posstate import _fileops as fs
from posstate._errors import PersistenceError, StateLockedError


def read_holder(lock_path: Path) -> tuple[int | None, str | None]:
    """The (pid, host) recorded in a lock file, or (None, None) if it cannot be read."""
    try:
        text = fs.read_file(lock_path, 512).decode("utf-8", "replace").split()
        return int(text[0]), text[1] if len(text) > 1 else None
    except (OSError, ValueError, IndexError):
        return None, None


def is_locked(lock_path: Path) -> bool:
    """True if some process holds the writer lock now (a probe that takes and drops a shared lock)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class WriterLock:
    """An exclusive, non-blocking (or bounded-wait) lock; release with :meth:`release` or on process exit."""

    def __init__(self, lock_path: Path, *, state_path: Path, timeout: float = 0.0) -> None:
        self.path = lock_path
        self._fd: int | None = None
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        try:
            fd = fs.open_(lock_path, flags, 0o600)
        except OSError as exc:
            raise PersistenceError(lock_path, operation="open lock file", cause=exc) from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise PersistenceError(lock_path, operation="lock", cause=exc) from exc
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid, host = read_holder(lock_path)
                    raise StateLockedError(state_path, pid=pid, host=host) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self._fd = fd
        try:
            fs.ftruncate(fd, 0)
            fs.write_all_at(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # the holder line is a courtesy for error messages; the flock is what excludes

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
