"""The manager's backup operations: create (timed and on demand), list, validate, prune, restore.

These functions run under the manager's lock (the manager's public methods hold it and delegate here);
they use the manager's read options, keyring and event bus, and its save path (``_commit``) for restores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posstate import _atomic, _backups, _codec, _document, _journal, _retention, _statefile
from posstate import _fileops as fs
from posstate._backups import BackupInfo
from posstate._config import StateConfig
from posstate._document import StateData
from posstate._errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StaleBackupError,
    StateNotFoundError,
)
from posstate._recovery import main_header
from posstate._validate import ValidationReport, validate_file

if TYPE_CHECKING:
    from posstate._manager import PositionStateManager

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


def _compression(mgr: PositionStateManager) -> int | None:
    return mgr.config.compression_level if mgr.config.compression else None


def _state_ms(state: StateData) -> int | None:
    try:
        return int(_document.parse_utc_text(state.written_at) * 1000)
    except ValueError:
        return None


def create(mgr: PositionStateManager, state: StateData | None = None, *, prune: bool = True) -> BackupInfo:
    """Write a verified backup of *state* (default: the last saved state); emit backupCreated or backupFailed."""
    cfg = mgr.config
    try:
        if state is None:
            state = _saved_state(mgr)
        info = _backups.write_backup(
            state,
            backup_dir=cfg.backup_path,
            keyring=mgr._write_keyring,
            compression_level=_compression(mgr),
            options=mgr._read,
            now=time.time(),
            written_at_ms=_state_ms(state),
        )
    except (PosStateError, OSError) as exc:
        mgr._events.emit(
            "backupFailed", {"path": str(cfg.backup_path), "reason": str(exc), "operation": getattr(exc, "operation", "backup")}
        )
        log.warning("backup failed: %s", exc)
        raise
    mgr._last_backup_at = info.created_at.timestamp()
    mgr._events.emit(
        "backupCreated",
        {
            "path": str(info.path),
            "backup_id": info.id,
            "generation": info.generation,
            "positions": info.position_count,
            "bytes": info.size,
        },
    )
    if prune:
        try:
            prune_backups(mgr, dry_run=False)
        except (PosStateError, OSError) as exc:
            mgr._events.emit("error", {"context": "prune after backup", "error": str(exc)})
            log.warning("pruning after backup failed: %s", exc)
    return info


def _saved_state(mgr: PositionStateManager) -> StateData:
    """The last durable state: memory when it has no unsaved change, else the (validated) file on disk.

    In the journal modes every change is durable when its call returns, so the journal is first folded into
    a snapshot (a compaction): a backup is always a compacted snapshot, never one missing journaled changes.
    """
    mgr._ensure_loaded()
    if mgr._dirty and mgr.config.durability != "snapshot":
        mgr.save()
    if not mgr._dirty and mgr._state.generation > 0:
        return mgr._state
    if not fs.exists(mgr.path):
        raise StateNotFoundError(mgr.path, what="saved state", next_step="save the state before backing it up")
    return _statefile.read(mgr.path, options=mgr._read).state


def after_save(mgr: PositionStateManager, state: StateData) -> None:
    """Timed backup: after a save, back up if the newest backup is older than ``backup_interval``.

    A failing backup is reported (``backupFailed``) and never fails the save that triggered it.
    """
    now = time.time()
    last = mgr._last_backup_at
    if last is None:
        found = _backups.names_only(mgr.config.backup_path)
        last = found[0][1].timestamp() if found else float("-inf")
        mgr._last_backup_at = last
    if now - last < mgr.config.backup_interval:
        return
    with contextlib.suppress(PosStateError, OSError):  # reported as backupFailed; the save itself succeeded
        create(mgr, state)


def list_all(mgr: PositionStateManager) -> list[BackupInfo]:
    return _backups.scan(mgr.config.backup_path)


def validate(mgr: PositionStateManager, backup_id: str) -> ValidationReport:
    info = _backups.resolve(list_all(mgr), backup_id, backup_dir=mgr.config.backup_path)
    return validate_file(info.path, options=mgr._read)


def _policy(c: StateConfig) -> _retention.Policy:
    return _retention.Policy(
        max_backups=c.max_backups,
        keep_within=c.keep_within,
        keep_hourly=c.keep_hourly,
        keep_daily=c.keep_daily,
        keep_weekly=c.keep_weekly,
    )


def plan_prune(cfg: StateConfig, options: _statefile.ReadOptions, *, dry_run: bool = True) -> _retention.PruneResult:
    """What retention would keep, remove and quarantine now, each with its reason. Reads and fully
    validates every backup; writes nothing and takes no lock (``posstate backups prune --dry-run``)."""
    checked = [_backups.full_check(b, options=options)[0] for b in _backups.scan(cfg.backup_path)]
    decisions = _retention.plan(checked, policy=_policy(cfg), now=datetime.now(timezone.utc))
    kept = tuple(d for d in decisions if d.action == "keep")
    removed = tuple(d for d in decisions if d.action == "remove")
    quarantined = tuple(d for d in decisions if d.action == "quarantine")
    return _retention.PruneResult(kept=kept, removed=removed, quarantined=quarantined, dry_run=dry_run)


def prune_backups(mgr: PositionStateManager, *, dry_run: bool) -> _retention.PruneResult:
    """Apply retention; only fully validated backups fill slots; damaged ones go to quarantine."""
    cfg = mgr.config
    result = plan_prune(cfg, mgr._read, dry_run=dry_run)
    kept, removed, quarantined = result.kept, result.removed, result.quarantined
    if dry_run:
        return result
    newest = next((d.backup for d in kept if d.backup.valid), None)
    done_q: list[str] = []
    for d in quarantined:
        try:
            _atomic.move_aside(d.backup.path, cfg.quarantine_dir, label="damaged-backup")
            done_q.append(d.backup.id)
        except OSError as exc:
            raise PersistenceError(d.backup.path, operation="quarantine damaged backup", cause=exc) from exc
    done_r: list[str] = []
    if removed:
        # Redundant only while the backups that make it so are still there.
        if newest is None or not fs.exists(newest.path):
            raise PersistenceError(cfg.backup_path, operation="prune", reason="the newest valid backup vanished; nothing removed")
        for d in removed:
            try:
                fs.unlink(d.backup.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise PersistenceError(d.backup.path, operation="remove redundant backup", cause=exc) from exc
            done_r.append(d.backup.id)
        try:
            fs.fsync_dir(cfg.backup_path)
        except OSError as exc:
            raise PersistenceError(cfg.backup_path, operation="fsync backup directory", cause=exc) from exc
    gens = [d.backup.generation for d in kept if d.backup.generation is not None]
    mgr._tombstone_floor = min(gens) if gens else None
    if done_r or done_q:
        mgr._events.emit(
            "backupPruned", {"path": str(cfg.backup_path), "removed": done_r, "quarantined": done_q, "kept": len(kept)}
        )
    return result


def _header_of(path: Path) -> tuple[int, int] | None:
    """(generation, written_at ms) of a file whose checksum holds, else None."""
    try:
        h = _codec.inspect(fs.read_file(path), path=path)
    except (OSError, PosStateError):
        return None
    return (h.generation, h.written_at_ms)


def _link_as_backup(mgr: PositionStateManager) -> str | None:
    """Keep the state file about to be replaced as a timestamped backup (a hard link; it is intact)."""
    path = mgr.path
    if _header_of(path) is None:
        return None  # missing, or damaged: the save path sets a damaged file aside in quarantine
    bdir = mgr.config.backup_path
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


def known_saves(cfg: StateConfig, backups: list[BackupInfo]) -> list[tuple[int, int]]:
    """(generation, written ms) of every copy whose header can be trusted: the state file, its ``.bak``, what
    a damaged state file's header claims, every backup, and the newest journal record (generation 0: a
    record names no generation of its own). Reads headers and record frames only."""
    known = [h for h in (_header_of(cfg.state_path), _header_of(cfg.bak_path)) if h is not None]
    claimed = main_header(cfg.state_path, cfg.clock_skew)  # a damaged state file still tells when it was written
    if claimed is not None:
        known.append(claimed)
    known += [
        (b.generation, int(b.written_at.timestamp() * 1000))
        for b in backups
        if b.valid and b.generation is not None and b.written_at
    ]
    # Journaled changes are acknowledged saves too (issue 12.11): the newest record's time counts.
    times = _journal.record_times(cfg.journal_path, cfg.legacy_journal_path)
    if times:
        known.append((0, max(times.values())))
    return known


def backup_age(cfg: StateConfig, backups: list[BackupInfo], written_at_ms: int) -> float:
    """Seconds between a backup written at *written_at_ms* and the last save known on disk: what
    :func:`restore` compares with ``backup_threshold`` (for dry runs; no lock, no writes)."""
    last_save_ms = max((ms for _, ms in known_saves(cfg, backups)), default=written_at_ms)
    return (last_save_ms - written_at_ms) / 1000


def check_fresh(
    known: list[tuple[int, int]],
    *,
    path: Path,
    backup_id: str,
    generation: int,
    written_ms: int,
    threshold: float,
    accept_older: bool = False,
) -> float:
    """The age of a backup (*generation*, written at *written_ms*) against the newest of *known* (generation,
    ms) saves and changes; raise StaleBackupError when it is over *threshold*, or when a save of a higher
    generation is dated before the backup (the clock was wrong when one of them was written: how much the
    backup would lose cannot be told from the times, issue 12.11/12.12)."""
    last_ms = max((ms for _, ms in known), default=written_ms)
    age = (last_ms - written_ms) / 1000
    if accept_older:
        return age
    if age > threshold:
        raise StaleBackupError(path, backup_id=backup_id, age=age, threshold=threshold)
    if any(g > generation and ms < written_ms for g, ms in known):
        raise StaleBackupError(path, backup_id=backup_id, age=age, threshold=threshold, clock_wrong=True)
    return age


def _settle_journal(mgr: PositionStateManager, backup_journal: dict[str, Any] | None) -> None:
    """Before a restore: fold the journal's acknowledged records into the state file (a compaction), so the
    pre-restore backup holds every change. If the state cannot be loaded at all, the operator is restoring on
    purpose: the journal is kept in quarantine and the restore goes on without it. A journal under the old
    name (``positions.journal``) that the backup's snapshot names (*backup_journal*) is set aside either way:
    a load after the restore would replay its records, newer than the backup, onto the restored state."""
    cfg = mgr.config
    legacy = cfg.legacy_journal_path
    try:
        mgr._ensure_loaded()
    except (CorruptStateError, SchemaValidationError):
        for jpath in _journal.journal_files_of(cfg.journal_path, legacy, [backup_journal]):
            moved = _atomic.move_aside(jpath, cfg.quarantine_dir, label="journal-before-restore")
            log.warning("state could not be loaded before the restore; journal kept at %s", moved)
        mgr._journal.recover(StateData())
        return
    if mgr._dirty and mgr.config.durability != "snapshot":
        mgr.save()
    if legacy is None:
        return
    try:
        if _journal.journal_file(cfg.journal_path, legacy, backup_journal) != legacy:
            return
        moved = _atomic.move_aside(legacy, cfg.quarantine_dir, label="journal-before-restore")
    except OSError as exc:
        raise PersistenceError(legacy, operation="quarantine journal before restore", cause=exc) from exc
    log.warning("journal under the old name %s names the restored backup's journal; kept at %s", legacy.name, moved)


def restore(mgr: PositionStateManager, backup_id: str, *, accept_older: bool) -> RestoreResult:
    """Validate a backup, keep the current file as a backup, write the backup's state as a new generation."""
    cfg = mgr.config
    backups = list_all(mgr)
    info = _backups.resolve(backups, backup_id, backup_dir=cfg.backup_path)
    loaded = _statefile.read(info.path, options=mgr._read, what="backup")
    mgr._check_account(loaded.state)
    known = known_saves(cfg, backups)
    if mgr._loaded and mgr._state.generation > 0:
        ms = _state_ms(mgr._state)
        if ms is not None:
            known.append((mgr._state.generation, ms))
        if mgr._journal.last_time_ms:  # the newest change this manager journaled or replayed (12.10: its generation)
            known.append((mgr._state.generation, mgr._journal.last_time_ms))
    elif mgr._journal.last_time_ms:
        known.append((0, mgr._journal.last_time_ms))
    age = check_fresh(
        known,
        path=info.path,
        backup_id=info.id,
        generation=loaded.state.generation,
        written_ms=loaded.header.written_at_ms,
        threshold=cfg.backup_threshold,
        accept_older=accept_older,
    )
    _settle_journal(mgr, loaded.state.journal)
    known = known_saves(cfg, list_all(mgr))
    highest = max([mgr._highest_generation, loaded.state.generation] + [g for g, _ in known])
    on_disk = _header_of(mgr.path)
    previous = mgr._state if mgr._loaded else None
    try:
        pre = _link_as_backup(mgr)
    except _atomic.WriteFailed as wf:
        raise PersistenceError(cfg.backup_path, operation=f"pre-restore backup {wf.step}", cause=wf.cause) from wf.cause
    except OSError as exc:
        raise PersistenceError(cfg.backup_path, operation="pre-restore backup", cause=exc) from exc
    if not mgr._loaded:
        # We hold the lock, so the file on disk is the last one written here: adopt its checksum.
        data = fs.read_file(mgr.path) if on_disk is not None else None
        mgr._expected_on_disk = {None if data is None else _format_checksum(data)}
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
    entries = {k: _document.position_entry(p, rev) for k, p in st.positions.items()}
    mgr._highest_generation = max(mgr._highest_generation, highest)
    generation = mgr._commit(st, entries)
    mgr._loaded = True
    result = RestoreResult(
        backup=info, generation=generation, source_generation=loaded.state.generation, age=age, pre_restore_backup=pre
    )
    mgr._events.emit("backupRestored", {"path": str(mgr.path), "backup_id": info.id, **result.to_dict()})
    return result


def _format_checksum(data: bytes) -> str | None:
    from posstate._format import checksum_of

    return checksum_of(data)
