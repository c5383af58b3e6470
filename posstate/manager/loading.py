"""Loading: read the state file and replay its journal into memory, with automatic recovery and the report of
changes whose outcome was unknown.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from posstate.core.errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
)
from posstate.manager.base import ManagerCore
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.model.position import Position, PositionKey
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import unknown as _unknown

log = logging.getLogger("posstate")


class StateLoading(ManagerCore):
    """The read path: from the files to the state in memory."""

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
        self._halt_compaction()  # a reload replaces memory: a pending background compaction is given up
        before = self.last_recovery
        state = self._load_snapshot()
        if self._journal.fold_needed:
            state = self._fold_segments(state)
        doubts = _unknown.pending(self._path)
        if doubts:
            state = self._report_unknown(doubts, recovered=self.last_recovery is not before)
        return state

    def _fold_segments(self, state: StateData) -> StateData:
        """The load replayed the segments of an unfinished background compaction (docs/JOURNAL.md): fold them
        into a snapshot now (the load is O(state) anyway), so the next change starts a single new journal. If
        that save fails the segments stay and the next change compacts (the journal is not continued)."""
        self._journal.fold_needed = False
        try:
            self._commit(self._state.copy(), dict(self._entries))
        except (PosStateError, OSError) as exc:
            log.warning("%s: folding the journal segments after the load failed (%s); the next change retries", self._path, exc)
        return self._state

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
            from posstate.backup.recovery import RecoveryReport

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
        with _document.pause_gc():  # replay allocates per record: no collector pass over the state just loaded
            replayed_rev = self._journal.recover(loaded.state)
        loaded.state.generation = max(loaded.state.generation, replayed_rev)  # as the changes set it (issue 12.10)
        self._adopt(loaded.state, loaded.checksum)
        # Journal records replayed: memory is ahead of the snapshot, and later generations must exceed their revs.
        self._dirty = replayed_rev > 0
        self._highest_generation = max(self._highest_generation, replayed_rev - 1, self._journal.fold_seen)
        return loaded.state

    def _recovered(self, exc: PosStateError, started: float) -> StateData:
        """Automatic recovery (docs/RECOVERY.md); raises UnrecoverableStateError when no copy can be trusted."""
        from posstate.backup import recovery as _recovery  # only a damaged file pays for recovery

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
        self._change_mark += 1
        self._entries = {}  # a new state: the next save builds every entry (and keeps them if the state is small)
        self._expected_on_disk = {checksum}
        self._highest_generation = max(self._highest_generation, state.generation)
        self._loaded = True
        self._dirty = False

    def _ensure_loaded(self) -> None:
        self._check_open()
        if not self._loaded:
            self._load_main()
            if self.config.durability != "snapshot" and self.config.backup_interval > 0:
                from posstate.backup import ops as _backup_ops  # the journal modes' backup timer (issue 15.2)

                _backup_ops.arm(self._files)
