"""The worker side of the pipes between the bot and its worker processes (issue 14): framed messages, the
process's first steps, and the wait for the next job of a worker that is kept between compactions.

A message is its length in decimal, a newline, then its bytes (:func:`frame`), both ways: a job on the
worker's stdin (with the key material, never in argv, the environment or a file), its answer on stdout.
Read by its length, never until an end of file: a process the bot forks while a pipe is open holds a copy
of its write end, and would otherwise stall the reader until that process exits. The manager's side is
posstate/manager/procompaction.py (:class:`~posstate.manager.procompaction.Worker`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import orjson

from posstate.core.errors import PosStateError
from posstate.storage import fileops as fs
from posstate.storage.crypto import Keyring

#: The largest job or answer read from a pipe (bytes); anything longer is refused, never parsed.
MAX_MESSAGE = 1024 * 1024
#: The exit status of a kept worker that waited longer than its job's ``idle_s`` for the next job (it gives
#: its memory back). A job written just as it left finds this status and no answer: the manager starts a
#: fresh worker for it (not a failure).
IDLE_EXIT = 4
#: The exit status of a worker whose manager is gone (it never answers; its temp is removed).
ORPHAN_EXIT = 3
_HEAD = 24  # the longest length line read (digits and the newline)


@contextlib.contextmanager
def no_sigpipe() -> Iterator[None]:
    """SIGPIPE blocked on this thread: a write to a pipe whose reader is gone fails with BrokenPipeError even in
    a program that set SIGPIPE back to its default action (which ends the process). A SIGPIPE raised meanwhile
    is taken before the mask is restored. For the bot's threads that write to its helper processes (a worker's
    job, posstate/manager/workers.py; the server process's frames, posstate/serve/spawn.py)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        yield
    finally:
        if signal.SIGPIPE not in old:
            with contextlib.suppress(OSError):
                if hasattr(signal, "sigtimedwait"):
                    while signal.sigtimedwait([signal.SIGPIPE], 0) is not None:
                        pass
                else:  # macOS: no sigtimedwait (an AttributeError here failed every exchange; issue 14 attack)
                    while signal.SIGPIPE in signal.sigpending():  # sigwait returns at once: it is pending
                        signal.sigwait([signal.SIGPIPE])
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def frame(body: bytes) -> bytes:
    """A message as it goes down a pipe: its length in decimal and a newline, then its bytes."""
    return b"%d\n" % len(body) + body


def read_message(stream: BinaryIO) -> bytes:
    """The job :func:`frame` wrote, read by its length (a one-job worker: posstate/backup/checkjob.py).
    Longer than MAX_MESSAGE: MAX_MESSAGE + 1 bytes (refused)."""
    head = stream.readline(_HEAD)
    if not head.endswith(b"\n") or not head[:-1].isdigit():
        return b""
    size = int(head[:-1])
    return stream.read(min(size, MAX_MESSAGE + 1))


def take_frame(buf: bytearray) -> bytes | None:
    """The first whole message in *buf* (removed from it), or None while it is incomplete. Raises ValueError
    when *buf* does not start with a length line, or the length is over MAX_MESSAGE (the stream cannot be
    trusted past that point)."""
    end = buf.find(b"\n", 0, _HEAD)
    if end < 0:
        if len(buf) >= _HEAD or (buf and not buf.isdigit()):
            raise ValueError("not a framed message")
        return None
    head = bytes(buf[:end])
    if not head.isdigit():
        raise ValueError("not a framed message")
    size = int(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    if len(buf) < end + 1 + size:
        return None
    body = bytes(buf[end + 1 : end + 1 + size])
    del buf[: end + 1 + size]
    return body


class Inbox:
    """The jobs of a kept worker, from its stdin: :meth:`next` waits for one at most *idle* seconds."""

    def __init__(self, fd: int, parent: int) -> None:
        self.fd, self.parent = fd, parent
        self.buf = bytearray()

    def next(self, idle: float) -> bytes | int:
        """The next job's bytes, or the status to exit with: 0 at an end of file (the manager closed the pipe),
        ORPHAN_EXIT when the manager is gone (a forked copy of the pipe may hold the end of file off: the parent
        is checked every second), IDLE_EXIT after *idle* seconds with no job. Raises ValueError (take_frame)."""
        deadline = time.monotonic() + idle
        while True:
            job = take_frame(self.buf)
            if job is not None:
                return job
            if os.getppid() != self.parent:
                return ORPHAN_EXIT
            left = deadline - time.monotonic()
            if left <= 0:
                return IDLE_EXIT
            ready, _, _ = select.select([self.fd], [], [], min(1.0, left))
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return 0
                self.buf += chunk


def answer(out: dict[str, Any]) -> bool:
    """Write one framed answer on stdout; False when the manager is gone (nobody reads it)."""
    try:
        sys.stdout.buffer.write(frame(orjson.dumps(out)))
        sys.stdout.flush()
    except BrokenPipeError:
        return False
    return True


def failure(exc: BaseException) -> str:
    """A message for the manager's log: a posstate error's own text (never secret), else the type and errno."""
    if isinstance(exc, PosStateError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} (errno {exc.errno}: {exc.strerror})"
    return type(exc).__name__


def yield_processor(nice: int) -> None:
    """The bot's threads come first: the worker runs at *nice* (19: the lowest share; a bot's thread waking from
    its ``fdatasync`` preempts it). Never ``SCHED_IDLE``: on a machine kept busy by other processes an idle-class
    worker may never run, and the journal would grow while the compaction it waits for starves. Once per
    process (``os.nice`` adds to the value)."""
    if not nice:
        return
    with contextlib.suppress(OSError):
        os.nice(nice)


def _no_core() -> None:
    """This process will hold the key: a crash must never write it to a core file (its working directory is
    the package's folder; issue 14 attack). Before the job is read."""
    try:
        import resource
    except ImportError:  # not on a Unix
        return
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _oom_first() -> None:
    """This process holds a second copy of the state: under a memory limit the kernel's OOM killer must take
    it (its attempt fails and the compaction is retried, in the bot's process after WORKER_TRIES), never the
    bot. Linux: a process may always raise its own ``oom_score_adj``; elsewhere nothing to do."""
    with contextlib.suppress(OSError):
        fd = fs.open_("/proc/self/oom_score_adj", os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fs.write_all(fd, b"1000")
        finally:
            fs.close(fd)


def _not_dumpable() -> None:
    """Linux: ``prctl(PR_SET_DUMPABLE, 0)``. A kept worker's heap holds freed copies of its last job's keys for
    as long as it lives: another process of the same user (without ``CAP_SYS_PTRACE``) can then neither open
    its ``/proc/<pid>/mem`` nor attach to it, and no core file is written whatever handles cores. After
    :func:`_oom_first`: a process that is not dumpable cannot open its own ``/proc/self`` files for writing
    unless it is root (they become root's). Best effort, and nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):  # no libc to be had (a static interpreter): the rest still holds
        return


def prepare_process() -> None:
    """A worker's first steps, before it reads a key: no core file, the OOM killer's first choice, not
    dumpable (Linux), deaf to a Ctrl-C meant for the bot (the bot decides; close() kills it), the collector
    off (one pass over the data; a kept worker's jobs make no reference cycles of any size)."""
    _no_core()
    _oom_first()
    _not_dumpable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()


def parse_job(raw: bytes) -> tuple[dict[str, Any], Keyring | None]:
    """The job and the keys of one message (raises on anything else: the answer says it failed)."""
    if len(raw) > MAX_MESSAGE:
        raise ValueError("job too large")
    msg = orjson.loads(raw)
    job, material = dict(msg["job"]), msg.get("keys")
    del msg
    return job, Keyring.from_worker_material(material) if material is not None else None


def read_job(stream: BinaryIO) -> tuple[dict[str, Any], Keyring | None]:
    """The one job of a one-job worker, from the bot's pipe."""
    return parse_job(read_message(stream))
