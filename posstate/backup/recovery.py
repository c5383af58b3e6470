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

from posstate.backup import backups as _backups
from posstate.backup import seen as _seen
from posstate.backup.seen import CLAIM_SLACK as _CLAIM_SLACK
from posstate.backup.seen import blind as _blind
from posstate.backup.seen import journal_rev as _journal_rev
from posstate.backup.seen import lost as _lost
from posstate.backup.seen import main_header
from posstate.core.config import StateConfig
from posstate.core.errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
    UnrecoverableStateError,
    WrongKeyError,
)
from posstate.journal import files as _jfiles
from posstate.journal import records as _records
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles

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
    # Changes an earlier manager reported as failed but could not prove undone (PersistenceError.outcome_unknown):
    # each a dict with "kind" ("journal": "journal_id", "seq_lo", "seq_hi"; "snapshot": "generation"),
    # "operation", "time_ms" and "found_on_disk" (True: this load holds the change; False: it does not;
    # None: recovery chose among copies and cannot tell).
    unknown_outcomes: tuple[dict[str, Any], ...] = ()

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
            "unknown_outcomes": [dict(c) for c in self.unknown_outcomes],
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
    changed_ms: int | None = None  # time of the newest journal record replayed onto it, if any
    first_rev: int = 0  # the highest revision replayed from the journal its snapshot names (not later segments)
    covered: int = 0  # the newest generation a fold record shows this copy holds in full (issue 15.4)
    fold_seen: int = 0  # the newest generation a fold record of its journal names (held or not)

    @property
    def newest_ms(self) -> int | None:
        """When the newest change this copy holds was made (its write time, or a later replayed record's)."""
        times = [t for t in (self.written_ms, self.changed_ms) if t is not None]
        return max(times) if times else None


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


def recover(files: StateFiles, error: PosStateError) -> RecoveryReport:
    """Bring the state back from the best copy, within ``recovery_max_attempts``; see the module docstring.
    The recovered state is the one in memory afterwards (``files.snapshot()``); returns what was done."""
    try:
        return _attempt(files, error, max(1, files.config.recovery_max_attempts))
    except WrongKeyError:
        raise
    except (PersistenceError, CorruptStateError) as exc:
        attempts = max(1, files.config.recovery_max_attempts)
        files.emit("recoveryError", {"path": str(files.config.state_path), "reason": str(exc), "attempts": attempts})
        raise


def _attempt(files: StateFiles, error: PosStateError, attempts: int) -> RecoveryReport:
    """Choose the copy once (before anything is moved), then write it, retrying only that write."""
    cfg = files.config
    path = cfg.state_path
    reason = _why(error)
    if fs.exists(path):
        try:
            state = files.read_current()  # the state file and its journal, exactly as a load reads them
        except (CorruptStateError, SchemaValidationError, PersistenceError):
            pass
        else:
            return RecoveryReport(
                source="state file (re-read)",
                source_path=path,
                generation=state.generation,
                new_generation=state.generation,
                age=0.0,
                generations_lost=0,
                reason=reason,
            )
    cands: list[_Candidate] = []
    # Memory holds the last durable state when nothing is unsaved, and always in the journal modes (each change
    # was durable when its call returned), so it outranks every file of the same generation.
    st = files.snapshot()
    if st is not None and st.generation > 0 and (not files.unsaved() or cfg.durability != "snapshot"):
        mem = _Candidate("memory", None, st.copy(), st.generation, _statefile_ms(st), rank=1 << 62)
        mem.changed_ms = files.journal.last_time_ms or None  # its newest journaled change
        cands.append(mem)
    cands += _file_candidates(cfg, files.read, files.check_account)
    journal_rev = _journal_rev(cfg, files.read)
    best, listing, newest_gen = _select(cands, cfg, reason, journal_rev=journal_rev, options=files.read)
    if best is None:
        raise UnrecoverableStateError(path, listing)
    blind = _blind(cands, cfg, main_header(path, cfg.clock_skew))  # before the damaged file is moved
    assert best.state is not None
    journal_note = ""
    # Its trustworthy records are in the chosen copy (or cannot be applied to it): keep it as evidence. The old
    # name (positions.journal) too when a copy's snapshot names it (else it may be another state file's).
    journals = [c.state.journal if c.state is not None else None for c in cands]
    for jpath in _jfiles.journal_files_of(cfg.journal_path, cfg.legacy_journal_path, journals):
        try:
            moved = _atomic.move_aside(jpath, cfg.quarantine_dir, label="journal")
        except OSError as exc:
            raise PersistenceError(jpath, operation="quarantine journal", cause=exc) from exc
        journal_note = "; ".join(filter(None, (journal_note, f"journal moved to {moved}")))
        log.warning("moved journal %s to %s", jpath, moved)
    files.journal.recover(StateData())  # no journal file now: the save below starts a new one
    quarantined: Path | None = None
    if best.path == path and best.checksum is not None:
        pass  # the state file itself is intact (its journal was not): it becomes the .bak of the new save
    elif fs.exists(path):
        try:
            quarantined = _atomic.move_aside(path, cfg.quarantine_dir, label="corrupt")
        except OSError as exc:
            raise PersistenceError(path, operation="quarantine damaged state file", cause=exc) from exc
        log.warning("moved damaged state file %s to %s", path, quarantined)
    # Above every generation this directory has seen, quarantined copies included: no number is ever given
    # to a second, different content (issue 15.4).
    trusted = max([newest_gen or 0, best.state.generation, best.max_rev])
    if blind:
        # The damaged file's own number is unknown; every save takes the highest number known + 1, so it was
        # at most trusted + 1: skip that one too.
        trusted += 1
    seen = _seen.quarantined_max(cfg, files.read, trusted=trusted, slack=_CLAIM_SLACK)
    files.raise_generation(max(trusted, seen, files.highest_generation))
    chosen, entries = files.adopt(best.state, best.checksum if best.path == path else None)
    attempt = 0
    while True:
        attempt += 1
        try:
            new_gen = files.commit(chosen.copy(), dict(entries))
            break
        except (PersistenceError, CorruptStateError) as exc:
            if attempt >= attempts:
                files.set_loaded(False)
                raise
            log.warning("writing the recovered state failed (attempt %s of %s): %s", attempt, attempts, exc)
    now_ms = time.time() * 1000
    report = RecoveryReport(
        source=best.name,
        source_path=best.path,
        generation=best.state.generation,
        new_generation=new_gen,
        age=max(0.0, (now_ms - (best.written_ms or now_ms)) / 1000),
        generations_lost=_lost(newest_gen, best),
        reason=reason,
        quarantined=quarantined,
        attempts=attempt,
        candidates=tuple(listing),
        journal=journal_note,
    )
    files.emit("stateRepaired", {"path": str(path), "operation": "recovery", **report.to_dict()})
    log.warning(
        "recovered %s from %s (generation %s, %s generations lost)",
        path,
        best.name,
        best.state.generation,
        report.generations_lost,
    )
    return report


def _file_candidates(cfg: StateConfig, options: _statefile.ReadOptions, check: Callable[[StateData], None]) -> list[_Candidate]:
    """The state file with the trustworthy part of its journal, ``positions.json.bak`` and every timestamped
    backup, each read and validated (nothing written)."""
    cands = [
        _load_candidate(options, check, cfg.state_path.name, cfg.state_path),
        _load_candidate(options, check, cfg.bak_path.name, cfg.bak_path),
    ]
    for bid, _created in _backups.names_only(cfg.backup_path):
        cands.append(_load_candidate(options, check, f"backup {bid}", cfg.backup_path / _backups.file_name(bid)))
    times = _jfiles.record_times(cfg.journal_path, cfg.legacy_journal_path)
    return [_with_journal(c, cfg, options, times) for c in cands]


def _with_journal(cand: _Candidate, cfg: StateConfig, options: _statefile.ReadOptions, times: dict[int, int]) -> _Candidate:
    """Replay onto a copy whose snapshot names the journal on disk that journal's trustworthy records."""
    if cand.state is None or cand.state.journal is None:
        return cand
    chain = _jfiles.segment_chain(cfg.journal_path, cfg.legacy_journal_path, cand.state.journal)  # issue 14: segments
    if not any(fs.exists(p) for p in chain):
        return cand
    r = _records.replay_detail(
        chain, keyring=options.keyring, state=cand.state, require_encryption=options.require_encryption, folds=True
    )
    cand.first_rev, cand.covered, cand.fold_seen = r.first_rev, r.covered, r.seen
    if r.applied:  # records are applied in sequence from the one after the snapshot's, without gaps
        first = int(cand.state.journal.get("seq", 0)) + 1
        cand.changed_ms = max((times[q] for q in range(first, first + r.applied) if q in times), default=None)
    if r.applied or r.stopped.startswith(("byte", "record")):
        cand.rank, cand.max_rev = r.applied, r.max_rev
        cand.name = f"{cand.name} + {r.applied} journal records" + (f" (replay stopped at {r.stopped})" if r.stopped else "")
    cand.name += f" (all of generation {cand.covered}, its fold record shows)" if cand.covered else ""
    return cand


def _select(
    cands: list[_Candidate], cfg: StateConfig, reason: str, *, journal_rev: int = 0, options: _statefile.ReadOptions | None = None
) -> tuple[_Candidate | None, list[tuple[str, str]], int | None]:
    """The copy recovery uses (None: none eligible), every candidate with its verdict, the newest generation known.

    The highest generation wins (then the most journal records replayed): never the clock (issue 12.12). The
    clock only decides whether that copy is too stale to use automatically: when what it would lose (a newer
    generation the damaged file claims, journal records after the last one it holds: acknowledged changes,
    issue 12.11) was made more than ``backup_threshold`` after its own newest change, recovery refuses rather
    than bring back stale positions. Copies whose clock disagrees with their generation get a warning.
    """
    path = cfg.state_path
    known = [(c.generation, c.written_ms) for c in cands if c.generation is not None and c.written_ms is not None]
    claimed = main_header(path, cfg.clock_skew)
    trusted = max((g for g, _ in known), default=0)
    if claimed is not None and claimed[0] > trusted + _CLAIM_SLACK:
        # An unauthenticated header of a damaged file: a generation this far beyond every copy that can be
        # trusted is damage itself (a flipped bit), not saves we lost; it must not steer the new generation.
        claimed = None
    if claimed is not None:
        known.append(claimed)
    newest_gen = max((g for g, _ in known), default=None)
    # Journal records are acknowledged changes, each at its own revision (issue 15.4): the newest one known
    # counts whether or not any copy can replay it; so does the generation a fold record names.
    revs = [max(c.max_rev, c.fold_seen) for c in cands] + [journal_rev]
    if _blind(cands, cfg, claimed):
        revs.append(_seen.blind_floor(cands, cfg, options, known=max([*revs, newest_gen or 0])))
    if max(revs) > (newest_gen or 0):
        newest_gen = max(revs)
    valid = [c for c in cands if c.state is not None]
    if not valid:
        return None, [(c.name, c.verdict or "not usable") for c in cands], newest_gen
    best = max(valid, key=lambda c: (c.generation or 0, c.rank, c.path == path, c.name != cfg.bak_path.name))
    best_ms = best.newest_ms
    # What choosing *best* would lose: every newer generation known that no fold record shows it holds, and every
    # journal record after the last one it holds (sequence numbers go on across journals). Memory holds all.
    lost_ms = [ms for g, ms in known if g > max(best.generation or 0, best.covered)]
    if claimed is not None and claimed[0] >= (best.generation or 0) and claimed[0] > best.covered and best.path != path:
        lost_ms.append(claimed[1])  # the damaged file is at least as new as the copy that replaces it
    if best.name != "memory" and best.state is not None:
        held = int((best.state.journal or {}).get("seq", 0)) + (best.rank if best.changed_ms is not None else 0)
        lost_ms += [t for q, t in _jfiles.record_times(cfg.journal_path, cfg.legacy_journal_path).items() if q > held]
    newest_ms = max(lost_ms, default=None)
    stale = newest_ms is not None and best_ms is not None and best_ms < newest_ms - cfg.backup_threshold * 1000
    for c in valid:
        if c is best:
            c.verdict = "chosen"
            if stale:
                c.verdict = (
                    f"valid but too old: its newest change is {(newest_ms or 0) / 1000 - (best_ms or 0) / 1000:.0f} s before "
                    f"the newest change known (backup_threshold {cfg.backup_threshold:.0f} s)"
                )
            continue
        same = c.generation == best.generation  # e.g. close()'s backup of memory, the timed copy of that snapshot
        c.verdict = f"valid, {'the same generation as' if same else 'older than'} the chosen copy (generation {c.generation})"
        c_ms = c.newest_ms
        if not same and c_ms is not None and best_ms is not None and c_ms > best_ms:
            # A lower generation written "later": the clock stepped back (or forward) between the saves.
            c.verdict += "; warning: its clock time is later than the chosen copy's (clock stepped?)"
            log.warning("%s: %s has a lower generation but a later time than %s; the clock moved", path, c.name, best.name)
    listing = [(c.name, c.verdict or "not usable") for c in cands]
    if stale:
        return None, listing, newest_gen
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
    best, listing, newest_gen = _select(cands, cfg, reason, journal_rev=_journal_rev(cfg, options), options=options)
    if best is None or best.state is None:
        return RecoveryPlan(reason, None, None, None, None, tuple(listing))
    lost = _lost(newest_gen, best)
    return RecoveryPlan(reason, best.name, best.path, best.state.generation, lost, tuple(listing))


def _statefile_ms(state: StateData) -> int | None:
    from posstate.model.document import parse_utc_text

    try:
        return int(parse_utc_text(state.written_at) * 1000)
    except ValueError:
        return None
