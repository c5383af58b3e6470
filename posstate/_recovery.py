"""Automatic recovery of a state file that cannot be loaded (see docs/RECOVERY.md for the order).

1. Read the state file once more (a transient read problem is not corruption).
2. Gather every other copy: the in-memory state (if it has no unsaved change), ``positions.json.bak`` and
   every timestamped backup. Validate each fully. Only copies written within ``backup_threshold`` of the
   newest copy known (by write time) are eligible; among them the highest generation wins, so a ``.bak``
   never beats a newer timestamped backup.
3. Move the damaged state file to ``state/quarantine/`` (timestamped name; never deleted), write the chosen
   state as the new state file with a new generation, emit ``stateRepaired``, record ``last_recovery``.
4. If no copy is eligible: :class:`UnrecoverableStateError` listing every candidate and why it was refused.
   Nothing is quarantined then, and nothing ever starts empty.

A wrong key is not corruption: :class:`WrongKeyError` from the state file propagates before any of this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posstate import _atomic, _backups, _codec, _format, _journal, _statefile
from posstate import _fileops as fs
from posstate._config import StateConfig
from posstate._document import StateData
from posstate._errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
    UnrecoverableStateError,
    WrongKeyError,
)

if TYPE_CHECKING:
    from posstate._manager import PositionStateManager

log = logging.getLogger("posstate")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What the last automatic recovery did (``PositionStateManager.last_recovery``)."""

    source: str  # "state file (re-read)", "memory", "positions.json.bak" or "backup <id>"
    source_path: Path | None
    generation: int  # generation of the copy used
    new_generation: int  # generation written as the new state file
    age: float  # seconds between the copy's write time and the recovery
    generations_lost: int | None  # newest generation known minus the one recovered (None: unknown)
    reason: str  # why the state file could not be loaded
    quarantined: Path | None = None
    attempts: int = 1
    candidates: tuple[tuple[str, str], ...] = field(default=())
    journal: str = ""  # what happened to the write-ahead journal, if there was one

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_path": str(self.source_path) if self.source_path else None,
            "generation": self.generation,
            "new_generation": self.new_generation,
            "age": round(self.age, 3),
            "generations_lost": self.generations_lost,
            "reason": self.reason,
            "quarantined": str(self.quarantined) if self.quarantined else None,
            "attempts": self.attempts,
            "candidates": [list(c) for c in self.candidates],
            "journal": self.journal,
        }


@dataclass(slots=True)
class _Candidate:
    name: str
    path: Path | None
    state: StateData | None = None
    generation: int | None = None
    written_ms: int | None = None
    verdict: str = ""
    rank: int = 0  # among copies of one generation, more is newer (journal records replayed; memory highest)
    checksum: str | None = None
    max_rev: int = 0


def _why(exc: BaseException) -> str:
    if isinstance(exc, CorruptStateError):
        return exc.reason
    if isinstance(exc, SchemaValidationError):
        return f"invalid: {exc.json_path}: {exc.detail}"
    if isinstance(exc, WrongKeyError):
        return f"written with another key (key id {exc.file_key_id})"
    if isinstance(exc, StateNotFoundError):
        return "missing"
    return str(exc).split("; ")[0]


def _inspect(path: Path, cand: _Candidate, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes | None:
    try:
        data = fs.read_file(path, max_size=max_size)
    except FileNotFoundError:
        cand.verdict = "missing"
        return None
    except OSError as exc:
        cand.verdict = f"cannot be read ({exc.strerror or exc})"
        return None
    try:
        h = _codec.inspect(data, path=path)
        cand.generation, cand.written_ms = h.generation, h.written_at_ms
    except PosStateError:
        pass
    return data


def _load_candidate(options: _statefile.ReadOptions, check: Callable[[StateData], None], name: str, path: Path) -> _Candidate:
    cand = _Candidate(name, path)
    data = _inspect(path, cand, options.max_file_bytes)
    if data is None:
        return cand
    try:
        loaded = _statefile.parse(data, path=path, options=options)
        check(loaded.state)
    except PosStateError as exc:
        cand.verdict = _why(exc)
        return cand
    cand.state = loaded.state
    cand.checksum = loaded.checksum
    return cand


def main_header(path: Path, skew: float) -> tuple[int, int] | None:
    """(generation, written ms) the damaged state file claims, if its header parses and is plausible."""
    try:
        data = fs.read_file(path)
        h = _format.parse_header(data)
    except (OSError, _format.FormatProblem):
        return None
    if h.written_at_ms > (time.time() + skew) * 1000:
        return None
    return (h.generation, h.written_at_ms)


def recover(mgr: PositionStateManager, error: PosStateError) -> StateData:
    """Bring the state back from the best copy, within ``recovery_max_attempts``; see the module docstring."""
    try:
        return _attempt(mgr, error, max(1, mgr.config.recovery_max_attempts))
    except WrongKeyError:
        raise
    except (PersistenceError, CorruptStateError) as exc:
        attempts = max(1, mgr.config.recovery_max_attempts)
        mgr._events.emit("recoveryError", {"path": str(mgr.path), "reason": str(exc), "attempts": attempts})
        raise


def _attempt(mgr: PositionStateManager, error: PosStateError, attempts: int) -> StateData:
    """Choose the copy once (before anything is moved), then write it, retrying only that write."""
    cfg = mgr.config
    path = mgr.path
    reason = _why(error)
    if fs.exists(path):
        try:
            state = mgr._read_current()  # the state file and its journal, exactly as a load reads them
        except (CorruptStateError, SchemaValidationError, PersistenceError):
            pass
        else:
            mgr.last_recovery = RecoveryReport(
                source="state file (re-read)",
                source_path=path,
                generation=state.generation,
                new_generation=state.generation,
                age=0.0,
                generations_lost=0,
                reason=reason,
            )
            return state
    cands: list[_Candidate] = []
    # Memory holds the last durable state when nothing is unsaved, and always in the journal modes (each change
    # was durable when its call returned), so it outranks every file of the same generation.
    if mgr._loaded and mgr._state.generation > 0 and (not mgr._dirty or cfg.durability != "snapshot"):
        st = mgr._state
        cands.append(_Candidate("memory", None, st.copy(), st.generation, _statefile_ms(st), rank=1 << 62))
    cands += _file_candidates(cfg, mgr._read, mgr._check_account)
    best, listing, newest_gen = _select(cands, cfg, reason)
    if best is None:
        raise UnrecoverableStateError(path, listing)
    assert best.state is not None
    journal_note = ""
    if fs.exists(cfg.journal_path):
        # Its trustworthy records are in the chosen copy (or cannot be applied to it): keep it as evidence.
        try:
            moved = _atomic.move_aside(cfg.journal_path, cfg.quarantine_dir, label="journal")
        except OSError as exc:
            raise PersistenceError(cfg.journal_path, operation="quarantine journal", cause=exc) from exc
        journal_note = f"journal moved to {moved}"
        log.warning("moved journal %s to %s", cfg.journal_path, moved)
    mgr._journal.recover(StateData())  # no journal file now: the save below starts a new one
    quarantined: Path | None = None
    if best.path == path and best.checksum is not None:
        pass  # the state file itself is intact (its journal was not): it becomes the .bak of the new save
    elif fs.exists(path):
        try:
            quarantined = _atomic.move_aside(path, cfg.quarantine_dir, label="corrupt")
        except OSError as exc:
            raise PersistenceError(path, operation="quarantine damaged state file", cause=exc) from exc
        log.warning("moved damaged state file %s to %s", path, quarantined)
    mgr._highest_generation = max(mgr._highest_generation, newest_gen or 0, best.state.generation, best.max_rev - 1)
    mgr._adopt(best.state, best.checksum if best.path == path else None)
    chosen, entries = mgr._state.copy(), dict(mgr._entries)
    attempt = 0
    while True:
        attempt += 1
        try:
            new_gen = mgr._commit(chosen.copy(), dict(entries))
            break
        except (PersistenceError, CorruptStateError) as exc:
            if attempt >= attempts:
                mgr._loaded = False
                raise
            log.warning("writing the recovered state failed (attempt %s of %s): %s", attempt, attempts, exc)
    now_ms = time.time() * 1000
    report = RecoveryReport(
        source=best.name,
        source_path=best.path,
        generation=best.state.generation,
        new_generation=new_gen,
        age=max(0.0, (now_ms - (best.written_ms or now_ms)) / 1000),
        generations_lost=None if newest_gen is None else max(0, newest_gen - best.state.generation),
        reason=reason,
        quarantined=quarantined,
        attempts=attempt,
        candidates=tuple(listing),
        journal=journal_note,
    )
    mgr.last_recovery = report
    mgr._events.emit("stateRepaired", {"path": str(path), "operation": "recovery", **report.to_dict()})
    log.warning(
        "recovered %s from %s (generation %s, %s generations lost)",
        path,
        best.name,
        best.state.generation,
        report.generations_lost,
    )
    return mgr._state


def _file_candidates(cfg: StateConfig, options: _statefile.ReadOptions, check: Callable[[StateData], None]) -> list[_Candidate]:
    """The state file with the trustworthy part of its journal, ``positions.json.bak`` and every timestamped
    backup, each read and validated (nothing written)."""
    cands = [
        _load_candidate(options, check, cfg.state_path.name, cfg.state_path),
        _load_candidate(options, check, cfg.bak_path.name, cfg.bak_path),
    ]
    for bid, _created in _backups.names_only(cfg.backup_path):
        cands.append(_load_candidate(options, check, f"backup {bid}", cfg.backup_path / _backups.file_name(bid)))
    return [_with_journal(c, cfg, options) for c in cands]


def _with_journal(cand: _Candidate, cfg: StateConfig, options: _statefile.ReadOptions) -> _Candidate:
    """Replay onto a copy whose snapshot names the journal on disk that journal's trustworthy records."""
    if cand.state is None or cand.state.journal is None:
        return cand
    path = _journal.journal_file(cfg.journal_path, cfg.legacy_journal_path, cand.state.journal)
    if not fs.exists(path):
        return cand
    applied, max_rev, stopped = _journal.replay_prefix(
        path, keyring=options.keyring, state=cand.state, require_encryption=options.require_encryption
    )
    if applied or stopped.startswith(("byte", "record")):
        cand.rank, cand.max_rev = applied, max_rev
        cand.name = f"{cand.name} + {applied} journal records" + (f" (replay stopped at {stopped})" if stopped else "")
    return cand


def _select(
    cands: list[_Candidate], cfg: StateConfig, reason: str
) -> tuple[_Candidate | None, list[tuple[str, str]], int | None]:
    """The copy recovery uses (None: none eligible), every candidate with its verdict, the newest generation known."""
    path = cfg.state_path
    known = [(c.generation, c.written_ms) for c in cands if c.generation is not None and c.written_ms is not None]
    claimed = main_header(path, cfg.clock_skew)
    if claimed is not None:
        known.append(claimed)
    newest_ms = max((ms for _, ms in known), default=None)
    newest_gen = max((g for g, _ in known), default=None)
    floor_ms = None if newest_ms is None else newest_ms - cfg.backup_threshold * 1000
    eligible: list[_Candidate] = []
    for c in cands:
        if c.state is None:
            continue
        if floor_ms is not None and c.written_ms is not None and c.written_ms < floor_ms:
            c.verdict = (
                f"valid but too old: written {(newest_ms or 0) / 1000 - c.written_ms / 1000:.0f} s before the newest copy known "
                f"(backup_threshold {cfg.backup_threshold:.0f} s)"
            )
            continue
        eligible.append(c)
    listing: list[tuple[str, str]] = []
    if not eligible:
        listing += [(c.name, c.verdict or "not usable") for c in cands]
        return None, listing, newest_gen
    best = max(eligible, key=lambda c: (c.generation or 0, c.rank, c.written_ms or 0, c.name != cfg.bak_path.name))
    for c in eligible:
        c.verdict = "chosen" if c is best else f"valid, older than the chosen copy (generation {c.generation})"
    listing += [(c.name, c.verdict) for c in cands]
    return best, listing, newest_gen


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """What automatic recovery would do now (:func:`plan`); nothing was written to produce it."""

    reason: str  # why the state file cannot be loaded
    source: str | None  # the copy recovery would use, or None: it would raise UnrecoverableStateError
    source_path: Path | None
    generation: int | None  # generation of that copy
    generations_lost: int | None
    candidates: tuple[tuple[str, str], ...]  # the state file and every copy, each with its verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "source": self.source,
            "source_path": str(self.source_path) if self.source_path else None,
            "generation": self.generation,
            "generations_lost": self.generations_lost,
            "candidates": [list(c) for c in self.candidates],
        }


def plan(
    cfg: StateConfig, options: _statefile.ReadOptions, *, reason: str, check: Callable[[StateData], None] | None = None
) -> RecoveryPlan:
    """Dry run of recovery steps 2-4 for a state file that cannot be loaded (*reason*): read and validate
    every copy and say which one recovery would choose, and why each other one would not be. Reads only:
    takes no lock, moves and writes nothing. *check* refuses another account's state (as the manager does).
    """
    cands = _file_candidates(cfg, options, check or (lambda _state: None))
    best, listing, newest_gen = _select(cands, cfg, reason)
    if best is None or best.state is None:
        return RecoveryPlan(reason, None, None, None, None, tuple(listing))
    lost = None if newest_gen is None else max(0, newest_gen - best.state.generation)
    return RecoveryPlan(reason, best.name, best.path, best.state.generation, lost, tuple(listing))


def _statefile_ms(state: StateData) -> int | None:
    from posstate._document import parse_utc_text

    try:
        return int(parse_utc_text(state.written_at) * 1000)
    except ValueError:
        return None
