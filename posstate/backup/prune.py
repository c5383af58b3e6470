"""Apply retention to a backup folder: plan (every backup's full verdict), then remove and quarantine.

A manager passes its :class:`~posstate.backup.verified.VerifiedCache`, so a backup fully checked once is not
decrypted again while its trailer, size, mtime, ctime and inode are unchanged; without a cache (``posstate
backups prune --dry-run``, no manager) every backup is read and validated fully. The cache may take valid
verdicts from a worker process (posstate/manager/procheck.py); a prune never removes a backup on those alone:
the newest valid backup kept (the one that makes the others redundant) is checked in this process first when
its verdict came from a worker, and a worker contradicted there is never asked again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from posstate.backup import backups as _backups
from posstate.backup import retention as _retention
from posstate.backup.closing import ChecksStopped
from posstate.backup.ledger import verdicts_path
from posstate.backup.verified import VerifiedCache, check_all, probe
from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

if TYPE_CHECKING:
    from posstate.backup.backups import BackupInfo
    from posstate.backup.files import StateFiles

log = logging.getLogger("posstate")


def _policy(c: StateConfig) -> _retention.Policy:
    return _retention.Policy(
        max_backups=c.max_backups,
        keep_within=c.keep_within,
        keep_hourly=c.keep_hourly,
        keep_daily=c.keep_daily,
        keep_weekly=c.keep_weekly,
    )


def plan_prune(
    cfg: StateConfig, options: _statefile.ReadOptions, *, dry_run: bool = True, cache: VerifiedCache | None = None
) -> _retention.PruneResult:
    """What retention would keep, remove and quarantine now, each with its reason. Every backup's verdict
    is a full check (decrypt + validate), from *cache* while the file is unchanged since; writes nothing and
    takes no lock (``posstate backups prune --dry-run``)."""
    if cache is None:
        checked = [_backups.full_check(b, options=options)[0] for b in _backups.scan(cfg.backup_path)]
    else:
        checked = check_all(cfg.backup_path, options=options, cache=cache)
    decisions = _retention.plan(checked, policy=_policy(cfg), now=datetime.now(timezone.utc))
    kept = tuple(d for d in decisions if d.action == "keep")
    removed = tuple(d for d in decisions if d.action == "remove")
    quarantined = tuple(d for d in decisions if d.action == "quarantine")
    return _retention.PruneResult(kept=kept, removed=removed, quarantined=quarantined, dry_run=dry_run)


def prune_backups(files: StateFiles, *, dry_run: bool, cache: VerifiedCache | None = None) -> _retention.PruneResult:
    """Apply retention; only fully validated backups fill slots; damaged ones go to quarantine."""
    cfg = files.config
    result = plan_prune(cfg, files.read, dry_run=dry_run, cache=cache)
    kept, removed, quarantined = result.kept, result.removed, result.quarantined
    if dry_run:
        return result
    newest = next((d.backup for d in kept if d.backup.valid), None)
    done_q: list[str] = []
    for d in quarantined:
        with _ours(cache):
            try:
                _atomic.move_aside(d.backup.path, cfg.quarantine_dir, label="damaged-backup")
                done_q.append(d.backup.id)
            except OSError as exc:
                raise PersistenceError(d.backup.path, operation="quarantine damaged backup", cause=exc) from exc
    done_r: list[str] = []
    if removed and newest is not None and cache is not None and cache.by_worker(newest.path.name):
        _confirm(newest, files, cache)
    if removed:
        # Redundant only while the backups that make it so are still there.
        if newest is None or not fs.exists(newest.path):
            raise PersistenceError(cfg.backup_path, operation="prune", reason="the newest valid backup vanished; nothing removed")
        for d in removed:
            with _ours(cache):
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
    files.tombstone_floor = min(gens) if gens else None
    if done_r or done_q:
        files.emit("backupPruned", {"path": str(cfg.backup_path), "removed": done_r, "quarantined": done_q, "kept": len(kept)})
    return result


@contextlib.contextmanager
def _ours(cache: VerifiedCache | None) -> Iterator[None]:
    """Around each removal: once close() left this (background) prune running and released the writer lock (the
    next bot may be running), nothing more is removed or quarantined (the next prune decides again)."""
    if cache is None:
        yield
        return
    with cache.ours() as ours:
        if not ours:
            raise ChecksStopped
        yield


def _confirm(newest: BackupInfo, files: StateFiles, cache: VerifiedCache) -> None:
    """Check *newest* (its verdict came from a worker or the verdict file) in this process before anything is
    removed for it."""
    seen = probe(newest.path)
    if cache.pause is not None:
        cache.pause()
    info, _ = _backups.full_check(newest, options=files.read, pause=cache.pause)
    cache.full_checks += 1
    if info.valid and seen is not None:
        cache.remember(newest.path.name, seen, info)
        return
    if cache.from_file(newest.path.name):
        # The verdict file vouched for a backup that changed without its size, times or inode changing (a file
        # system without real ctimes or inodes, a disk returning other bytes): none of its verdicts is used,
        # and the file is written without them now (the next start does not fail its first prune again).
        cache.distrust(worker=False)
        cache.keep()
        log.warning("%s: the verdict file's verdict was contradicted in process; its verdicts are not used", newest.path)
        reason = f"the verdict file ({verdicts_path(files.config).name}) said valid and the check here says not"
        step = "nothing to do: the next prune checks every backup again; if it recurs, check the disk"
    else:
        cache.distrust()
        log.warning("%s: a backup-check worker's verdict was contradicted in process; checking here from now on", newest.path)
        reason = "the check in the worker process and the check here disagree"
        step = "nothing to do: the next prune checks every backup in this process"
    raise PersistenceError(newest.path, operation="prune", reason=reason, outcome="no backup was removed", next_step=step)
