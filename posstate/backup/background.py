"""Timed backups on a background thread: the caller of a save or compaction never waits for a backup.

One :class:`BackupService` per manager. A save or compaction whose snapshot is durable calls
:func:`posstate.backup.ops.after_save`: it notes the snapshot's generation and, when the newest backup is older than
``backup_interval``, sets a flag under a condition (that is all the caller pays). The thread (one at a time; requests
made while it runs fold into one) takes the folder lock, copies the newest durable snapshot (the state file), verified
(:mod:`posstate.backup.snapcopy`), then applies retention with the verified-backup cache (:mod:`posstate.backup.verified`).
Explicit backup operations take the same folder lock, so they never interleave; its events go out after the folder.

In the journal modes a change is acknowledged long before a compaction puts it into a snapshot, so the thread also keeps
a timer (issue 15.2): once ``backup_interval`` has passed since the newest backup and memory holds acknowledged changes
no backup holds, it asks the manager for a background compaction and copies that compaction's snapshot once it is
durable (:mod:`posstate.backup.viacompaction`, issue 14.2: memory is never encoded again for a timed backup, except as
the fallback when compactions keep failing). A clean close() backs up the acknowledged state in memory
(:meth:`BackupService.final_backup`, :func:`posstate.backup.acked.from_memory`). ``backup_interval=0`` keeps the old
meaning (a backup at every snapshot) and runs no timer.

A failure is reported (``backupFailed``, a warning) and retried after ``backup_interval``. close() stops a prune's
full checks at their next slice (or kills the worker process running them) and lets a running backup finish for a
bounded time, then cancels it before it gets its name (:mod:`posstate.backup.closing`). A SIGKILL leaves no new backup
or a whole, verified one; a temp is swept by the next backup (docs/RECOVERY.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from posstate.backup import closing as _closing
from posstate.backup import ledger as _ledger
from posstate.backup import snapcopy as _snapcopy
from posstate.backup import viacompaction as _via
from posstate.backup.closing import ChecksStopped
from posstate.core.errors import PosStateError
from posstate.storage import turns as _turns

if TYPE_CHECKING:
    from posstate.backup.backups import BackupInfo
    from posstate.backup.files import StateFiles

log = logging.getLogger("posstate")

#: How long close() waits for a running background backup before cancelling it (seconds).
CLOSE_TIMEOUT = 30.0
_MAX_TIMER_WAIT = 86400.0  # the longest single wait of the timer (seconds)

_create_lock = threading.Lock()


def _yield_gil() -> None:
    """Between two slices of a full check or backup of memory: the GIL and the background turn go round (14.3)."""
    _turns.pause()


def service(files: StateFiles) -> BackupService:
    """The backup service of *files*, created on first use (thread-safe)."""
    svc = files.backups
    if svc is None:
        with _create_lock:
            svc = files.backups
            if svc is None:
                svc = files.backups = BackupService(files)
    return svc


class BackupService:
    """The background backup thread of one manager, its folder lock and its verified-backup cache."""

    def __init__(self, files: StateFiles) -> None:
        self._files = files
        #: Held by the background backup and by every explicit backup operation (taken before the manager's lock).
        self.folder_lock = threading.RLock()
        self.cache = _ledger.cache_for(files, pause=self._pause_check, stoppable=self._stoppable)
        #: The clock timed backups compare with (tests replace it).
        self.clock: Callable[[], float] = time.time
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wanted = self._busy = self._ran = self._named = False  # _ran: _once returned; _named: it named one
        self._durable_generation = 0
        self._closing = self._cancelled = False
        #: Set by close(): the full checks of its own prunes stop at their next slice (an explicit one's never do).
        self._stop_checks = False
        self._own_prune = threading.local()  # .active: this thread runs the service's own prune (not nested API)
        self._close_deadline: float | None = None
        self._gate = threading.Lock()
        self._retry_at = float("-inf")
        #: Generation of the newest backup this service took (memory or snapshot): the timer's "nothing new".
        self.backed_generation = 0
        self._timer_at = float("-inf")
        #: A due timed backup waiting for a compaction's snapshot, and when the newest durable one was noted (14.2).
        self.awaited: _via.Awaited | None = None
        self.noted_at = float("-inf")
        self.taken = self.failed = 0  # backups taken and failed in the background (tests, the benchmark)
        _services.add(self)

    def _orphan(self) -> None:
        """In a forked child (see :func:`_after_fork_in_child`)."""
        self.folder_lock, self._cond, self._gate = threading.RLock(), threading.Condition(), threading.Lock()
        self._thread = None
        self._busy = self._wanted = False
        self._closing = True

    def note_snapshot(self, generation: int) -> None:
        """A snapshot of *generation* is durable (the state file holds it or a newer one)."""
        if generation > self._durable_generation:
            self._durable_generation, self.noted_at = generation, self.clock()

    def request(self) -> bool:
        """Ask for a timed backup; returns at once. False when closing or waiting to retry after a failure."""
        with self._cond:
            now = self.clock()
            interval = self._files.config.backup_interval
            if self._retry_at > now + interval:  # the clock was stepped back after the failure: wait from now
                self._retry_at = now + interval
            if self._closing or now < self._retry_at:
                return False
            self._wanted = True
            if self._thread is not None:  # started once, then it waits for work: a request is only a notify
                self._cond.notify_all()
                return True
            failed = self._start_thread()
        if failed is not None:
            self._failed(failed, "start backup thread")
            return False
        return True

    def start(self) -> None:
        """Start the thread without a request (journal modes: its timer looks for changes to back up)."""
        with self._cond:
            if self._closing or self._thread is not None:
                return
            failed = self._start_thread()
        if failed is not None:
            self._failed(failed, "start backup thread")

    def _start_thread(self) -> RuntimeError | None:
        """Under the condition: start the thread; the error if none can be started (reported by the caller)."""
        # The thread holds the service weakly: a manager dropped without close() is still collected (its
        # writer lock stays held until the process ends); the finalizer wakes the thread to end (never in a
        # forked child).
        thread = threading.Thread(target=_worker, args=(weakref.ref(self), self._cond), name="posstate-backup", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread can be started now: the caller's save stands; reported below
            self._wanted = False
            return exc
        self._thread = thread
        weakref.finalize(self, _wake, self._cond, os.getpid())
        return None

    def _pause_check(self) -> None:
        """Between two slices of a prune's full check: stop it when close() asked (only in the service's own
        prune after a backup: an explicit prune or backup, even from an event handler, runs to its end)."""
        if self._stop_checks and self._stoppable():
            raise ChecksStopped
        _yield_gil()
        if self._stop_checks and self._stoppable():
            raise ChecksStopped  # asked while the turn was handed over

    def _stoppable(self) -> bool:
        return bool(getattr(self._own_prune, "active", False))

    @contextlib.contextmanager
    def explicit(self) -> Iterator[None]:
        """An explicit create/prune on this thread: close() never stops its checks (even from an event handler)."""
        before = self._stoppable()
        self._own_prune.active = False
        try:
            yield
        finally:
            self._own_prune.active = before

    def _stop_verifying(self, timeout: float) -> float:
        """close(): stop the prune's full checks at their next slice; the one deadline of close() (monotonic)."""
        self._stop_checks = True
        self.cache.stop_remote()  # a worker process running them is killed now (issue 14)
        if self._close_deadline is None:
            self._close_deadline = time.monotonic() + timeout
        return self._close_deadline

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no backup runs, is asked for or awaits a compaction (False: *timeout*, or asked by a handler on the
        backup thread or holding the folder, which cannot wait for it)."""
        if self._thread is threading.current_thread() or getattr(self.folder_lock, "_is_owned", lambda: False)():
            return False
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and not self._wanted and not self._awaiting(), timeout)

    def _awaiting(self) -> bool:  # waits for its compaction (not for a retry after a failure)
        return self.awaited is not None and not self._closing and self.clock() >= self._retry_at

    def forget_awaited(self) -> None:
        """An explicit backup was taken (folder lock held): no timed backup waits for a compaction any more."""
        with self._cond:
            self.awaited = None
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        """True while a background backup is being taken."""
        return self._busy

    def close(self, timeout: float | None = None) -> str | None:
        """Refuse new backups; stop a prune's full checks at their next slice (a verification is redundant);
        wait for a running backup until *timeout* (default :data:`CLOSE_TIMEOUT`) after close() began (one
        deadline with :meth:`final_backup`; :mod:`posstate.backup.closing`). Returns what was left behind
        (also logged and emitted as ``backupFailed``), or None."""
        timeout = CLOSE_TIMEOUT if timeout is None else timeout
        return _closing.stop(self, timeout, self._stop_verifying(timeout))

    # ------------------------------------------------------------------ the thread
    def _next(self) -> bool:
        """Under the condition: take the next request (True), or say the thread should end (False)."""
        if not self._wanted or self._cancelled:
            self._wanted = False
            self._cond.notify_all()
            return False
        self._wanted = False
        self._busy, self._ran, self._named = True, False, False  # reset as a run starts: close() reads them after it
        return True

    def _run_one(self) -> None:
        try:
            with self._files.deferred_events():  # handlers after the folder's release (docs/ARCHITECTURE.md)
                self._once()
                self._ran = True
        except BaseException as exc:  # a bug must not kill the thread silently  # pragma: no cover
            log.exception("background backup failed unexpectedly")
            self._failed(exc, "backup")
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _name_given(self) -> None:  # under the gate: this thread's run gave a backup its name (closing.stop)
        self._named = self._named or threading.current_thread() is self._thread

    def _due(self) -> bool:
        return due(self._files, self.clock())

    def _journaled(self) -> int:
        """Memory's generation when it is ahead of the durable snapshot (journal modes), else 0 (a hint)."""
        if self._files.config.durability == "snapshot":
            return 0
        st = self._files.snapshot()
        generation = st.generation if st is not None else 0
        return generation if generation > self._durable_generation else 0

    def timer_wait(self) -> float | None:
        """Seconds until the timer looks for acknowledged changes to back up (None: no timer); once due, every eighth."""
        interval = self._files.config.backup_interval
        if self._closing or interval <= 0 or self._files.config.durability == "snapshot":
            return None
        now = self.clock()
        last = self._files.last_backup_at
        due_at = now + interval if last is None else min(last, now) + interval
        # At most a day at a time (the loop computes it again): an infinite or huge interval must not reach
        # Condition.wait, which raises OverflowError past the platform's time_t and would kill the thread.
        return min(max(max(due_at, self._timer_at, self._retry_at) - now, 0.001), _MAX_TIMER_WAIT)

    def timer_fired(self) -> None:
        """Under the condition: the timer ran out; ask for a backup when one is due and memory is ahead."""
        now = self.clock()
        if self._closing or now < max(self._timer_at, self._retry_at):
            return
        if self._journaled() > self.backed_generation and self._due():
            self._wanted = True
        self._timer_at = now + max(self._files.config.backup_interval / 8, 0.001)  # nothing came of it: later

    def final_backup(self, timeout: float | None = None) -> BackupInfo | None:
        """From a clean close(), before :meth:`close` (journal modes): back up the acknowledged state in memory
        when no backup holds it (issue 15.2), after stopping a prune's full checks at their next slice. Never
        raises (close() must still release the lock): a failure is reported as ever. A background backup
        holding the folder past *timeout* (default :data:`CLOSE_TIMEOUT`; a stuck disk) makes it give up and
        say so, as close() does."""
        timeout = CLOSE_TIMEOUT if timeout is None else timeout
        return _closing.final_backup(self, timeout, self._stop_verifying(timeout))

    def _from_memory(self, operation: str) -> BackupInfo | None:
        """The acknowledged state in memory as a backup: at close, or the fallback (:func:`_via.from_memory`)."""
        return _via.from_memory(self, operation, pause=None if operation == "close" else _yield_gil)

    def _took(self, info: BackupInfo, *, extra: dict[str, object]) -> None:
        files = self._files
        self.taken += 1
        self.awaited = None
        if info.generation is not None:
            self.backed_generation = max(self.backed_generation, info.generation)
        # The name's second may be later than now (the clock was stepped back): count the interval from now.
        files.last_backup_at = min(info.created_at.timestamp(), self.clock())
        files.emit(
            "backupCreated",
            {
                "path": str(info.path),
                "backup_id": info.id,
                "generation": info.generation,
                "positions": info.position_count,
                "bytes": info.size,
                "background": True,
                **extra,
            },
        )
        from posstate.backup.prune import prune_backups

        if self._closing:  # close() stopped the service (maybe from a handler of this very backup, any thread):
            return  # the writer lock may be released and the directory another process's now; no prune
        before = self._stoppable()
        self._own_prune.active = True
        try:
            prune_backups(files, dry_run=False, cache=self.cache)
        except ChecksStopped:  # close(): the next prune checks the rest; retention waits until then
            log.debug("%s: prune stopped by close() before its full checks ended", files.config.backup_path)
        except (PosStateError, OSError) as exc:
            files.emit("error", {"context": "prune after background backup", "error": str(exc)})
            log.warning("pruning after a background backup failed: %s", exc)
        finally:
            self._own_prune.active = before

    def _once(self) -> None:
        files = self._files
        cfg = files.config
        with self.folder_lock:
            if self._cancelled or not self._due():  # close() gave it up (the writer lock may be another's); or an
                self.awaited = None  # explicit backup was taken meanwhile
                return
            if self._journaled() and not _via.ready(self):  # memory is ahead: wait for a compaction's snapshot
                return
            try:
                info = _snapcopy.copy_state_file(
                    cfg.state_path,
                    cfg.backup_path,
                    options=files.read,
                    cache=self.cache,
                    check_account=files.check_account,
                    max_generation=self._durable_generation,
                    min_generation=self._durable_generation,  # an older file was planted (attack, issue 14.2)
                    gate=self._gate,
                    cancelled=lambda: self._cancelled,
                    named=self._name_given,
                    known=files.wrote,
                )
            except _snapcopy.Newer as newer:  # a save renamed a newer snapshot, not returned yet: it asks again
                log.debug("background backup skipped: generation %s is not durable yet", newer)
                return
            except _snapcopy.Cancelled:
                return  # close() reports it
            except (PosStateError, OSError) as exc:
                self._failed(exc, getattr(exc, "operation", "backup"))
                return
            self._took(info, extra={})

    def _failed(self, exc: BaseException | str, operation: str) -> None:
        """A failed background backup: ``backupFailed``, a warning, and a retry after ``backup_interval``."""
        reason = str(exc)
        self.failed += 1
        cfg = self._files.config
        self._retry_at = self.clock() + cfg.backup_interval
        self._files.emit("backupFailed", {"path": str(cfg.backup_path), "reason": reason, "operation": operation})
        log.warning("background backup failed (retried at the first snapshot after %g s): %s", cfg.backup_interval, reason)


def due(files: StateFiles, now: float) -> bool:
    """A timed backup is due: none yet, or ``backup_interval`` passed since the newest. A newest backup dated
    after *now* (the clock was stepped back, or a later name was planted) counts as taken now: the interval
    restarts from the new time instead of waiting for the clock to catch up."""
    last = files.last_backup_at
    if last is not None and last > now:
        files.last_backup_at = last = now
    return last is None or now - last >= files.config.backup_interval


def _wake(cond: threading.Condition, pid: int) -> None:
    if os.getpid() != pid:  # a forked child: the thread is not here, and the parent's thread may hold *cond*
        return
    with cond:
        cond.notify_all()


def _after_fork_in_child() -> None:
    """A forked child has no backup thread: fresh locks (one may be held by a thread of the parent that does
    not exist here), nothing running, and no new backup (the child never writes, issue 12.6)."""
    global _create_lock
    _create_lock = threading.Lock()
    for svc in list(_services):
        svc._orphan()


_services: weakref.WeakSet[BackupService] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _worker(ref: weakref.ref[BackupService], cond: threading.Condition) -> None:
    """The background thread: wait for a request, run it, until the service closes or is collected."""
    while True:
        with cond:
            while True:
                svc = ref()
                if svc is None:
                    return
                if svc._wanted or svc._closing:
                    break
                timeout = svc.timer_wait()
                del svc  # never wait holding the service: its manager may be dropped meanwhile
                if not cond.wait(timeout) and timeout is not None:
                    svc = ref()
                    if svc is None:
                        return
                    svc.timer_fired()
                    del svc
            if not svc._next():
                return
        svc._run_one()
        del svc
