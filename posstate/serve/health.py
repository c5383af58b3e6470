"""``GET /api/health``: last save and its age, generation, journal size, newest backup and its age, replica lag
(when one is configured), readiness, and why the state is unhealthy when it is (HTTP 503).

Backups are listed by name on every call and their headers re-read only when the set of names changed
(:class:`BackupCache`), so a monitor polling every second costs a ``listdir`` and a few ``stat`` calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from posstate.backup.backups import BackupInfo, full_check, names_only, scan
from posstate.core.errors import PosStateError
from posstate.journal.files import next_path
from posstate.serve import options as _options
from posstate.serve.shapes import backup_json
from posstate.serve.sources import Source
from posstate.storage import fileops as fs
from posstate.storage.statefile import ReadOptions


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthLimits:
    """Ages past which the state is reported unhealthy (None: no limit). ``max_save_age``: seconds since the
    state file was last written; ``max_backup_age``: since the newest backup was made."""

    max_save_age: float | None = None
    max_backup_age: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_save_age", "max_backup_age"):
            if getattr(self, name) is not None:
                _options.seconds(name, getattr(self, name), zero_ok=True)


class BackupCache:
    """The backups of a directory, newest first; headers re-read only when the names change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: tuple[str, ...] | None = None
        self._infos: list[BackupInfo] = []

    def get(self, source: Source) -> list[BackupInfo]:
        cfg = source.config
        if cfg is None:
            return []
        with self._lock:
            names = tuple(n for n, _ in names_only(cfg.backup_path))
            if names != self._names:
                try:
                    infos = scan(cfg.backup_path)
                except PosStateError:
                    infos = []
                if source.backup_read is not None:
                    self._authenticate_newest(infos, source.backup_read)
                if self._names is not None and source.kind == "directory":
                    source.stats.backups += len(set(names) - set(self._names))
                self._names, self._infos = names, infos
            return list(self._infos)

    @staticmethod
    def _authenticate_newest(infos: list[BackupInfo], options: ReadOptions) -> None:
        """Decrypt and validate backups newest first until one passes (usually one): a file planted under a
        fresh name (a plaintext or forged backup: its header and checksum need no key) is marked invalid
        instead of counting as the newest backup."""
        for i, info in enumerate(infos):
            if info.valid:
                infos[i] = full_check(info, options=options)[0]
                if infos[i].valid:
                    return


def _age(t: float | None, now: float) -> float | None:
    return None if t is None else round(max(0.0, now - t), 3)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def report(source: Source, backups: BackupCache, limits: HealthLimits, *, clients: int) -> tuple[bool, dict[str, Any]]:
    """(healthy, the JSON body). Unhealthy: not read yet, a problem reading or writing the state, or an age
    over its limit; ``reasons`` says which."""
    now = time.time()
    view = source.view()
    cfg = source.config
    reasons: list[str] = []
    last_save = source.stats.last_save
    journal_bytes: int | None = None
    if cfg is not None:
        with contextlib.suppress(OSError):
            st = fs.stat_(cfg.state_path)
            last_save = max(last_save or 0.0, st.st_mtime)
        journal_bytes = 0
        # The .next segment of a pending background compaction holds acknowledged records too (issue 14).
        for path in (cfg.journal_path, next_path(cfg.journal_path), cfg.legacy_journal_path):
            if path is not None:
                with contextlib.suppress(OSError):
                    journal_bytes += fs.stat_(path).st_size
    infos = backups.get(source)
    # the newest backup that is valid (authenticated when the source has the key): a damaged or planted
    # file under a fresh name must not keep --max-backup-age quiet
    newest = next((b for b in infos if b.valid), None)
    newest_at = newest.created_at.timestamp() if newest is not None else None
    if not source.ready:
        reasons.append("the state has not been read yet")
    if source.problem:
        reasons.append(source.problem)
    if limits.max_save_age is not None and (last_save is None or now - last_save > limits.max_save_age):
        reasons.append(f"last save older than {limits.max_save_age:g} s")
    if limits.max_backup_age is not None and (newest_at is None or now - newest_at > limits.max_backup_age):
        reasons.append(f"newest backup older than {limits.max_backup_age:g} s")
    healthy = not reasons
    body: dict[str, Any] = {
        "status": "ok" if healthy else "unhealthy",
        "ready": source.ready,
        "reasons": reasons,
        "source": source.kind,
        "generation": view.generation,
        "version": view.version,
        "version_age_seconds": _age(view.changed_at, now),
        "last_save": {"at": _iso(last_save), "age_seconds": _age(last_save, now)},
        "journal": {"bytes": journal_bytes},
        "newest_backup": (
            {"id": newest.id, "created_at": _iso(newest_at), "age_seconds": _age(newest_at, now), "valid": newest.valid}
            if newest is not None
            else None
        ),
        "backups": len(infos),
        # No replica transport exists yet: the field is here so monitors can rely on its place.
        "replica": {"configured": False, "lag_seconds": None},
        "stream": {"clients": clients, "dropped": source.dropped},
    }
    return healthy, body


def backups_json(backups: BackupCache, source: Source) -> list[dict[str, Any]]:
    """``GET /api/backups``: the backups timeline, as ``backups list --json`` prints it."""
    return [backup_json(b) for b in backups.get(source)]
