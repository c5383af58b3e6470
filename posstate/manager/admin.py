"""Backups, recovery, repair, merge and validation of a manager's state: thin delegations to posstate.backup
(which works on the manager's StateFiles) under the manager's lock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from posstate.core.errors import (
    ManagerClosedError,
    SchemaValidationError,
)
from posstate.manager.changes import InMemoryChanges
from posstate.manager.commit import PositionsInput, _normalize
from posstate.manager.files import owned
from posstate.model.document import StateData
from posstate.storage import statefile as _statefile

if TYPE_CHECKING:
    from posstate.backup.backups import BackupInfo
    from posstate.backup.ops import RestoreResult
    from posstate.backup.recovery import RecoveryReport
    from posstate.backup.repair import RepairReport
    from posstate.backup.retention import PruneResult
    from posstate.backup.verified import RemoteChecks
    from posstate.model.merge import MergeResult
    from posstate.storage.validate import ValidationReport

log = logging.getLogger("posstate")

_TRY_LOCK = 0.05  # seconds an operation holding the backup folder waits for the manager's lock before it lets go


class StateMaintenance(InMemoryChanges):
    """Backups (create, list, validate, prune, restore), recovery, repair, merge, validation.

    Each method imports the module it delegates to when first called: a bot that only loads and saves
    positions never pays for backups, retention, repair, merge or offline validation (issue 13.6).
    """

    def create_backup(self) -> BackupInfo:
        """Write a verified timestamped backup of the last saved state now (then apply retention).

        In the journal modes the journal is first folded into a snapshot (a background compaction this call
        waits for, holding no lock), then that snapshot is copied and verified holding the backup folder but
        not the manager's lock, which is held only for short checks: other threads go on changing the state
        meanwhile (issue 14.3). The backup holds every change acknowledged before the call (unless a restore,
        recovery or repair replaced the state meanwhile: then it holds that state). Its events
        (backupCreated, backupPruned ...) are emitted once the folder is released."""
        from posstate.backup import ops as _backup_ops

        if self.config.durability == "snapshot":
            with self._folder_then_lock():  # the folder first: a background backup may run
                self._check_writable("create_backup")
                return _backup_ops.create(self._files)
        self._ops.check(self._refuse_closed)
        with self._lock:
            self._check_writable("create_backup")
            self._ensure_loaded()
        least = _backup_ops.fold(self._files)  # no folder held: its compaction's handlers may want it (opgate.py)
        with self._explicit():
            return _backup_ops.create(self._files, least_generation=least)

    @contextlib.contextmanager
    def _explicit(self) -> Iterator[None]:
        """The part of an explicit operation that runs outside the manager's lock and holds the backup folder
        (issue 14.3): counted by the gate close() waits on (posstate/manager/opgate.py). It never waits for the
        manager's lock without a bound (a holder of it may be waiting for the folder, or for this operation in
        close()), and its events are emitted after it (ManagerFiles.deferred_events)."""
        from posstate.backup import ops as _backup_ops

        with self._files.deferred_events(), _backup_ops.exclusive(self._files), self._ops.running(self._refuse_closed):
            if self._closed:  # a forked child (a fresh gate): refused without the lock; close() shuts the gate first
                self._refuse_closed()
            yield

    @contextlib.contextmanager
    def _folder_then_lock(self) -> Iterator[None]:
        """The backup folder, then the manager's lock (restore, recovery, repair, a "snapshot" backup), never
        waiting for the manager's lock without a bound while holding the folder: a holder of that lock (a
        transaction, a handler of a locked call) may be waiting for the folder (a prune, a restore). Past a
        short wait the folder is given back and the lock is waited for without it; then both again."""
        from posstate.backup import ops as _backup_ops

        folder = _backup_ops.exclusive(self._files)
        with self._files.deferred_events():  # no handler of its events runs while the folder is held
            if owned(self._lock):  # this thread holds the lock already: it may wait for the folder, whose
                with folder:  # holders never wait for the manager's lock without a bound
                    yield
                return
            while True:
                with folder:
                    if self._lock.acquire(timeout=_TRY_LOCK):
                        try:
                            yield
                        finally:
                            self._lock.release()
                        return
                with self._lock:  # its holder goes on (it may have been waiting for the folder), then both again
                    pass

    def _refuse_closed(self) -> None:
        self._check_open()
        raise ManagerClosedError(self._path)

    def wait_for_backups(self, timeout: float | None = None) -> bool:
        """Wait until no timed backup runs in the background; False if *timeout* seconds passed first.

        Timed backups (``backup_interval``) run on a background thread; close() waits for one too (bounded)."""
        from posstate.backup import ops as _backup_ops

        return _backup_ops.wait_for_backups(self._files, timeout)

    def list_backups(self) -> list[BackupInfo]:
        """Every timestamped backup, newest first, read from headers (damaged ones listed as damaged)."""
        from posstate.backup import ops as _backup_ops

        with self._lock:
            self._check_open()
            return _backup_ops.list_all(self._files)

    def validate_backup(self, backup_id: str) -> ValidationReport:
        """Fully validate one backup (id, unique prefix or ``latest``); never writes."""
        from posstate.backup import ops as _backup_ops

        with self._lock:
            self._check_open()
            return _backup_ops.validate(self._files, backup_id)

    def prune_old_backups(self, *, dry_run: bool = False) -> PruneResult:
        """Apply retention (docs/RECOVERY.md): remove redundant backups, quarantine damaged ones.

        The full checks of backups not verified yet run without the manager's lock (issue 14.3)."""
        from posstate.backup import ops as _backup_ops

        self._ops.check(self._refuse_closed)  # the gate itself is passed with the folder held (opgate.py)
        with self._lock:
            if dry_run:
                self._check_open()
            else:
                self._check_writable()
        with self._explicit():
            return _backup_ops.prune_backups(self._files, dry_run=dry_run)

    def restore_from_backup(self, backup_id: str, *, accept_older: bool = False) -> RestoreResult:
        """Make a backup (id, unique prefix or ``latest``) the current state, as a new generation.

        Refuses a backup older than ``backup_threshold`` relative to the last save with
        :class:`~posstate.StaleBackupError` unless *accept_older* (stale positions lead to duplicate orders).
        """
        from posstate.backup import ops as _backup_ops

        with self._folder_then_lock():
            self._check_writable("restore_from_backup")
            return _backup_ops.restore(self._files, backup_id, accept_older=accept_older)

    def attempt_recovery(self) -> RecoveryReport | None:
        """Reload the state file, recovering it from the best copy if it cannot be loaded.

        Returns the recovery report, or None when the state file was fine. Unsaved changes are discarded.
        """

        with self._folder_then_lock():
            self._check_writable("attempt_recovery")
            before = self.last_recovery
            self._load_main()
            return self.last_recovery if self.last_recovery is not before else None

    def repair_state(self) -> RepairReport:
        """Repair a state file that decrypts but fails validation, entry by entry (docs/RECOVERY.md)."""
        from posstate.backup import repair as _repair

        with self._folder_then_lock():
            self._check_writable("repair_state")
            return _repair.repair(self._files)

    def merge_states(self, current: StateData | str, backup: StateData | str) -> MergeResult:
        """Merge two states by per-entry revision (ties go to *current*); nothing is written.

        Each argument is a state, ``"current"`` (the state in memory) or a backup id / prefix / ``latest``.
        """
        from posstate.model import merge as _merge

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

    def validate_state(self, positions: PositionsInput | None = None) -> ValidationReport:
        """Validate *positions*, or (by default) the state file on disk, fully; emits stateValidated or
        validationError. Never writes."""
        from posstate.storage.validate import ValidationIssue, ValidationReport, validate_file

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

    def _remote_checks(self) -> RemoteChecks | None:
        """Where a prune's full checks of backups run: a worker process (issue 14), or None for this process."""
        from posstate.manager import procheck

        return procheck.for_config(self.config)


def _backups_resolve(mgr: StateMaintenance, ident: str) -> BackupInfo:
    from posstate.backup import ops as _backup_ops
    from posstate.backup.backups import resolve

    return resolve(_backup_ops.list_all(mgr._files), ident, backup_dir=mgr.config.backup_path)
