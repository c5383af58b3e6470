"""ManagerFiles: the manager seen through :class:`~posstate.backup.files.StateFiles`.

Backups, recovery and repair (``posstate.backup``) work on that small interface; this adapter is the only
place that maps it onto the manager's in-memory state, its journal and its commit path. It holds no state of
its own except the two backup bookkeeping values the backup layer owns.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from posstate.backup.files import CompactionAsk
from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError, PosStateError
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
#: How long acknowledged() waits for the manager's lock before the backup gives up its turn (seconds).
_LOCK_WAIT = 2.0


class ManagerFiles:
    """Implements StateFiles for one manager; every call runs under the manager's lock."""

    __slots__ = ("_m", "backups", "last_backup_at", "tombstone_floor")

    def __init__(self, manager: PositionStateManager) -> None:
        self._m = manager
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
        self._m._events.emit(event, data)

    def snapshot(self) -> StateData | None:
        return self._m._state if self._m._loaded else None

    def unsaved(self) -> bool:
        return self._m._dirty

    def ensure_loaded(self) -> None:
        self._m._ensure_loaded()

    def save(self) -> int:
        return self._m.save()

    def fold_journal(self) -> None:
        m = self._m
        owned = getattr(m._lock, "_is_owned", None)
        if (owned is not None and owned()) or threading.current_thread() is m._bg_thread:
            with m._lock:  # an event handler of a locked call, or of the compaction thread: a save, as before
                m._ensure_loaded()
                if m._dirty:
                    m.save()
            return
        with m._lock:
            m._ensure_loaded()
            if not m._dirty:
                return
            # A compaction pending now rotated before this call's last changes: wait for it, then for one of
            # our own (a rotation after the call: its snapshot holds every change acknowledged before it).
            rounds = 2 if _pending(m) is not None else 1
        for _ in range(rounds):
            try:
                m.compact(wait=True)  # raises what its attempt raised (the compaction stays pending and retried)
            except PosStateError:
                raise
            except OSError as exc:
                raise PersistenceError(
                    m.path,
                    operation="fold the journal into a snapshot before a backup",
                    cause=exc,
                    outcome="the state file and the journal segments are intact; the compaction is retried",
                    next_step="fix the disk (space, permissions) and call create_backup() again",
                ) from exc

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
