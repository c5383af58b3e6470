"""Timed backups on a background thread: the caller of a save or compaction never waits for a backup.

One :class:`BackupService` per manager (created on its first save). A save or compaction whose snapshot is
durable calls :func:`posstate.backup.ops.after_save`, which notes the snapshot's generation and, when the
newest backup is older than ``backup_interval``, asks the service for a backup: a flag under a condition,
and a thread started if none runs. That is all the caller pays. The thread (one at a time; requests made
while it runs fold into one) takes the service's folder lock, copies the newest durable snapshot (the state
file) into the backup folder, verified (:mod:`posstate.backup.snapcopy`), then applies retention with the
verified-backup cache (:mod:`posstate.backup.verified`). Explicit backup operations (create, prune, restore,
recovery, repair) take the same folder lock first, so they never interleave with a background backup.

A failure is reported (``backupFailed`` event, a warning in the log) and retried at the first snapshot after
``backup_interval`` more seconds. :meth:`BackupService.close` (from the manager's close()) lets a running
backup finish for a bounded time; past it the backup is cancelled before it gets its name, and close() says
so in the log and in a ``backupFailed`` event. A SIGKILL at any step leaves no new backup or a whole,
verified one; a temp file is swept by the next backup (docs/RECOVERY.md, docs/JOURNAL.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from posstate.backup import snapcopy as _snapcopy
from posstate.backup.verified import VerifiedCache
from posstate.core.errors import PosStateError

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles

log = logging.getLogger("posstate")

#: How long close() waits for a running background backup before cancelling it (seconds).
CLOSE_TIMEOUT = 30.0

_create_lock = threading.Lock()


def _yield_gil() -> None:
    """Between two slices of a full check: let the bot's threads take the GIL (issue 14.3)."""
    time.sleep(0)


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
        self.cache = VerifiedCache(pause=_yield_gil)  # full checks in slices (issue 14.3)
        #: The clock timed backups compare with (tests replace it).
        self.clock: Callable[[], float] = time.time
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wanted = False
        self._busy = False
        self._durable_generation = 0
        self._closing = False
        self._cancelled = False
        self._gate = threading.Lock()
        self._retry_at = float("-inf")
        #: Backups taken and failed in the background (for tests and the benchmark).
        self.taken = 0
        self.failed = 0
        _services.add(self)

    def _orphan(self) -> None:
        """In a forked child (see :func:`_after_fork_in_child`)."""
        self.folder_lock = threading.RLock()
        self._cond = threading.Condition()
        self._gate = threading.Lock()
        self._thread = None
        self._busy = self._wanted = False
        self._closing = True

    def note_snapshot(self, generation: int) -> None:
        """A snapshot of *generation* is durable (the state file holds it or a newer one)."""
        if generation > self._durable_generation:
            self._durable_generation = generation

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
            # The thread holds the service weakly: a manager dropped without close() is still collected (its
            # writer lock stays held until the process ends); the finalizer wakes the thread to end (never in a
            # forked child).
            thread = threading.Thread(target=_worker, args=(weakref.ref(self), self._cond), name="posstate-backup", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread can be started now: the caller's save stands; reported below
                self._wanted = False
                failed: RuntimeError | None = exc
            else:
                self._thread, failed = thread, None
                weakref.finalize(self, _wake, self._cond, os.getpid())
        if failed is not None:
            self._failed(failed, "start backup thread")
            return False
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no background backup runs or is asked for; False if *timeout* passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and not self._wanted, timeout)

    @property
    def running(self) -> bool:
        """True while a background backup is being taken."""
        return self._busy

    def close(self, timeout: float | None = None) -> str | None:
        """Refuse new backups; wait up to *timeout* (default :data:`CLOSE_TIMEOUT`) for a running one.
        Returns what was left behind (also logged and emitted as ``backupFailed``), or None."""
        timeout = CLOSE_TIMEOUT if timeout is None else timeout
        with self._cond:
            self._closing = True  # no new request; one already asked for still runs (within the timeout)
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return None
        thread.join(timeout)
        if not thread.is_alive():
            return None
        if self._gate.acquire(timeout=max(timeout, 0.001)):
            self._cancelled = True
            self._gate.release()
            left = (
                f"a background backup was still running after {timeout:g} s and was cancelled before it got its "
                "name: no backup was added; its temp file, if any, is removed by the next backup"
            )
        else:
            left = (
                f"a background backup was still running after {timeout:g} s and could not be cancelled (a file "
                "operation is stuck): it may still add a backup, which is whole and verified if it appears"
            )
        log.warning("%s: close: %s", self._files.config.backup_path, left)
        self._files.emit("backupFailed", {"path": str(self._files.config.backup_path), "reason": left, "operation": "close"})
        return left

    # ------------------------------------------------------------------ the thread
    def _next(self) -> bool:
        """Under the condition: take the next request (True), or say the thread should end (False)."""
        if not self._wanted or self._cancelled:
            self._wanted = False
            self._cond.notify_all()
            return False
        self._wanted = False
        self._busy = True
        return True

    def _run_one(self) -> None:
        try:
            self._once()
        except BaseException as exc:  # a bug must not kill the thread silently  # pragma: no cover
            log.exception("background backup failed unexpectedly")
            self._failed(exc, "backup")
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _due(self) -> bool:
        return due(self._files, self.clock())

    def _once(self) -> None:
        files = self._files
        cfg = files.config
        with self.folder_lock:
            if not self._due():  # an explicit backup may have been taken meanwhile
                return
            try:
                info = _snapcopy.copy_state_file(
                    cfg.state_path,
                    cfg.backup_path,
                    options=files.read,
                    cache=self.cache,
                    check_account=files.check_account,
                    max_generation=self._durable_generation,
                    gate=self._gate,
                    cancelled=lambda: self._cancelled,
                    known=files.wrote,
                )
            except _snapcopy.Newer as newer:
                # A save renamed a newer snapshot but has not returned: its own after_save asks again.
                log.debug("background backup skipped: generation %s is not durable yet", newer)
                return
            except _snapcopy.Cancelled:
                return  # close() reports it
            except (PosStateError, OSError) as exc:
                self._failed(exc, getattr(exc, "operation", "backup"))
                return
            self.taken += 1
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
                },
            )
            from posstate.backup.prune import prune_backups

            try:
                prune_backups(files, dry_run=False, cache=self.cache)
            except (PosStateError, OSError) as exc:
                files.emit("error", {"context": "prune after background backup", "error": str(exc)})
                log.warning("pruning after a background backup failed: %s", exc)

    def _failed(self, exc: BaseException, operation: str) -> None:
        self.failed += 1
        cfg = self._files.config
        self._retry_at = self.clock() + cfg.backup_interval
        self._files.emit("backupFailed", {"path": str(cfg.backup_path), "reason": str(exc), "operation": operation})
        log.warning("background backup failed (retried at the first snapshot after %g s): %s", cfg.backup_interval, exc)


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
                del svc  # never wait holding the service: its manager may be dropped meanwhile
                cond.wait()
            if not svc._next():
                return
        svc._run_one()
        del svc
