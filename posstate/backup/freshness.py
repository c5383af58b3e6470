"""How old a backup is against the newest save or change known on disk or in memory: what a restore compares
with ``backup_threshold`` (issue 12.11/12.12). Headers and journal record frames only: nothing is decrypted.
"""

from __future__ import annotations

from pathlib import Path

from posstate.backup.backups import BackupInfo
from posstate.backup.seen import main_header
from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError, StaleBackupError
from posstate.journal import files as _jfiles
from posstate.journal import format as _jformat
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs

__all__ = ["backup_age", "check_fresh", "header_of", "known_saves"]


def header_of(path: Path) -> tuple[int, int] | None:
    """(generation, written_at ms) of a file whose checksum holds, else None."""
    try:
        h = _codec.inspect(fs.read_file(path), path=path)
    except (OSError, PosStateError):
        return None
    return (h.generation, h.written_at_ms)


def known_saves(cfg: StateConfig, backups: list[BackupInfo]) -> list[tuple[int, int]]:
    """(generation, written ms) of every copy whose header can be trusted: the state file, its ``.bak``, what
    a damaged state file's header claims, every backup, and the newest journal record (generation 0: a
    record names no generation of its own). Reads headers and record frames only."""
    known = [h for h in (header_of(cfg.state_path), header_of(cfg.bak_path)) if h is not None]
    claimed = main_header(cfg.state_path, cfg.clock_skew)  # a damaged state file still tells when it was written
    if claimed is not None:
        known.append(claimed)
    known += [
        (b.generation, int(b.written_at.timestamp() * 1000))
        for b in backups
        if b.valid and b.generation is not None and b.written_at
    ]
    # Journaled changes are acknowledged saves too (issue 12.11): the newest record's time counts.
    times = _jfiles.record_times(cfg.journal_path, cfg.legacy_journal_path)
    if times:
        known.append((0, max(times.values())))
    # Headers read without the key are not authenticated: a generation no save can reach (a flipped bit, a
    # planted file) must not become the number the next save is written above.
    return [(g, ms) for g, ms in known if g <= _jformat.MAX_BASE]


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
