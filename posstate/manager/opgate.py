"""Explicit operations that run outside the manager's lock, and close() waiting for them (issue 14.3).

In the journal modes ``create_backup()`` first folds the journal into a snapshot (a background compaction it
waits for, holding no lock: close() gives that compaction up, so it needs no gate), then copies and verifies
the snapshot; ``prune_old_backups()`` (every mode) fully checks the backups. Those parts hold the backup
folder's lock but not the manager's, so the bot's other threads go on changing the state meanwhile. close()
used to be kept from releasing the writer lock under them by the manager's lock; now it is kept by this gate,
which they pass with the folder held: close() shuts it (every operation that comes later is refused with
ManagerClosedError) and waits for the operations running on other threads to end.

Nothing that runs behind the gate waits for the manager's lock without a bound (a holder of it may be closing
the manager from an event handler, and waiting here), and no event handler runs there: the operation's events
go out once it left the gate and the folder (``ManagerFiles.deferred_events``). An operation on close()'s own
thread is not waited for: it could not end before close() returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("posstate")

#: How often close() says it is still waiting for an operation on another thread (seconds).
NOTICE_EVERY = 30.0

__all__ = ["OpGate"]


class OpGate:
    """Counts the explicit operations running outside the manager's lock, per thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[int, int] = {}  # thread ident -> operations it runs (nested: an event handler's)
        self._shut = False
        #: Threads waiting in :meth:`shut` (for tests: close() is waiting).
        self.waiting = 0

    @property
    def closing(self) -> bool:
        """close() has begun."""
        return self._shut

    def check(self, refuse: Callable[[], None]) -> None:
        """Before waiting for the backup folder: *refuse* raises at once when close() has begun (:meth:`running`
        is the real gate; this only spares a late call the wait)."""
        if self._shut:
            refuse()

    @contextlib.contextmanager
    def running(self, refuse: Callable[[], None]) -> Iterator[None]:
        """One explicit operation on this thread; *refuse* raises when close() has begun."""
        me = threading.get_ident()
        with self._cond:
            if self._shut:
                refuse()
                raise AssertionError("refuse() must raise")  # pragma: no cover
            self._running[me] = self._running.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._running[me] - 1
                if left:
                    self._running[me] = left
                else:
                    del self._running[me]
                self._cond.notify_all()

    def shut(self, path: Path) -> None:
        """close(): refuse new operations, then wait for those on other threads (as long as they run, as
        close() always waited for the manager's lock they used to hold; a notice every :data:`NOTICE_EVERY`)."""
        me = threading.get_ident()
        with self._cond:
            self._shut = True
            self.waiting += 1
            try:
                while not self._cond.wait_for(lambda: not (self._running.keys() - {me}), NOTICE_EVERY):
                    log.warning("%s: close() waits for a backup or prune still running on another thread", path)
            finally:
                self.waiting -= 1
