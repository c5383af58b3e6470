"""One thread for the whole process that reaps the kept workers which left while they waited (issue 14,
session 13).

A kept compaction worker (posstate/manager/workers.py) exits after ``WORKER_IDLE`` seconds without a job
(posstate/journal/jobpipe.py ``IDLE_EXIT``). Nobody waits on it meanwhile: without this it stayed a zombie,
with its three pipes open in the bot, until the next compaction or ``close()``. Its exit closes its stdout,
so the bot's end of that pipe becomes readable: this thread polls the stdout of every worker that waits
(one ``poll()`` for all the managers of the process, no timeout) and hands each one that became readable to
:meth:`~posstate.manager.workers.Worker.left_idle`, which reaps it and closes its pipes unless a job was
handed to it meanwhile. The thread starts with the first worker to watch and ends when none is left; the
bot's threads never wait on it (a watch is a dict entry and one byte down a pipe).

A descriptor number may be closed and reused while the thread polls it: an event counts only for the entry
the poll was started with (the same object still registered under that number), and every change wakes the
poll so that it starts again from the entries as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import weakref
from typing import Any, Protocol

log = logging.getLogger("posstate")


class Watched(Protocol):
    def left_idle(self, token: int) -> None: ...


class _Entry:
    __slots__ = ("proc", "token", "worker")

    def __init__(self, worker: Watched, proc: Any, token: int) -> None:
        self.worker: weakref.ref[Watched] = weakref.ref(worker)
        self.proc, self.token = proc, token


_lock = threading.RLock()  # reentrant: a worker collected while it is held forgets itself (its finalizer)
_entries: dict[int, _Entry] = {}  # the worker's stdout descriptor -> what was registered for it
_thread: threading.Thread | None = None
_wake: tuple[int, int] | None = None  # (read end, write end); kept open for the life of the process


def watch(worker: Watched, proc: Any, token: int) -> None:
    """Reap *worker* (its process *proc*) if its stdout becomes readable while it waits; *token* names the job
    it answered last (a later job makes the event stale). Called with the worker's own guard held."""
    global _thread, _wake
    stdout = proc.stdout
    if stdout is None or stdout.closed:
        return
    with _lock:
        if _wake is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            _wake = (r, w)
        _entries[stdout.fileno()] = _Entry(worker, proc, token)
        _poke()
        if _thread is None:
            thread = threading.Thread(target=_loop, name="posstate-idle-workers", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had (a thread or memory limit): the worker is reaped at
                # its next job or close(), as before the watcher; the next worker to wait tries again. Never
                # raised into result(): its answer was read (issue 14 attack, session 13).
                log.warning("could not start the idle workers' watcher (%s); they are reaped at their next job", exc)
                return
            _thread = thread


def forget(proc: Any) -> None:
    """Stop watching *proc*'s stdout (a job is handed to it, or it is reaped): before its pipes are closed."""
    stdout = proc.stdout
    if stdout is None or stdout.closed:
        return
    with _lock:
        fd = stdout.fileno()
        entry = _entries.get(fd)
        if entry is not None and entry.proc is proc:
            del _entries[fd]
            _poke()


def watched() -> int:
    """How many workers are watched (tests)."""
    with _lock:
        return len(_entries)


def _poke() -> None:
    if _wake is not None:
        with contextlib.suppress(BlockingIOError):  # a byte is already there: the poll wakes anyway
            os.write(_wake[1], b"\0")


def _loop() -> None:
    """The thread's body. Whatever it raises ends it as if nothing were left to watch (the next watch() starts
    another), logged; one worker's reaping that raises is logged and the others are still watched (issue 14
    attack, session 13: an exception ended the thread, left marked as running, and no worker was reaped
    again for the life of the process)."""
    global _thread
    try:
        _watch_all()
    except Exception as exc:
        log.warning("the idle workers' watcher stopped (%s); the next kept worker to wait starts it again", _name(exc))
    finally:
        with _lock:
            if _thread is threading.current_thread():
                _thread = None


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}, errno {exc.errno}" if isinstance(exc, OSError) else type(exc).__name__


def _watch_all() -> None:
    global _thread
    while True:
        with _lock:
            if not _entries or _wake is None:
                _thread = None
                return
            snapshot = dict(_entries)
            wake = _wake[0]
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        for fd in snapshot:
            poller.register(fd, select.POLLIN)
        gone: list[_Entry] = []
        for fd, _ in poller.poll():
            if fd == wake:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake, 4096)
                continue
            with _lock:
                entry = _entries.get(fd)
                if entry is None or entry is not snapshot.get(fd):
                    continue  # forgotten (or the number reused) since the poll began
                del _entries[fd]
            gone.append(entry)
        for entry in gone:
            worker = entry.worker()
            if worker is not None:
                try:
                    worker.left_idle(entry.token)
                except Exception as exc:  # that worker is reaped at its next job or close(); the others still are
                    log.warning("reaping an idle worker failed (%s); it is reaped at its next job", _name(exc))


def _forked() -> None:
    """In a child the bot forks: no thread, none of the parent's workers (they are the parent's to reap), and
    a pipe of its own (the inherited one is the parent's thread's)."""
    global _lock, _thread, _wake
    _lock = threading.RLock()
    _entries.clear()
    _thread = None
    if _wake is not None:
        for fd in _wake:
            with contextlib.suppress(OSError):
                os.close(fd)
    _wake = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)
