"""Backup operations on a state directory: create (timed and on demand), list, validate, prune, restore.

These functions work on :class:`~posstate.backup.files.StateFiles` (the manager implements it and holds its
lock while it delegates here): its read options, keyring and event callback, and its commit for restores.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posstate.backup import acked as _acked
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.backup import prune as _prune
from posstate.backup import retention as _retention
from posstate.backup import snapcopy as _snapcopy
from posstate.backup.backups import BackupInfo
from posstate.backup.freshness import backup_age, check_fresh, known_saves
from posstate.backup.freshness import header_of as _header_of
from posstate.backup.prune import plan_prune
from posstate.core.errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
)
from posstate.journal import files as _jfiles
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.validate import ValidationReport, validate_file

__all__ = [
    "RestoreResult",
    "after_save",
    "backup_age",
    "check_fresh",
    "create",
    "exclusive",
    "known_saves",
    "plan_prune",
    "prune_backups",
    "restore",
    "validate",
]

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles

log = logging.getLogger("posstate")


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What :meth:`PositionStateManager.restore_from_backup` did."""

    backup: BackupInfo
    generation: int  # generation of the restored state as now written
    source_generation: int  # generation the backup held
    age: float  # seconds between the backup's write time and the last save (negative: newer)
    pre_restore_backup: str | None  # id of the backup that keeps the file that was replaced

    def to_dict(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup.id,
            "generation": self.generation,
            "source_generation": self.source_generation,
            "age": round(self.age, 3),
            "pre_restore_backup": self.pre_restore_backup,
        }


def _compression(files: StateFiles) -> int | None:
    return files.config.compression_level if files.config.compression else None


def _state_ms(state: StateData) -> int | None:
    try:
        return int(_document.parse_utc_text(state.written_at) * 1000)
    except ValueError:
        return None


def exclusive(files: StateFiles) -> threading.RLock:
    """The backup folder's lock: explicit backup operations take it before the owner's lock, so they never
    interleave with a background backup (posstate/backup/background.py)."""
    return _background.service(files).folder_lock


def create(files: StateFiles, *, prune: bool = True, least_generation: int | None = None) -> BackupInfo:
    """Write a verified backup of the last saved state now; emit backupCreated or backupFailed.

    In the journal modes the journal is first folded into a snapshot (by the caller, which passes the
    *least_generation* ``fold_journal()`` returned), so the backup holds every acknowledged change. It is a
    verified copy of the state file (never encoded again); if that does not verify (or is older than that
    generation), the acknowledged state in memory is encoded instead.
    """
    svc = _background.service(files)
    with svc.folder_lock, svc.explicit():  # close() never stops its prune's checks (posstate/backup/closing.py)
        try:
            info = _create_now(files, svc, least_generation)
        except (PosStateError, OSError) as exc:
            _failed(files, exc)
            raise
        files.last_backup_at = min(info.created_at.timestamp(), svc.clock())  # a later name: the clock went back
        svc.forget_awaited()  # a timed backup waiting for a compaction is not due any more (issue 14.2)
        if info.generation is not None:
            svc.backed_generation = max(svc.backed_generation, info.generation)
        files.emit(
            "backupCreated",
            {
                "path": str(info.path),
                "backup_id": info.id,
                "generation": info.generation,
                "positions": info.position_count,
                "bytes": info.size,
            },
        )
        if prune and not svc._closing:  # close() from its backupCreated handler released the writer lock
            try:
                prune_backups(files, dry_run=False)
            except (PosStateError, OSError) as exc:
                files.emit("error", {"context": "prune after backup", "error": str(exc)})
                log.warning("pruning after backup failed: %s", exc)
    return info


def fold(files: StateFiles) -> int:
    """The journal folded into a snapshot for :func:`create` (journal modes), by a caller holding neither the
    owner's lock nor the backup folder (issue 14.3); its *least_generation*, or backupFailed and the error."""
    try:
        return files.fold_journal()
    except (PosStateError, OSError) as exc:
        _failed(files, exc)
        raise


def _failed(files: StateFiles, exc: BaseException) -> None:
    reason = {"path": str(files.config.backup_path), "reason": str(exc), "operation": getattr(exc, "operation", "backup")}
    files.emit("backupFailed", reason)
    log.warning("backup failed: %s", exc)


def _create_now(files: StateFiles, svc: _background.BackupService, least: int | None) -> BackupInfo:
    """The last durable state as a new backup: in the journal modes, the journal folded into a snapshot first
    (without the owner's lock: other threads change the state meanwhile, issue 14.3)."""
    cfg = files.config
    if cfg.durability == "snapshot":
        files.ensure_loaded()  # under the owner's lock
        least = 0
    elif least is None:
        least = files.fold_journal()  # without it (issue 14.3)
    durable = svc._durable_generation
    try:
        return _snapcopy.copy_state_file(
            cfg.state_path,
            cfg.backup_path,
            options=files.read,
            cache=svc.cache,
            check_account=files.check_account,
            min_generation=max(durable, least),  # older than durable: put there behind the writer lock
            known=files.wrote,
            confirm=None if cfg.durability == "snapshot" else files.confirm_copy,  # not under the owner's lock
        )
    except StateNotFoundError:
        raise StateNotFoundError(cfg.state_path, what="saved state", next_step="save the state before backing it up") from None
    except (CorruptStateError, SchemaValidationError) as exc:
        if cfg.durability != "snapshot":  # without the owner's lock: its acknowledged state, copied under it
            older = exc.generation if isinstance(exc, _snapcopy.Older) else None
            given_up = older is not None and older >= durable
            acked = _acked.from_memory(files)
            if acked is None and older is not None and given_up:
                raise _given_up(files, older, least) from exc
            if acked is None:
                raise
            if given_up:
                log.info("%s: the snapshot this backup waited for was given up; backing up memory", cfg.state_path)
            else:
                log.warning("%s does not verify; backing up the acknowledged state in memory instead", cfg.state_path)
            return acked
        memory = files.snapshot()
        if files.unsaved() or memory is None or memory.generation == 0:
            raise
        log.warning("%s does not verify; backing up the last save from memory instead", cfg.state_path)
        return _backups.write_backup(
            memory,
            backup_dir=cfg.backup_path,
            keyring=files.write_keyring,
            compression_level=_compression(files),
            options=files.read,
            now=time.time(),
            written_at_ms=_state_ms(memory),
        )


def _given_up(files: StateFiles, generation: int, least: int) -> PersistenceError:
    """The fold's snapshot (generation *least* or above) never became durable: a save gave its compaction up
    and then failed, leaving the genuine state file of *generation*; memory could not be copied instead."""
    return PersistenceError(
        files.config.state_path,
        operation="back up the journal folded into a snapshot",
        reason=f"the state file holds generation {generation}, not the snapshot of generation {least} or above this "
        "backup waited for (a save replaced that compaction and failed), and the acknowledged state in memory could "
        "not be copied instead (a transaction open, or a failed sync)",
        outcome="no backup was taken; the state file and its journal hold every acknowledged change",
        next_step="call create_backup() again",
    )


def after_save(files: StateFiles, state: StateData) -> None:
    """A snapshot of *state* is durable: if the newest backup is older than ``backup_interval``, ask the
    background thread for a timed backup (a copy of that snapshot). Returns at once; the caller of a save or
    compaction never waits for a backup, and a failing backup is reported (``backupFailed``) by the thread.
    Safe from any thread (a background compaction calls it too)."""
    svc = _background.service(files)
    svc.note_snapshot(state.generation)
    last = files.last_backup_at
    if last is None:
        found = _backups.names_only(files.config.backup_path)
        last = found[0][1].timestamp() if found else float("-inf")
        files.last_backup_at = last
    if not _background.due(files, svc.clock()):
        return
    svc.request()


def arm(files: StateFiles) -> None:
    """After a load in the journal modes: start the backup thread's timer, which backs up acknowledged changes
    no snapshot holds yet once ``backup_interval`` has passed (issue 15.2). Nothing in snapshot mode or with
    ``backup_interval=0`` (a backup at every snapshot, as before)."""
    cfg = files.config
    if cfg.durability == "snapshot" or cfg.backup_interval <= 0:
        return
    svc = _background.service(files)
    found = _backups.names_only(cfg.backup_path)
    if files.last_backup_at is None:
        files.last_backup_at = found[0][1].timestamp() if found else float("-inf")
    state = files.snapshot()
    if found and state is not None:  # what the newest backup holds needs no second backup (nothing decrypted)
        newest = _backups.inspect_file(cfg.backup_path / _backups.file_name(found[0][0]), *found[0])
        # An unauthenticated header: a planted "newest backup" above memory must not silence timed backups.
        if newest.valid and newest.generation is not None and newest.generation <= state.generation:
            svc.backed_generation = max(svc.backed_generation, newest.generation)
    if state is not None and not files.unsaved():  # memory is the snapshot just loaded
        svc.note_snapshot(state.generation)
    svc.start()


def wait_for_backups(files: StateFiles, timeout: float | None = None) -> bool:
    """Wait until no background backup runs (True), or *timeout* seconds passed (False)."""
    svc = files.backups
    return True if svc is None else svc.wait_idle(timeout)


def list_all(files: StateFiles) -> list[BackupInfo]:
    return _backups.scan(files.config.backup_path)


def prune_backups(files: StateFiles, *, dry_run: bool) -> _retention.PruneResult:
    """Apply retention with this owner's verified-backup cache (a backup unchanged since its last full
    check is not decrypted again); damaged backups go to quarantine."""
    svc = _background.service(files)
    with svc.explicit():  # run to its end, even from an event handler while close() stops the service's own prune
        return _prune.prune_backups(files, dry_run=dry_run, cache=svc.cache)


def validate(files: StateFiles, backup_id: str) -> ValidationReport:
    info = _backups.resolve(list_all(files), backup_id, backup_dir=files.config.backup_path)
    return validate_file(info.path, options=files.read)


def _link_as_backup(files: StateFiles) -> str | None:
    """Keep the state file about to be replaced as a timestamped backup (a hard link; it is intact)."""
    path = files.config.state_path
    if _header_of(path) is None:
        return None  # missing, or damaged: the save path sets a damaged file aside in quarantine
    bdir = files.config.backup_path
    fs.ensure_dir(bdir)
    for bid in _backups.fresh_ids(bdir, _backups.stamp_at(time.time())):
        try:
            fs.link(path, bdir / _backups.file_name(bid))
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _atomic._NO_LINKS:
                raise
            _atomic.write_new_file(bdir / _backups.file_name(bid), fs.read_file(path))
        fs.fsync_dir(bdir)
        return bid
    raise PersistenceError(bdir, operation="pre-restore backup", reason="no free backup name")  # pragma: no cover


def _settle_journal(files: StateFiles, backup_journal: dict[str, Any] | None) -> None:
    """Before a restore: fold the journal's acknowledged records into the state file (a compaction), so the
    pre-restore backup holds every change. If the state cannot be loaded at all, the operator is restoring on
    purpose: the journal is kept in quarantine and the restore goes on without it. A journal under the old
    name (``positions.journal``) that the backup's snapshot names (*backup_journal*) is set aside either way:
    a load after the restore would replay its records, newer than the backup, onto the restored state."""
    cfg = files.config
    legacy = cfg.legacy_journal_path
    try:
        files.ensure_loaded()
    except (CorruptStateError, SchemaValidationError):
        for jpath in _jfiles.journal_files_of(cfg.journal_path, legacy, [backup_journal]):
            moved = _atomic.move_aside(jpath, cfg.quarantine_dir, label="journal-before-restore")
            log.warning("state could not be loaded before the restore; journal kept at %s", moved)
        files.journal.recover(StateData())
        return
    if files.unsaved() and files.config.durability != "snapshot":
        files.save()
    if legacy is None:
        return
    try:
        if _jfiles.journal_file(cfg.journal_path, legacy, backup_journal) != legacy:
            return
        moved = _atomic.move_aside(legacy, cfg.quarantine_dir, label="journal-before-restore")
    except OSError as exc:
        raise PersistenceError(legacy, operation="quarantine journal before restore", cause=exc) from exc
    log.warning("journal under the old name %s names the restored backup's journal; kept at %s", legacy.name, moved)


def restore(files: StateFiles, backup_id: str, *, accept_older: bool) -> RestoreResult:
    """Validate a backup, keep the current file as a backup, write the backup's state as a new generation."""
    cfg = files.config
    backups = list_all(files)
    info = _backups.resolve(backups, backup_id, backup_dir=cfg.backup_path)
    loaded = _statefile.read(info.path, options=files.read, what="backup")
    files.check_account(loaded.state)
    known = known_saves(cfg, backups)
    memory = files.snapshot()
    generation = memory.generation if memory is not None else 0
    # Memory's written_at is its last save's or load's: it dates memory's generation only while no journaled
    # change moved that on (a background compaction's snapshot, newer, does not touch it). The newest change
    # this manager journaled or replayed dates the rest (12.10: its generation).
    ms = _state_ms(memory) if memory is not None and (cfg.durability == "snapshot" or not files.unsaved()) else None
    if generation > 0 and ms is not None:
        known.append((generation, ms))
    if files.journal.last_time_ms:
        known.append((generation, files.journal.last_time_ms))
    age = check_fresh(
        known,
        path=info.path,
        backup_id=info.id,
        generation=loaded.state.generation,
        written_ms=loaded.header.written_at_ms,
        threshold=cfg.backup_threshold,
        accept_older=accept_older,
    )
    _settle_journal(files, loaded.state.journal)
    known = known_saves(cfg, list_all(files))
    highest = max([files.highest_generation, loaded.state.generation] + [g for g, _ in known])
    on_disk = _header_of(files.config.state_path)
    previous = files.snapshot()
    try:
        pre = _link_as_backup(files)
    except _atomic.WriteFailed as wf:
        raise PersistenceError(cfg.backup_path, operation=f"pre-restore backup {wf.step}", cause=wf.cause) from wf.cause
    except OSError as exc:
        raise PersistenceError(cfg.backup_path, operation="pre-restore backup", cause=exc) from exc
    if previous is None:
        # We hold the lock, so the file on disk is the last one written here: adopt its checksum.
        data = fs.read_file(files.config.state_path) if on_disk is not None else None
        files.expect_on_disk(None if data is None else _format_checksum(data))
    st = loaded.state.copy()
    # The restore is the newest decision: its entries outrank everything older in a merge, and whatever
    # the replaced state held that the backup lacks gets a tombstone, so no merge brings it back.
    rev = highest + 1
    st.generation = highest
    st.position_revs = dict.fromkeys(st.positions, rev)
    st.metadata_revs = dict.fromkeys(st.metadata, rev)
    if previous is not None:
        for k in previous.positions.keys() - st.positions.keys():
            st.position_tombstones[k] = rev
        for s in previous.metadata.keys() - st.metadata.keys():
            st.metadata_tombstones[s] = rev
        if previous.bot_metadata is not None and st.bot_metadata is None:
            st.bot_metadata = {}  # the backup had none: an empty one at the restore's rev, so no merge brings it back
    if st.bot_metadata is not None:
        st.bot_metadata_rev = rev
    files.raise_generation(highest)
    # What was restored is what that backup holds: no backup at close() for it (issue 15.2), so "latest" stays
    # the backup just restored or the pre-restore one, as an operator expects. Counted before the commit, whose
    # stateSaved handlers may close the manager (15 attack); the folder is held, so no backup changes it meanwhile.
    svc = _background.service(files)
    before = svc.backed_generation
    svc.backed_generation = max(before, max(st.generation, files.highest_generation) + 1)  # the commit's generation
    try:
        generation = files.commit(st, {})  # every entry built anew (the commit keeps them if the state is small)
    except BaseException:
        svc.backed_generation = before
        raise
    files.set_loaded(True)
    svc.backed_generation = max(svc.backed_generation, generation)
    result = RestoreResult(
        backup=info, generation=generation, source_generation=loaded.state.generation, age=age, pre_restore_backup=pre
    )
    files.emit("backupRestored", {"path": str(files.config.state_path), "backup_id": info.id, **result.to_dict()})
    return result


def _format_checksum(data: bytes) -> str | None:
    from posstate.storage.container import checksum_of

    return checksum_of(data)
