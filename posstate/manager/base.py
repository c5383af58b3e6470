"""The manager's lifecycle: its attributes, the writer lock, events, close, and what a fork does to it.

PositionStateManager is built as a chain of classes, one concern each, every one adding to the one before:
ManagerCore (here) -> StateLoading (loading.py) -> DurableCommit (commit.py) -> BackgroundCompaction
(compaction.py) -> InMemoryChanges (changes.py) -> StateMaintenance (admin.py) -> AsyncChanges (aio.py) ->
PositionStateManager (manager.py).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from posstate.backup.files import StateFiles
from posstate.core.config import StateConfig
from posstate.core.errors import (
    ManagerClosedError,
    MissingKeyError,
    OutcomeUnknownError,
    PersistenceError,
    PosStateError,
    TransactionError,
)
from posstate.core.events import EventBus, Handler, StatsLogger
from posstate.journal import journal as _journal
from posstate.manager import periodic as _periodic
from posstate.manager.files import ManagerFiles
from posstate.manager.opgate import OpGate
from posstate.model import ops as _jops
from posstate.model.document import StateData
from posstate.model.position import Position
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import unknown as _unknown
from posstate.storage.crypto import Keyring
from posstate.storage.lock import WriterLock, forked_error

if TYPE_CHECKING:
    from posstate.backup.recovery import RecoveryReport
    from posstate.manager.manager import PositionStateManager
    from posstate.replica.attach import Replication
    from posstate.storage.validate import ValidationReport

log = logging.getLogger("posstate")
_M = TypeVar("_M", bound="ManagerCore")

PositionsInput = Iterable[Position] | Mapping[Any, Position]

# Managers alive in this process: a forked child turns each into a closed one that never writes (issue 12.6).
_live: weakref.WeakSet[ManagerCore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for m in list(_live):
        m._orphan()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ManagerCore:
    """Attributes, lifecycle and events of a manager (see :class:`~posstate.PositionStateManager`)."""

    _files: StateFiles

    def __init__(
        self,
        config: StateConfig | None = None,
        *,
        key: bytes | str | None = None,
        passphrase: str | None = None,
        stats_logger: StatsLogger | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else StateConfig()
        self._path = cfg.state_path
        keyring = Keyring.resolve(key=key, passphrase=passphrase)
        if cfg.encryption and keyring is None:
            raise MissingKeyError(self._path)
        self._keyring = keyring
        self._write_keyring = keyring if cfg.encryption else None
        self._read = _statefile.ReadOptions(
            keyring=keyring,
            max_document_bytes=cfg.max_document_bytes,
            clock_skew=cfg.clock_skew,
            require_encryption=cfg.encryption,
        )
        self._events = EventBus(stats_logger)
        self._lock = threading.RLock()
        self._ops = OpGate()  # explicit backups and prunes outside the lock: close() waits for them (issue 14.3)
        self._closed = False
        self._state = StateData()
        self._entries: _jops.Entries = {}
        self._loaded = False
        self._dirty = False
        #: Moved on (under the lock) by every change to the state in memory, undone ones too: a reader in
        #: another thread (``serve()``) copies the state only when it moved (state_copy(since=...)).
        self._change_mark = 0
        # Trailer checksums the main file may legitimately have (None: no file). Anything else on disk at
        # save time was written by someone who bypassed the lock.
        self._expected_on_disk: set[str | None] = set()
        self._highest_generation = 0
        #: The report of the last automatic recovery (see docs/RECOVERY.md), or None.
        self.last_recovery: RecoveryReport | None = None
        # What backups, recovery and repair see of this manager (posstate.backup works on that interface only).
        self._files = ManagerFiles(cast("PositionStateManager", self))
        self._validator: _periodic.PeriodicValidator | None = None
        # Set when a failed change may still be on disk (PersistenceError.outcome_unknown): from then on every
        # writer raises OutcomeUnknownError until the manager is reopened. Holds the operation that failed.
        self._doubt: str | None = None
        # Write-ahead journal (docs/JOURNAL.md): records each change durably in the "sync"/"group" modes.
        self._journal = _journal.Journal(
            cfg.journal_path,
            mode=cfg.durability,
            quarantine_dir=cfg.quarantine_dir,
            read_keyring=keyring,
            write_keyring=self._write_keyring,
            max_bytes=cfg.journal_max_bytes,
            max_records=cfg.journal_max_records,
            preallocate=cfg.journal_preallocate,
            emit=self._events.emit,
            legacy_path=cfg.legacy_journal_path,
            on_unknown=self._note_unknown,
        )
        self._txn: list[tuple[_jops.Op, _jops.Undo]] | None = None
        # Who opened the transaction (thread, asyncio task): another task of the same thread re-enters the lock,
        # and must never have its changes folded into a block it does not own (issue 12.9).
        self._txn_owner: tuple[int, object] | None = None
        try:
            fs.ensure_dir(cfg.state_dir)
        except OSError as exc:
            raise PersistenceError(cfg.state_dir, operation="create state directory", cause=exc) from exc
        self._writer_lock = WriterLock(cfg.lock_path, state_path=self._path, timeout=cfg.lock_timeout)
        self._journal.guard = self._writer_lock.check  # before each record and group sync: still the owner?
        self._forked = False
        _live.add(self)
        # Off the machine (docs/REPLICATION.md): the lease, a takeover's restore, the shipper thread.
        self._replica: Replication | None = None
        try:
            self._sweep_temps()
            if cfg.replica_url is not None:
                from posstate.replica.attach import Replication

                journal = self._journal
                self._replica = Replication(cfg, emit=self._events.emit, journal_size=lambda: journal.size, options=self._read)
                self._journal.guard = self._replica.guarded(self._writer_lock.check)
        except BaseException:
            self._writer_lock.release()
            raise
        self._validator = _periodic.start_for(
            self.validate_state, enabled=cfg.validation_enabled and cfg.periodic_validation, interval=cfg.validation_interval
        )

    def __repr__(self) -> str:
        key = self._keyring.key_id if self._keyring is not None else "none"
        return (
            f"PositionStateManager(path={str(self._path)!r}, generation={self._state.generation}, "
            f"key_id={key}, closed={self._closed})"
        )

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def generation(self) -> int:
        """Generation of the state in memory: the last one loaded or saved, moved on by every acknowledged
        journaled change (``durability="sync"``/``"group"``) to that change's revision. Pass it to
        ``save(expected_generation=...)``."""
        return self._state.generation

    @property
    def dirty(self) -> bool:
        """True when the in-memory state has changes not yet saved."""
        return self._dirty

    @property
    def closed(self) -> bool:
        return self._closed

    def on(self, event: str, handler: Handler) -> None:
        self._events.on(event, handler)

    def off(self, event: str, handler: Handler | None = None) -> None:
        self._events.off(event, handler)

    def close(self) -> None:
        """Release the writer lock. Unsaved changes are not written (call :meth:`save` first).

        In a forked child of the process that created the manager this does nothing to the files and
        leaves the parent's lock held."""
        if self._closed:
            return
        if not self._writer_lock.held:  # a fork the at-fork hook did not see (forked from C)
            self._orphan()
            return
        self._ops.shut(self._path)  # create_backup()/prune_old_backups() past the gate (outside the lock) end first
        if self._files.backups is not None:  # before the lock: a backup's event handler may need it
            if self._loaded and self._doubt is None:
                self._files.backups.final_backup()  # journaled changes no backup holds yet (issue 15.2)
            self._files.backups.close()  # bounded wait; says what it left (docs/RECOVERY.md)
        with self._lock:
            if self._closed:
                return
            if not self._finish_compaction(timeout=self._close_wait):
                log.warning(
                    "%s: closed while a background compaction was still writing (waited %.0f s); the journal segments "
                    "stay on disk and the next load replays them",
                    self._path,
                    self._close_wait,
                )
            if self._loaded and self._journal.failed:
                # A group sync failed: fold memory (without the failed changes) into a snapshot, so the
                # journal is redundant whatever its tail holds. Best effort: the disk may still be failing.
                try:
                    self._commit(self._state.copy(), dict(self._entries))
                except (PosStateError, OSError) as exc:
                    log.warning("%s: snapshot at close after a failed group sync failed (%s)", self._path, exc)
            self._closed = True
            self._journal.close()
            self._on_close()
            self._writer_lock.release()

    def _on_close(self) -> None:
        """Hook for subclasses and mixins (background validation, journal) to stop their work."""
        if self._validator is not None:
            self._validator.stop()
        if self._replica is not None:
            left = self._replica.close(self.config.replica_close_timeout)
            if left is not None:
                log.warning("%s: closed with replication behind: %s", self._path, left)
            self._events.emit("replicaClosed", {"path": str(self._path), "left_behind": left})

    def flush_replica(self, timeout: float | None = None) -> bool:
        """Wait until everything acknowledged so far is in the replica (a listing confirms it); True when it
        is, False when *timeout* (seconds) passed first or shipping stopped. True at once without a replica."""
        if self._replica is None:
            return True
        with self._lock:
            self._check_open()
            self._journal.drain()  # group mode: acknowledged records are on disk before the shipper reads them
        return self._replica.flush(timeout)

    def replica_status(self) -> dict[str, Any] | None:
        """The replication lag as this manager sees it (records and seconds not yet shipped), or None."""
        return self._replica.status() if self._replica is not None else None

    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise forked_error(self._path, owner=self._writer_lock.owner_pid)
            raise ManagerClosedError(self._path)

    def _orphan(self) -> None:
        """In a forked child: refuse every call from now on, and never touch the files or the lock (flock is
        shared with the parent; closing the child's copies of the descriptors leaves it held)."""
        self._lock = threading.RLock()  # another thread of the parent may have held it at fork()
        self._ops = OpGate()
        self._forked = True
        self._closed = True

    def _check_writable(self, what: str | None = None) -> None:
        """Before a change: the manager is open, no earlier change's outcome is unknown, and (*what* given:
        a writer that cannot run inside a transaction) no transaction is open in this thread."""
        self._check_open()
        if self._doubt is not None:
            raise OutcomeUnknownError(self._path, operation=self._doubt)
        if what is not None and self._txn is not None:
            raise TransactionError(self._path, f"{what} cannot run inside transaction()")

    def _note_unknown(self, entry: dict[str, Any]) -> bool:
        """A failed change may still be on disk: refuse every later change, and record it for the next load.
        Called without the manager's lock (a group-commit leader); returns True if the record is durable."""
        self._doubt = str(entry.get("operation", "change"))
        return _unknown.record(self._path, entry)

    def _sweep_temps(self) -> None:
        """Set aside temp files a crashed writer left. We hold the lock, so no manager writes one; but the
        compaction worker of a bot killed with SIGKILL can outlive it, notice, and remove its own temp while
        this runs: a temp gone meanwhile is no error (what was linked into quarantine stays there)."""
        for tmp in _atomic.stale_temps(self._path):
            try:
                st = fs.lstat(tmp)
                if st.st_size == 0 or _atomic.same_file(tmp, self._path) or _atomic.same_file(tmp, self.config.bak_path):
                    fs.unlink(tmp)  # empty, or a second name of a file that is still there: redundant
                    log.info("removed leftover temp file %s", tmp)
                else:
                    dest = _atomic.move_aside(tmp, self.config.quarantine_dir, label="leftover")
                    log.info("moved leftover temp file %s to %s", tmp, dest)
            except FileNotFoundError as exc:
                if fs.exists(tmp):  # another path is missing (the quarantine's, the directory): a real failure
                    raise PersistenceError(tmp, operation="clean up leftover temp file", cause=exc) from exc
                log.info("leftover temp file %s was removed meanwhile (an orphaned compaction worker)", tmp)
            except OSError as exc:
                raise PersistenceError(tmp, operation="clean up leftover temp file", cause=exc) from exc

    #: How long close() waits for a background compaction in flight (manager/compaction.py).
    _close_wait = 30.0

    def _halt_compaction(self, *, timeout: float | None = None) -> bool:
        """Give up a pending background compaction (manager/compaction.py); True when none is in flight."""
        return True

    def _finish_compaction(self, *, timeout: float) -> bool:
        """close(): let a pending background compaction finish (at most *timeout*), then stop it."""
        return True

    if TYPE_CHECKING:  # defined further down the chain (manager/commit.py, manager/admin.py)

        def _commit(self, st: StateData, entries: _jops.Entries) -> int: ...

        def validate_state(self, positions: PositionsInput | None = None) -> ValidationReport: ...
