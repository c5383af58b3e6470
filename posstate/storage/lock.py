"""The single-writer lock: ``flock`` on a separate lock file beside the state file.

The lock is on its own file because ``os.replace`` swaps the state file's inode on every save. ``flock``
belongs to an open file description, so a second manager in the same process is refused exactly like one
in another process, and the kernel frees the lock when the holder dies (kill -9 included). The holder
writes ``pid host`` into the file so a refused writer can name it.

Two ways the lock can stop excluding, both handled here (docs/JOURNAL.md, "One writer"):

* The lock file is removed or replaced while held: the next writer locks a new file at the same path.
  Taking the lock checks, after ``flock``, that the locked file is still the one at the path (device and
  inode; else it retries on the new file), and :meth:`WriterLock.check` lets the holder test it again
  before each write, so the old holder stops writing instead of writing beside the new one.
* ``fork()``: the child shares the open file description, hence the lock. :meth:`WriterLock.release` in
  another process than the one that took the lock only closes its copy of the descriptor (``LOCK_UN``
  would release the parent's lock), and :meth:`WriterLock.check` refuses there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from posstate.core.errors import PersistenceError, StateLockedError
from posstate.storage import fileops as fs


def read_holder(lock_path: Path) -> tuple[int | None, str | None]:
    """The (pid, host) recorded in a lock file, or (None, None) if it cannot be read."""
    try:
        text = fs.read_file(lock_path, 512).decode("utf-8", "replace").split()
        return int(text[0]), text[1] if len(text) > 1 else None
    except (OSError, ValueError, IndexError):
        return None, None


def is_locked(lock_path: Path) -> bool:
    """True if some process holds the writer lock now (a probe that takes and drops a shared lock).

    Never blocks: opened non-blocking (a FIFO planted at the path would block a plain open), and anything
    but a regular file is not a lock a writer can hold (:class:`WriterLock` refuses it), so False."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:  # missing, a symlink (ELOOP), unreadable: nobody holds a lock a writer could take there
        return False
    try:
        if not stat.S_ISREG(fs.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


#: How long taking the lock waits, past its own timeout, when the lock's recorded holder is a dead process of
#: this host: a child it forked holds a copy of the descriptor until its exec() (seconds).
DEAD_HOLDER_GRACE = 2.0
#: How many times taking the lock starts again because the file at the path was replaced meanwhile.
_MAX_REOPENS = 100


class WriterLock:
    """An exclusive, non-blocking (or bounded-wait) lock; release with :meth:`release` or on process exit."""

    def __init__(self, lock_path: Path, *, state_path: Path, timeout: float = 0.0) -> None:
        self.path = lock_path
        self._state_path = state_path
        self._fd: int | None = None
        self._pid = os.getpid()  # the process that holds the lock (a forked child shares the fd, not the lock)
        self._ident: tuple[int, int] = (-1, -1)  # (st_dev, st_ino) of the locked file
        deadline = time.monotonic() + timeout
        for _ in range(_MAX_REOPENS):
            fd = self._open_and_lock(deadline)
            ident = self._locked_file_at_path(fd)
            if ident is not None:
                break
            os.close(fd)  # we locked a file that is no longer at the path: lock the one that is
        else:
            raise StateLockedError(
                state_path,
                pid=None,
                host=None,
                reason=f"the lock file {lock_path} was replaced {_MAX_REOPENS} times while taking the lock",
                next_step="find what keeps removing it (`posstate doctor` names the lock holder) and stop it",
            )
        self._fd, self._ident = fd, ident
        try:
            fs.ftruncate(fd, 0)
            fs.write_all_at(fd, f"{os.getpid()} {_hostname()}\n".encode())
        except OSError:
            pass  # the holder line is a courtesy for error messages; the flock is what excludes

    def _open_and_lock(self, deadline: float) -> int:
        lock_path = self.path
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = fs.open_(lock_path, flags, 0o600)
            regular = stat.S_ISREG(fs.fstat(fd).st_mode)
        except OSError as exc:
            raise PersistenceError(lock_path, operation="open lock file", cause=exc) from exc
        if not regular:  # a FIFO or a device planted at the path: never the lock (a probe of it could block)
            os.close(fd)
            raise PersistenceError(
                lock_path,
                operation="open lock file",
                reason="not a regular file",
                outcome="nothing was written",
                next_step="remove what is at the lock path (no writer can hold a lock there) and start again",
            )
        graced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise PersistenceError(lock_path, operation="lock", cause=exc) from exc
                if time.monotonic() >= deadline:
                    pid, host = read_holder(lock_path)
                    if not graced and _gone(pid, host):
                        # The holder is dead, yet the lock is held: by a child it forked that has not reached
                        # exec() yet (a compaction worker being started), whose copy of the descriptor closes
                        # in a moment. Wait that out once (issue 14 attack).
                        graced = True
                        deadline = time.monotonic() + DEAD_HOLDER_GRACE
                        continue
                    os.close(fd)
                    raise StateLockedError(self._state_path, pid=pid, host=host) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _locked_file_at_path(self, fd: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file locked through *fd* if it is still the file at the path, else None."""
        try:
            ours = fs.fstat(fd)
            st = fs.lstat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            os.close(fd)
            raise PersistenceError(self.path, operation="check lock file", cause=exc) from exc
        return (ours.st_dev, ours.st_ino) if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino) else None

    @property
    def held(self) -> bool:
        """True while this process holds the lock (False in a forked child of the holder)."""
        return self._fd is not None and os.getpid() == self._pid

    @property
    def owner_pid(self) -> int:
        """The process that took the lock."""
        return self._pid

    def check(self) -> None:
        """Raise unless this process holds the lock on the file now at the path; called before each write.

        One ``lstat``. A lock file removed or replaced (the next writer may already hold the new one) and a
        forked child both give :class:`~posstate.StateLockedError`; an unreadable path PersistenceError.
        """
        if os.getpid() != self._pid:
            raise forked_error(self._state_path, owner=self._pid)
        if self._fd is None:
            raise StateLockedError(self._state_path, pid=None, host=None, reason="the writer lock was released")
        try:
            st = fs.lstat(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PersistenceError(self.path, operation="check writer lock", cause=exc) from exc
        else:
            if (st.st_dev, st.st_ino) == self._ident:
                return
        raise StateLockedError(
            self._state_path,
            pid=None,
            host=None,
            reason=(
                f"the lock file {self.path.name} was removed or replaced while this manager held the lock, so "
                "another writer may be running; this manager no longer writes (nothing of this change was written)"
            ),
            next_step=(
                "stop this bot, make sure no other writer runs (`posstate doctor`), then start it again: "
                "a new manager loads every acknowledged change"
            ),
        )

    def release(self) -> None:
        """Unlock and close. In a forked child only the child's copy of the descriptor is closed: the parent's
        lock (one open file description, shared) stays held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.getpid() != self._pid:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def forked_error(state_path: Path, *, owner: int) -> StateLockedError:
    """The error a manager gives in a forked child of the process that holds its lock."""
    return StateLockedError(
        state_path,
        pid=owner,
        host=_hostname(),
        reason=(
            f"this manager belongs to pid {owner}; pid {os.getpid()} is a forked child that shares its lock "
            "and never reads, writes or releases it"
        ),
        next_step="use a manager only in the process that created it (create managers after fork(), not before)",
    )


def _gone(pid: int | None, host: str | None) -> bool:
    """True when the lock file names a process of this host that no longer exists."""
    if pid is None or pid <= 0 or pid == os.getpid() or host != _hostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists (another user's)
        return False
    return False


def _hostname() -> str:
    import socket  # loaded when a lock is first taken, not when posstate is imported

    return socket.gethostname()
