"""ManagerFiles: the manager seen through :class:`~posstate.backup.files.StateFiles`.

Backups, recovery and repair (``posstate.backup``) work on that small interface; this adapter is the only
place that maps it onto the manager's in-memory state, its journal and its commit path. It holds no state of
its own except the two backup bookkeeping values the backup layer owns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
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

    def wrote(self, checksum: str) -> bool:
        return checksum in self._m._expected_on_disk

    def expect_on_disk(self, checksum: str | None) -> None:
        self._m._expected_on_disk = {checksum}

    def remote_checks(self) -> RemoteChecks | None:
        return self._m._remote_checks()
