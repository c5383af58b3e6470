"""PositionStateManager: the in-memory state, its one writer lock, and the durable save/load path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from posstate.backup import ops as _backup_ops
from posstate.backup import recovery as _recovery
from posstate.backup import repair as _repair
from posstate.backup.backups import BackupInfo
from posstate.backup.ops import RestoreResult
from posstate.backup.recovery import RecoveryReport
from posstate.backup.repair import RepairReport
from posstate.backup.retention import PruneResult
from posstate.core.config import StateConfig
from posstate.core.errors import (
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    OutcomeUnknownError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    TransactionError,
)
from posstate.core.events import EventBus, Handler, StatsLogger
from posstate.journal import journal as _journal
from posstate.manager import periodic as _periodic
from posstate.manager.files import ManagerFiles
from posstate.model import document as _document
from posstate.model import merge as _merge
from posstate.model import ops as _jops
from posstate.model.document import StateData
from posstate.model.merge import MergeResult
from posstate.model.position import Position, PositionKey, Side, check_key
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import unknown as _unknown
from posstate.storage.crypto import Keyring
from posstate.storage.lock import WriterLock, forked_error
from posstate.storage.validate import ValidationIssue, ValidationReport, validate_file

log = logging.getLogger("posstate")

PositionsInput = Iterable[Position] | Mapping[Any, Position]

# Managers alive in this process: a forked child turns each into a closed one that never writes (issue 12.6).
_live: weakref.WeakSet[PositionStateManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for m in list(_live):
        m._orphan()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PositionStateManager:
    """Crash-safe, encrypted, backed-up position state for one bot.

    Creating a manager takes the state directory's writer lock (a second writer gets
    :class:`~posstate.StateLockedError`) and sets aside temp files a crash left behind. The state is read on
    first use. Every save is atomic and durable when it returns; a failed save leaves the previous file
    intact and the in-memory state unchanged. All methods are thread-safe.
    """

    def __init__(
        self,
        config: StateConfig | None = None,
        *,
        key: bytes | None = None,
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
        self._closed = False
        self._state = StateData()
        self._entries: dict[PositionKey, dict[str, Any]] = {}
        self._loaded = False
        self._dirty = False
        # Trailer checksums the main file may legitimately have (None: no file). Anything else on disk at
        # save time was written by someone who bypassed the lock.
        self._expected_on_disk: set[str | None] = set()
        self._highest_generation = 0
        #: The report of the last automatic recovery (see docs/RECOVERY.md), or None.
        self.last_recovery: RecoveryReport | None = None
        # What backups, recovery and repair see of this manager (posstate.backup works on that interface only).
        self._files = ManagerFiles(self)
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
        try:
            self._sweep_temps()
        except BaseException:
            self._writer_lock.release()
            raise
        self._validator = _periodic.start_for(
            self.validate_state, enabled=cfg.validation_enabled and cfg.periodic_validation, interval=cfg.validation_interval
        )

    # ------------------------------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        key = self._keyring.key_id if self._keyring is not None else "none"
        return (
            f"PositionStateManager(path={str(self._path)!r}, generation={self._state.generation}, "
            f"key_id={key}, closed={self._closed})"
        )

    def __enter__(self) -> PositionStateManager:
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
        with self._lock:
            if self._closed:
                return
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

    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise forked_error(self._path, owner=self._writer_lock.owner_pid)
            raise ManagerClosedError(self._path)

    def _orphan(self) -> None:
        """In a forked child: refuse every call from now on, and never touch the files or the lock (flock is
        shared with the parent; closing the child's copies of the descriptors leaves it held)."""
        self._lock = threading.RLock()  # another thread of the parent may have held it at fork()
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

    # ------------------------------------------------------------------------------------------ reading
    def load_positions(self) -> dict[PositionKey, Position]:
        """Read the state file (fully validated) into memory and return its positions.

        A missing file with no ``.bak`` and no backups is a fresh start; a missing file while either exists
        raises :class:`~posstate.CorruptStateError`, never an empty state.
        """
        with self._lock:
            self._check_writable("load_positions")  # a load may write (recovery, or a change in doubt)
            loaded = self._load_main()
            return dict(loaded.positions)

    def _load_main(self) -> StateData:
        self._writer_lock.check()  # a load may cut a torn journal tail or quarantine files
        before = self.last_recovery
        state = self._load_snapshot()
        doubts = _unknown.pending(self._path)
        if doubts:
            state = self._report_unknown(doubts, recovered=self.last_recovery is not before)
        return state

    def _report_unknown(self, doubts: list[dict[str, Any]], *, recovered: bool) -> StateData:
        """Report the changes an earlier manager could not prove undone (event ``outcomeUnknown`` and
        ``last_recovery.unknown_outcomes``), each with whether this load found it on disk; once this load's
        state is durable (a save), forget them (docs/JOURNAL.md, "Outcome unknown")."""
        loaded = self._state.generation
        replayed = self._journal.replayed
        changes = []
        for d in doubts:
            found: bool | None = None
            if recovered:
                found = None  # recovery chose among several copies: whether the change is in it is not known
            elif d.get("kind") == "journal":
                found = (
                    replayed is not None
                    and replayed[0] == d.get("journal_id")
                    and replayed[1] <= int(d.get("seq_hi", 0))
                    and int(d.get("seq_lo", 0)) <= replayed[2]
                )
            elif d.get("kind") == "snapshot":
                found = loaded >= int(d.get("generation", 0))
            changes.append({**d, "found_on_disk": found})
        generation = loaded
        cleared = False
        try:
            generation = self._commit(self._state.copy(), dict(self._entries))  # what was loaded is now durable
            _unknown.clear(self._path)
            cleared = True
        except (PosStateError, OSError) as exc:
            log.warning("%s: could not make the loaded state durable; the change in doubt stays recorded (%s)", self._path, exc)
        report = self.last_recovery if recovered else None
        if report is None:
            report = RecoveryReport(
                source="state file",
                source_path=self._path,
                generation=loaded,
                new_generation=generation,
                age=0.0,
                generations_lost=0,
                reason="a change reported as failed may have reached the disk (its outcome was unknown)",
            )
        self.last_recovery = dataclasses.replace(report, unknown_outcomes=tuple(changes))
        self._events.emit(
            "outcomeUnknown", {"path": str(self._path), "generation": generation, "changes": changes, "cleared": cleared}
        )
        log.warning("%s: %d change(s) whose outcome was unknown: %s", self._path, len(changes), changes)
        return self._state

    def _load_snapshot(self) -> StateData:
        started = time.perf_counter()
        fresh = not fs.exists(self._path)
        try:
            state = self._read_current()
        except CorruptStateError as exc:
            if exc.kind in ("account", "not-a-regular-file"):
                raise  # another account's state, or a FIFO/device/directory there: not damage, nothing to recover
            self._events.emit("stateCorrupted", {"path": str(self._path), "reason": exc.reason, "kind": exc.kind})
            return self._recovered(exc, started)
        except SchemaValidationError as exc:
            self._events.emit(
                "validationError", {"path": str(self._path), "json_path": exc.json_path, "rule": exc.rule, "reason": exc.detail}
            )
            self._events.emit("stateCorrupted", {"path": str(self._path), "reason": str(exc), "kind": "invalid"})
            return self._recovered(exc, started)
        except PersistenceError as exc:
            self._events.emit("persistenceError", {"path": str(self._path), "operation": exc.operation, "reason": str(exc)})
            raise
        self._events.emit(
            "stateLoaded",
            {
                "path": str(self._path),
                "generation": state.generation,
                "positions": len(state.positions),
                "source": "fresh" if fresh else "file",
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return state

    def _read_current(self) -> StateData:
        """Read the state file, replay its journal and adopt the result; raise the typed error of what is wrong.

        Used by a load and by recovery's re-read, so neither can adopt a snapshot without its journal.
        """
        if not fs.exists(self._path):
            state = self._fresh_or_missing()
            self._journal.recover(state)
            self._adopt(state, None)
            return state
        loaded = _statefile.read(self._path, options=self._read)
        self._check_account(loaded.state)
        replayed_rev = self._journal.recover(loaded.state)
        loaded.state.generation = max(loaded.state.generation, replayed_rev)  # as the changes set it (issue 12.10)
        self._adopt(loaded.state, loaded.checksum)
        # Journal records replayed: memory is ahead of the snapshot, and later generations must exceed their revs.
        self._dirty = replayed_rev > 0
        self._highest_generation = max(self._highest_generation, replayed_rev - 1)
        return loaded.state

    def _recovered(self, exc: PosStateError, started: float) -> StateData:
        """Automatic recovery (docs/RECOVERY.md); raises UnrecoverableStateError when no copy can be trusted."""
        self.last_recovery = report = _recovery.recover(self._files, exc)
        state = self._state
        source = report.source
        self._events.emit(
            "stateLoaded",
            {
                "path": str(self._path),
                "generation": state.generation,
                "positions": len(state.positions),
                "source": f"recovery: {source}",
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return state

    def _fresh_or_missing(self) -> StateData:
        others = [p for p in (self.config.bak_path, self.config.journal_path) if fs.exists(p)] + self._backup_files()
        if others:
            raise CorruptStateError(
                self._path,
                f"state file is missing but {others[0].name} exists (the file was lost, not never written)",
                kind="missing",
            )
        state = StateData()
        if self.config.exchange is not None:
            state.account = {
                "exchange": self.config.exchange,
                "account_id": str(self.config.account_id),
                "mode": self.config.account_mode or "live",
            }
        return state

    def _backup_files(self) -> list[Path]:
        """Timestamped backups on disk (names only; the backups module reads them)."""
        try:
            names = fs.listdir(self.config.backup_path)
        except OSError:
            return []
        return sorted(self.config.backup_path / n for n in names if n.startswith("positions_") and n.endswith(".json"))

    def _check_account(self, state: StateData) -> None:
        cfg = self.config
        if cfg.exchange is None or state.account is None:
            return
        if state.account.get("exchange") != cfg.exchange or state.account.get("account_id") != cfg.account_id:
            raise CorruptStateError(
                self._path,
                f"state belongs to account {state.account.get('account_id')!r} on {state.account.get('exchange')!r}, "
                f"but this manager is configured for {cfg.account_id!r} on {cfg.exchange!r}",
                next_step="check state_file / --state-dir: this is another account's state",
                kind="account",
            )

    def _adopt(self, state: StateData, checksum: str | None) -> None:
        self._state = state
        self._entries = _document.adopt_entries(state)
        self._expected_on_disk = {checksum}
        self._highest_generation = max(self._highest_generation, state.generation)
        self._loaded = True
        self._dirty = False

    def _ensure_loaded(self) -> None:
        self._check_open()
        if not self._loaded:
            self._load_main()

    # ------------------------------------------------------------------------------------------ in memory
    def get_position(self, symbol: str, side: Side) -> Position | None:
        key = check_key(symbol, side)
        with self._lock:
            self._ensure_loaded()
            return self._state.positions.get(key)

    def get_positions(self) -> dict[PositionKey, Position]:
        with self._lock:
            self._ensure_loaded()
            return dict(self._state.positions)

    def set_position(self, position: Position) -> None:
        """Add or replace the position with this (symbol, side); durable at the next save."""
        if not isinstance(position, Position):
            raise SchemaValidationError(None, "$", "type", f"expected a Position, got {type(position).__name__}")
        with self._lock:
            if self._doubt is not None:
                self._check_writable()
            self._ensure_loaded()
            key = (position.symbol, position.side)
            old = self._state.positions.get(key)
            # Same as ``old == position`` (dataclass equality over every field; every field is always in a
            # Position's __dict__), without building two tuples of fifteen fields.
            if (
                old is not None
                and (old is position or (old.__class__ is position.__class__ and old.__dict__ == position.__dict__))
                and key in self._entries
            ):
                return
            op = _jops.set_position(position, self._next_rev())
            if self._txn is None and self._journal.append_now(self._state, self._entries, op):
                self._dirty = True
                self._state.generation = op.json["rev"]  # an acknowledged change moves the generation
                return
            ticket = self._change(op)
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)

    def delete_position(self, symbol: str, side: Side) -> bool:
        """Remove a position (its symbol's metadata stays). Returns False if there was none."""
        key = check_key(symbol, side)
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            if key not in self._state.positions:
                return False
            ticket = self._change(_jops.delete_position(key, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)
        return True

    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> None:
        """Replace the bot's own data for *symbol* (a JSON-able dict; a private copy is kept)."""
        clean = _document.clean_metadata(symbol, data)
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            ticket = self._change(_jops.set_metadata(symbol, clean, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)

    def get_symbol_metadata(self, symbol: str) -> dict[str, Any] | None:
        """A copy of *symbol*'s metadata (editing it changes nothing until you set it), or None."""
        with self._lock:
            self._ensure_loaded()
            found = self._state.metadata.get(symbol)
            return _document.copy_json(found) if found is not None else None

    def get_all_symbol_metadata(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._ensure_loaded()
            return {s: _document.copy_json(d) for s, d in self._state.metadata.items()}

    def delete_symbol_metadata(self, symbol: str) -> bool:
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            if symbol not in self._state.metadata:
                return False
            ticket = self._change(_jops.delete_metadata(symbol, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)
        return True

    # ------------------------------------------------------------------------------------------ journal
    def _change(self, op: _jops.Op) -> int | None:
        """Apply *op* in memory and (journal modes) record it durably; all or nothing. Lock held."""
        if self._txn is not None:
            self._check_txn_owner()
            self._txn.append((op, _jops.apply(self._state, self._entries, op)))
            self._dirty = True
            return None
        return self._record([op])

    def _record(self, ops: list[_jops.Op]) -> int | None:
        self._journal.prepare(self._state, self._entries, compact=self._compact_journal)
        rev = self._next_rev()  # a compaction in prepare() moved the generation on
        for op in ops:
            if op.json["rev"] != rev:
                _jops.restamp(op, rev)
        ticket = self._journal.append(self._state, self._entries, ops)
        self._dirty = True
        if self._journal.active:
            # Each journaled change moves the generation to its revision, so that save(expected_generation=)
            # sees it (docs/JOURNAL.md, "Generation"); a reload computes the same from the records.
            self._state.generation = rev
        return ticket

    def _compact_journal(self) -> int:
        return self._commit(self._state.copy(), dict(self._entries))

    def _rollback_journal(self) -> None:
        with self._lock:
            self._journal.rollback(self._state, self._entries)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group changes into one journal record: all or nothing. An exception inside the block discards
        every change made in it, in memory too. Other threads wait until the block ends."""
        ticket = None
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            if self._txn is not None:  # nested: part of the outer transaction, all or nothing on its own
                self._check_txn_owner()
                mark = len(self._txn)
                try:
                    yield
                except BaseException:
                    for _, u in reversed(self._txn[mark:]):
                        _jops.undo(self._state, self._entries, u)
                    del self._txn[mark:]
                    raise
                return
            self._txn = []
            self._txn_owner = _txn_owner()
            try:
                yield
            except BaseException:
                done, self._txn = self._txn, None
                for _, u in reversed(done):
                    _jops.undo(self._state, self._entries, u)
                raise
            done, self._txn = self._txn, None
            if done:
                for _, u in reversed(done):
                    _jops.undo(self._state, self._entries, u)
                ticket = self._record([op for op, _ in done])
        self._journal.settle(ticket, self._rollback_journal)

    def _check_txn_owner(self) -> None:
        """Inside a transaction (lock held): refuse a change from another asyncio task of this thread, which
        the re-entrant lock lets in while the owner's block waits at an ``await``."""
        if self._txn_owner != _txn_owner():
            raise TransactionError(
                self._path,
                "another asyncio task's transaction() is open (awaiting inside its block); this change cannot join it",
            )

    def _refuse_async_in_txn(self, what: str) -> None:
        """An async writer awaited inside a transaction of this thread would wait for the lock this thread
        holds, forever if the block's own task awaits it (directly, or through wait_for/gather, which run it
        in another task): refuse it at once (issue 12.9)."""
        owner = self._txn_owner
        if self._txn is not None and owner is not None and owner[0] == threading.get_ident():
            raise TransactionError(self._path, f"{what} cannot run inside transaction()")

    def _next_rev(self) -> int:
        return max(self._state.generation, self._highest_generation) + 1

    def _apply_position(self, st: StateData, entries: dict[PositionKey, dict[str, Any]], position: Position) -> None:
        key = position.key
        if st.positions.get(key) == position and key in entries:
            return
        rev = self._next_rev()
        st.positions[key] = position
        st.position_revs[key] = rev
        st.position_tombstones.pop(key, None)
        entries[key] = _document.position_entry(position, rev)

    def _remove_position(self, st: StateData, entries: dict[PositionKey, dict[str, Any]], key: PositionKey) -> bool:
        if key not in st.positions:
            return False
        del st.positions[key]
        st.position_revs.pop(key, None)
        entries.pop(key, None)
        st.position_tombstones[key] = self._next_rev()
        return True

    # ------------------------------------------------------------------------------------------ saving
    def save_positions(self, positions: PositionsInput) -> int:
        """Replace all positions with *positions* and save; returns the new generation.

        Metadata is kept. If the save fails, nothing changes in memory or on disk.
        """
        wanted = _normalize(positions)
        with self._lock:
            self._check_writable("save_positions")
            self._ensure_loaded()
            self._journal.drain()
            st = self._state.copy()
            entries = dict(self._entries)
            for key in [k for k in st.positions if k not in wanted]:
                self._remove_position(st, entries, key)
            for p in wanted.values():
                self._apply_position(st, entries, p)
            return self._commit(st, entries)

    def save(self, *, expected_generation: int | None = None) -> int:
        """Write the in-memory state durably; returns the new generation.

        With *expected_generation* (optimistic concurrency), the save is refused with
        :class:`~posstate.ConcurrentModificationError` unless the state is still at that generation, i.e.
        nobody saved since the caller read :attr:`generation`.
        """
        with self._lock:
            self._check_writable("save")
            self._ensure_loaded()
            if expected_generation is not None and expected_generation != self._state.generation:
                raise ConcurrentModificationError(
                    self._path,
                    expected=expected_generation,
                    found=self._state.generation,
                    reason=(
                        f"save expected generation {expected_generation}, but the state is at generation {self._state.generation}"
                    ),
                )
            self._journal.drain()
            return self._commit(self._state.copy(), dict(self._entries))

    async def asave_positions(self, positions: PositionsInput) -> int:
        self._refuse_async_in_txn("asave_positions")
        return await asyncio.to_thread(self.save_positions, positions)

    async def aload_positions(self) -> dict[PositionKey, Position]:
        self._refuse_async_in_txn("aload_positions")
        return await asyncio.to_thread(self.load_positions)

    async def asave(self, *, expected_generation: int | None = None) -> int:
        self._refuse_async_in_txn("asave")
        return await asyncio.to_thread(lambda: self.save(expected_generation=expected_generation))

    def _commit(self, st: StateData, entries: dict[PositionKey, dict[str, Any]]) -> int:
        """Write *st* as the next generation; adopt it in memory only once it is durable."""
        started = time.perf_counter()
        self._writer_lock.check()
        generation = max(st.generation, self._highest_generation) + 1
        st.generation = generation
        _merge.drop_old_tombstones(st, floor=self._files.tombstone_floor)
        rotation = self._journal.begin_rotation(st)  # compaction: the snapshot names the next journal
        try:
            st, encoded = _statefile.encode(
                st,
                keyring=self._write_keyring,
                compression_level=self.config.compression_level if self.config.compression else None,
                entries=entries,
            )
            self._highest_generation = generation
            saved = st
            # If the new file may be in place although the save failed, memory must hold the same
            # positions and metadata, or the outcome is unknown (see _persistence_failed).
            self._write_main(encoded, differs=lambda: _differs(saved, self._state))
        except BaseException:
            if rotation is not None:
                rotation.abort()
            raise
        if rotation is not None:
            rotation.finish()
        self._state = st
        self._entries = entries
        self._expected_on_disk = {encoded.checksum}
        self._dirty = False
        self._events.emit(
            "stateSaved",
            {
                "path": str(self._path),
                "generation": generation,
                "positions": len(st.positions),
                "bytes": len(encoded.data),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        self._after_save(st)
        return generation

    def _after_save(self, state: StateData) -> None:
        """Hook run after every successful save (timed backups live here)."""
        _backup_ops.after_save(self._files, state)

    def _write_main(self, encoded: Any, *, differs: Callable[[], bool] | None = None) -> None:
        path = self._path
        renamed = False
        try:
            tmp = _atomic.write_temp(path, encoded.data)
            try:
                self._prepare_replace()
            except BaseException:
                _atomic.quiet_unlink(tmp)
                raise
            _atomic.commit(tmp, path)
            renamed = True
            # From here the new file is (or may be) on disk: if verifying it fails, the next save must
            # still recognise it as our own, not as another writer's.
            self._expected_on_disk.add(encoded.checksum)
            if self.config.verify_after_write:
                self._expected_on_disk.add(encoded.checksum)  # renamed: a failed read-back leaves this file on disk
                self._verify_written(encoded)
        except _atomic.WriteFailed as wf:
            if wf.renamed:
                self._expected_on_disk.add(encoded.checksum)
            raise self._persistence_failed(wf.step, wf.cause, renamed=wf.renamed, differs=differs) from wf.cause
        except OSError as exc:
            raise self._persistence_failed("save", exc, renamed=renamed, differs=differs) from exc

    def _persistence_failed(
        self, step: str, cause: OSError, *, renamed: bool = False, differs: Callable[[], bool] | None = None
    ) -> PersistenceError:
        outcome = (
            "the new file is in place but its durability is not confirmed (the previous one is kept as .bak)"
            if renamed
            else "the previous file is intact"
        )
        unknown = renamed and differs is not None and differs()
        if unknown:
            # The new file may survive while memory keeps the old positions: the bot must be told.
            entry = _unknown.snapshot_entry(generation=self._highest_generation, operation=f"save ({step})")
            where = (
                "recorded for the next load to report"
                if self._note_unknown(entry)
                else "recorded in this process only: a reopen in this process reports it, after a restart it will not be reported"
            )
            outcome = (
                f"the outcome is unknown: the new file (generation {self._highest_generation}) may be in place while "
                f"memory keeps the old positions ({where})"
            )
        err = PersistenceError(self._path, operation=step, cause=cause, outcome=outcome, outcome_unknown=unknown)
        self._events.emit(
            "persistenceError",
            {"path": str(self._path), "operation": step, "errno": cause.errno, "reason": str(err), "outcome_unknown": unknown},
        )
        return err

    def _prepare_replace(self) -> None:
        """Check the file on disk is the one we expect, then keep it as ``.bak`` (or quarantine it if damaged)."""
        path = self._path
        try:
            data = fs.read_file(path)
        except FileNotFoundError:
            if None not in self._expected_on_disk:
                raise ConcurrentModificationError(
                    path,
                    expected=self._state.generation,
                    found=None,
                    reason="the state file disappeared since it was loaded (another writer bypassed the lock)",
                ) from None
            return
        recorded = _format.checksum_of(data)
        intact = recorded is not None and hashlib.sha256(data[: -_format.TRAILER_SIZE]).hexdigest() == recorded
        if intact and recorded in self._expected_on_disk:
            _atomic.keep_previous(path, self.config.bak_path)
            return
        if intact:
            found: int | None
            try:
                found = _format.parse_header(data).generation
            except _format.FormatProblem:
                found = None
            raise ConcurrentModificationError(path, expected=self._state.generation, found=found)
        # The file we are about to replace is damaged on disk: keep the good .bak, set the damaged one aside.
        dest = _atomic.move_aside(path, self.config.quarantine_dir, label="damaged")
        self._events.emit(
            "stateCorrupted", {"path": str(path), "reason": "damaged on disk before save", "quarantined": str(dest)}
        )

    def _verify_written(self, encoded: Any) -> None:
        data = fs.read_file(self._path)
        if data != encoded.data:
            raise OSError(5, "file read back differs from what was written")
        try:
            _codec.decode(data, keyring=self._keyring, path=self._path, max_document_bytes=self.config.max_document_bytes)
        except PosStateError as exc:
            raise OSError(5, f"file read back does not decode ({exc})") from exc

    # ------------------------------------------------------------------------------------------ startup
    def _sweep_temps(self) -> None:
        """Set aside temp files a crashed writer left (we hold the lock, so none is in use)."""
        for tmp in _atomic.stale_temps(self._path):
            try:
                st = fs.lstat(tmp)
                if st.st_size == 0 or _atomic.same_file(tmp, self._path) or _atomic.same_file(tmp, self.config.bak_path):
                    fs.unlink(tmp)  # empty, or a second name of a file that is still there: redundant
                    log.info("removed leftover temp file %s", tmp)
                else:
                    dest = _atomic.move_aside(tmp, self.config.quarantine_dir, label="leftover")
                    log.info("moved leftover temp file %s to %s", tmp, dest)
            except OSError as exc:
                raise PersistenceError(tmp, operation="clean up leftover temp file", cause=exc) from exc

    # ------------------------------------------------------------------------------------------ batch save
    def batch_save_positions(self, upserts: PositionsInput = (), *, deletes: Iterable[PositionKey] = ()) -> int:
        """Apply many changes and write them in ONE save; returns the new generation.

        *upserts* (Positions, or a mapping whose values are Positions) are added or replaced; *deletes* are
        ``(symbol, side)`` keys to close (absent keys are ignored). Positions not named stay as they are
        (unlike :meth:`save_positions`, which replaces all). Everything is checked before anything changes;
        if the save fails, nothing changes in memory or on disk.
        """
        wanted = _normalize(upserts)
        gone: list[PositionKey] = []
        for k in deletes:
            if not isinstance(k, tuple) or len(k) != 2:
                raise SchemaValidationError(None, "$.deletes", "type", f"expected (symbol, side) pairs, got {k!r}")
            gone.append(check_key(k[0], k[1]))
        both = set(wanted) & set(gone)
        if both:
            sym, side = sorted(both)[0]
            raise SchemaValidationError(
                None, f"$[{sym}|{side}]", "unique", f"{sym} {side} is both upserted and deleted in a batch"
            )
        with self._lock:
            self._check_writable("batch_save_positions")
            self._ensure_loaded()
            st = self._state.copy()
            entries = dict(self._entries)
            for key in gone:
                self._remove_position(st, entries, key)
            for p in wanted.values():
                self._apply_position(st, entries, p)
            return self._commit(st, entries)

    # ------------------------------------------------------------------------------------------ backups and recovery
    # Thin delegations: the work lives in _backup_ops, _retention, _recovery, _repair and _merge.
    def create_backup(self) -> BackupInfo:
        """Write a verified timestamped backup of the last saved state now (then apply retention)."""
        with self._lock:
            self._check_writable("create_backup")  # in the journal modes it saves first
            return _backup_ops.create(self._files)

    def list_backups(self) -> list[BackupInfo]:
        """Every timestamped backup, newest first, read from headers (damaged ones listed as damaged)."""
        with self._lock:
            self._check_open()
            return _backup_ops.list_all(self._files)

    def validate_backup(self, backup_id: str) -> ValidationReport:
        """Fully validate one backup (id, unique prefix or ``latest``); never writes."""
        with self._lock:
            self._check_open()
            return _backup_ops.validate(self._files, backup_id)

    def prune_old_backups(self, *, dry_run: bool = False) -> PruneResult:
        """Apply retention (docs/RECOVERY.md): remove redundant backups, quarantine damaged ones."""
        with self._lock:
            if dry_run:
                self._check_open()
            else:
                self._check_writable()
            return _backup_ops.prune_backups(self._files, dry_run=dry_run)

    def restore_from_backup(self, backup_id: str, *, accept_older: bool = False) -> RestoreResult:
        """Make a backup (id, unique prefix or ``latest``) the current state, as a new generation.

        Refuses a backup older than ``backup_threshold`` relative to the last save with
        :class:`~posstate.StaleBackupError` unless *accept_older* (stale positions lead to duplicate orders).
        """
        with self._lock:
            self._check_writable("restore_from_backup")
            return _backup_ops.restore(self._files, backup_id, accept_older=accept_older)

    def attempt_recovery(self) -> RecoveryReport | None:
        """Reload the state file, recovering it from the best copy if it cannot be loaded.

        Returns the recovery report, or None when the state file was fine. Unsaved changes are discarded.
        """
        with self._lock:
            self._check_writable("attempt_recovery")
            before = self.last_recovery
            self._load_main()
            return self.last_recovery if self.last_recovery is not before else None

    def repair_state(self) -> RepairReport:
        """Repair a state file that decrypts but fails validation, entry by entry (docs/RECOVERY.md)."""
        with self._lock:
            self._check_writable("repair_state")
            return _repair.repair(self._files)

    def merge_states(self, current: StateData | str, backup: StateData | str) -> MergeResult:
        """Merge two states by per-entry revision (ties go to *current*); nothing is written.

        Each argument is a state, ``"current"`` (the state in memory) or a backup id / prefix / ``latest``.
        """
        with self._lock:
            self._check_open()
            return _merge.merge_states(self._state_for(current), self._state_for(backup))

    def _state_for(self, which: StateData | str) -> StateData:
        if isinstance(which, StateData):
            return which
        if which == "current":
            self._ensure_loaded()
            return self._state.copy()
        info = _backups_resolve(self, which)
        return _statefile.read(info.path, options=self._read, what="backup").state

    # ------------------------------------------------------------------------------------------ validation
    def validate_state(self, positions: PositionsInput | None = None) -> ValidationReport:
        """Validate *positions*, or (by default) the state file on disk, fully; emits stateValidated or
        validationError. Never writes."""
        if positions is not None:
            try:
                _normalize(positions)
            except SchemaValidationError as exc:
                return ValidationReport(
                    path="<positions>",
                    valid=False,
                    contents_checked=True,
                    checks=(),
                    errors=(ValidationIssue(exc.json_path, exc.detail, exc.rule),),
                    error=exc,
                )
            return ValidationReport(path="<positions>", valid=True, contents_checked=True, checks=())
        report = validate_file(self._path, options=self._read)
        if report.valid:
            self._events.emit(
                "stateValidated", {"path": str(self._path), "generation": report.generation, "positions": report.positions}
            )
        else:
            first = report.errors[0] if report.errors else ValidationIssue("$", "contents not checked")
            self._events.emit("validationError", {"path": str(self._path), "json_path": first.path, "reason": first.message})
        return report


def _txn_owner() -> tuple[int, object]:
    """(thread, running asyncio task or None): who is calling."""
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return threading.get_ident(), task


def _differs(a: StateData, b: StateData) -> bool:
    """True when *a* and *b* hold different positions or metadata (what the bot sees)."""
    return a.positions != b.positions or a.metadata != b.metadata


def _backups_resolve(mgr: PositionStateManager, ident: str) -> BackupInfo:
    from posstate.backup.backups import resolve

    return resolve(_backup_ops.list_all(mgr._files), ident, backup_dir=mgr.config.backup_path)


def _normalize(positions: PositionsInput) -> dict[PositionKey, Position]:
    values = positions.values() if isinstance(positions, Mapping) else positions
    out: dict[PositionKey, Position] = {}
    for p in values:
        if not isinstance(p, Position):
            raise SchemaValidationError(None, "$", "type", f"expected Position values, got {type(p).__name__}")
        if p.key in out:
            raise SchemaValidationError(None, f"$[{p.symbol}|{p.side}]", "unique", f"two positions for {p.symbol} {p.side}")
        out[p.key] = p
    return out
