"""ManagerFiles: the manager seen through :class:`~posstate.backup.files.StateFiles`.

Backups, recovery and repair (``posstate.backup``) work on that small interface; this adapter is the only
place that maps it onto the manager's in-memory state, its journal and its commit path. It holds no state of
its own except the two backup bookkeeping values the backup layer owns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from posstate.backup.files import CompactionAsk
from posstate.core.config import StateConfig
from posstate.core.errors import (
    ManagerClosedError,
    OutcomeUnknownError,
    PersistenceError,
    PosStateError,
    StateLockedError,
)
from posstate.journal.journal import Journal
from posstate.model.document import StateData
from posstate.model.ops import Entries
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions

if TYPE_CHECKING:
    from posstate.backup.background import BackupService
    from posstate.backup.verified import RemoteChecks
    from posstate.manager.manager import PositionStateManager


#: How often acknowledged() drains the group journal outside the manager's lock before it drains under it.
_SETTLE_TRIES = 3
#: How often fold_journal() syncs the group journal outside the manager's lock before its rotation syncs under it.
_FOLD_TRIES = 20
#: How long acknowledged() and confirm_copy() wait for the manager's lock before giving up (seconds).
_LOCK_WAIT = 2.0


class ManagerFiles:
    """Implements StateFiles for one manager; every call runs under the manager's lock, except those whose
    docstring (here or in StateFiles) says otherwise."""

    __slots__ = ("_deferred", "_m", "backups", "last_backup_at", "tombstone_floor")

    def __init__(self, manager: PositionStateManager) -> None:
        self._m = manager
        self._deferred = threading.local()  # .events: this thread's events held back (deferred_events)
        self.last_backup_at: float | None = None  # creation time of the newest backup (None: not looked yet)
        self.tombstone_floor: int | None = None  # generation of the oldest backup kept (None: unknown)
        self.backups: BackupService | None = None  # the background backup thread (started on the first save)

    @property
    def config(self) -> StateConfig:
        return self._m.config

    @property
    def read(self) -> ReadOptions:
        return self._m._read

    @property
    def write_keyring(self) -> Keyring | None:
        return self._m._write_keyring

    @property
    def journal(self) -> Journal:
        return self._m._journal

    @property
    def highest_generation(self) -> int:
        return self._m._highest_generation

    def emit(self, event: str, data: dict[str, Any]) -> None:
        held: list[tuple[str, dict[str, Any]]] | None = getattr(self._deferred, "events", None)
        if held is not None:
            held.append((event, data))
            return
        self._m._events.emit(event, data)

    @contextlib.contextmanager
    def deferred_events(self) -> Iterator[None]:
        """The events this thread emits through these files wait until the block ends, then go out in order
        (issue 14.3): an explicit operation outside the manager's lock runs no handler while it holds the
        backup folder or is counted by close()'s gate, so a handler that takes the manager's lock, asks for
        a backup or closes the manager never waits for the operation it runs in (nor prunes after close())."""
        if getattr(self._deferred, "events", None) is not None:
            yield  # nested: the outer block sends them
            return
        held: list[tuple[str, dict[str, Any]]] = []
        self._deferred.events = held
        try:
            yield
        finally:
            self._deferred.events = None
            for event, data in held:
                self._m._events.emit(event, data)

    def snapshot(self) -> StateData | None:
        return self._m._state if self._m._loaded else None

    def unsaved(self) -> bool:
        return self._m._dirty

    def ensure_loaded(self) -> None:
        self._m._ensure_loaded()

    def save(self) -> int:
        return self._m.save()

    def fold_journal(self) -> int:
        m = self._m
        if owned(m._lock) or threading.current_thread() is m._bg_thread or owned(getattr(self.backups, "folder_lock", None)):
            # An event handler of a locked call, of the compaction thread, or of the backup thread (which holds
            # the folder a compaction thread's handler may wait for): it cannot wait for a compaction. A save.
            with m._lock:
                m._ensure_loaded()
                if m._dirty:
                    m.save()
                return m._state.generation
        with m._lock:
            m._check_writable("create_backup")
            m._ensure_loaded()
            if not m._dirty:
                return m._state.generation  # the state file holds memory (the last save or load)
            # Every change acknowledged so far has a revision at or below memory's generation, and a snapshot
            # holds exactly the changes made before its rotation, whose generation is above all of them.
            least = m._state.generation + 1
        try:
            self._fold_from(least)
        except OSError as exc:
            raise PersistenceError(
                m.path,
                operation="fold the journal into a snapshot before a backup",
                cause=exc,
                outcome="the state file and the journal segments are intact; the compaction is retried",
                next_step="fix the disk (space, permissions) and call create_backup() again",
            ) from exc
        return least

    def _fold_from(self, least: int) -> None:
        """Until a snapshot of generation *least* or above is durable (or memory was saved): rotate when no
        compaction is pending, wait for the pending one without any lock. Group mode: a rotation waits for
        the records written before it; they are synced outside the manager's lock (a few tries, then under
        it: one sync, bounded), never a snapshot of memory written under it."""
        m = self._m
        journal = m._journal
        tries = 0
        while True:
            journal.drain()  # group mode: records written so far become durable, without the manager's lock
            with m._lock:
                m._check_writable("create_backup")  # closed meanwhile (close() gave the compaction up), doubt
                if not m._dirty:
                    return  # saved (a snapshot above *least*) or reloaded since: the copy checks the file
                job = m._bg_job
                if job is None:
                    if journal.records == 0 and not journal.failed:
                        return  # nothing after the last rotation, whose snapshot is durable and holds the call's changes
                    if not journal.settled() and not journal.failed and tries < _FOLD_TRIES:
                        tries += 1
                        journal.rotation_wanted = True  # a writer that finds the journal settled rotates first
                        continue
                    journal.drain()  # the last try: one sync under the lock, so no writer appends meanwhile
                    m._rotate_journal()
                    job = m._bg_job
                    if job is None:  # no rotation possible (no open segment, a failed journal): as compact() does
                        m._commit(m._state.copy(), dict(m._entries))
                        return
            m._await_job(job)  # raises what a failed attempt raised (the compaction stays pending, retried)
            if job.generation >= least:
                return  # its snapshot is durable (or a save, a load or close gave it up: checked above, then by the copy)

    def confirm_copy(self) -> None:
        m = self._m
        # Bounded: the caller holds the backup folder and is counted by close()'s gate, which a holder of the
        # manager's lock may be waiting for (a handler that asks for a backup, or closes the manager).
        if not m._lock.acquire(timeout=_LOCK_WAIT):
            if m._ops.closing:  # close() from a handler of a call that holds the lock, waiting for this backup
                raise ManagerClosedError(m.path)
            raise StateLockedError(
                m.path,
                pid=None,
                host=None,
                reason=f"the manager's lock stayed busy for {_LOCK_WAIT:g} s while a backup confirmed the snapshot it "
                "copied (a long transaction, or an event handler that holds it); no backup was taken",
                next_step="call create_backup() again",
            )
        try:  # no save is in flight now: one that renamed its file and then failed left its outcome in doubt
            if m._doubt is not None:
                raise OutcomeUnknownError(m.path, operation=m._doubt)
        finally:
            m._lock.release()

    def read_current(self) -> StateData:
        return self._m._read_current()

    def check_account(self, state: StateData) -> None:
        self._m._check_account(state)

    def adopt(self, state: StateData, checksum: str | None) -> tuple[StateData, Entries]:
        m = self._m
        m._adopt(state, checksum)
        return m._state.copy(), dict(m._entries)

    def commit(self, state: StateData, entries: Entries) -> int:
        return self._m._commit(state, entries)

    def raise_generation(self, at_least: int) -> None:
        self._m._highest_generation = max(self._m._highest_generation, at_least)

    def set_loaded(self, loaded: bool) -> None:
        self._m._loaded = loaded

    def acknowledged(self) -> StateData | None:
        """A copy of memory holding durable changes only, or None (nothing loaded, a transaction open, a failed
        sync). Group mode: pending records are made durable *outside* the manager's lock (the bot's threads
        never wait for an fdatasync behind a backup); the lock is held for the copy alone, taken only when no
        record was written since (a few tries, then the drain is done under the lock: bounded)."""
        m = self._m
        journal = m._journal
        for attempt in range(_SETTLE_TRIES):
            try:
                journal.drain()  # group mode: make what memory holds durable, without the manager's lock
            except PosStateError:
                return None
            # Bounded: the caller holds the backup folder, and a lock holder may be waiting for that folder
            # (create_backup() inside transaction()): giving up this turn is what breaks the cycle.
            if not m._lock.acquire(timeout=_LOCK_WAIT):
                return None
            try:
                if not m._loaded or m._closed or m._doubt is not None or m._txn is not None:
                    return None
                if not journal.settled():
                    if attempt + 1 < _SETTLE_TRIES:
                        continue  # a writer appended meanwhile: drain again outside the lock
                    try:
                        journal.drain()  # the last try: under the lock, so no writer can append again
                    except PosStateError:
                        return None
                if journal.failed:
                    return None
                st = m._state.copy()
                # Under the lock: a record appended after the copy must not be counted as folded into it.
                jid, last_seq = journal.journal_id, journal.last_seq
            finally:
                m._lock.release()
            break
        else:  # pragma: no cover - every path above returns or breaks
            return None
        if st.journal is not None and jid is not None:
            if st.journal.get("id") == jid:
                st.journal = {**st.journal, "seq": max(int(st.journal.get("seq", 0)), last_seq)}
            else:
                # Records go to another segment than memory's journal entry names: the ``.next`` segment of a
                # pending (or given up) background compaction (issue 14). Memory holds every record up to
                # last_seq, so the backup names that segment and its last record: a recovery from it replays
                # only what follows (never the old segment's records again), and the segment is found
                # whether its compaction finished (renamed over the journal) or not (``.next``).
                st.journal = {"id": jid, "seq": last_seq}
        return st

    def request_compaction(self) -> CompactionAsk:
        """Issue 14.2: the rotation the journal thresholds start (the snapshot is written by the background
        compaction), unless one is pending or finishing. The journal is told a rotation is wanted, so the next
        change rotates under the lock it holds anyway (O(1)); when the manager is idle the rotation is made
        here. Group mode: records waiting for their sync are synced first, outside the manager's lock. The
        manager's lock is never waited for: the caller holds the backup folder, which a holder of the
        manager's lock may want next (create_backup() from a transaction or an event handler)."""
        m = self._m
        pending = _pending(m)
        if pending is not None:  # without the manager's lock: a timer's poll costs the bot nothing
            return pending
        journal = m._journal
        if not journal.active:
            return CompactionAsk("refused", reason="no journal")
        journal.rotation_wanted = True  # busy writers rotate at their next change (group: whenever one can)
        try:
            journal.drain()
        except PosStateError as exc:
            return CompactionAsk("refused", reason=f"journal sync failed ({exc})")
        if not m._lock.acquire(blocking=False):
            return CompactionAsk("refused", reason="the manager is busy (its next change rotates)")
        try:
            if not m._loaded or m._closed or m._doubt is not None or m._txn is not None:
                return CompactionAsk("refused", reason="no state to compact now")
            pending = _pending(m)
            if pending is not None:
                return pending
            if not journal.spare_ready and journal.spare_error is None:
                journal.want_spare()  # issue 14.3: the bot's next change must not create the segment's file
                if journal._spare_busy:
                    return CompactionAsk("refused", reason="the next segment's file is being prepared", again=True)
            m._rotate_journal()
            job = m._bg_job
            if job is None:
                return CompactionAsk("refused", reason="the journal cannot rotate now (records wait for their sync)", again=True)
            return CompactionAsk("started", generation=job.generation)
        finally:
            m._lock.release()

    def wrote(self, checksum: str) -> bool:
        return checksum in self._m._expected_on_disk

    def expect_on_disk(self, checksum: str | None) -> None:
        self._m._expected_on_disk = {checksum}

    def remote_checks(self) -> RemoteChecks | None:
        return self._m._remote_checks()


def owned(lock: object) -> bool:
    """This thread holds *lock* (an RLock)."""
    is_owned = getattr(lock, "_is_owned", None)
    return bool(is_owned is not None and is_owned())


def _pending(m: PositionStateManager) -> CompactionAsk | None:
    """The background compaction pending (or a finished one whose after-save hook still runs), or None."""
    with m._bg_cond:
        job = m._bg_job
        finishing = job is None and m._bg_thread is not None
    if job is not None:
        return CompactionAsk(
            "pending",
            generation=job.generation,
            attempts=job.attempts,
            error=None if job.error is None else str(job.error),
        )
    return CompactionAsk("pending") if finishing else None
