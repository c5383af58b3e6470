"""Every generation a state directory has seen: what a recovery must write above, and what it reports as lost.

A generation number names one content. After a recovery the new state file must take a number no earlier
file ever had, or two different states would share one (a backup, a ``.bak`` or a quarantined copy of the
old generation N and the new generation N). So a recovery looks beyond the copies it chooses among: the
revisions of every journal record that authenticates (on disk or in quarantine, replayable or not) and the
header of every state-file copy in quarantine (issue 15.4). Headers are read without the key; a generation
implausibly far above every trustworthy one (a flipped bit) is ignored, as for a damaged state file's claim.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from posstate.core.config import StateConfig
from posstate.journal import files as _jfiles
from posstate.journal import format as _jformat
from posstate.journal import records as _records
from posstate.model.document import StateData
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

__all__ = ["CLAIM_SLACK", "blind", "blind_floor", "journal_max_rev", "journal_rev", "lost", "main_header", "quarantined_max"]

#: How far beyond the newest trustworthy copy a damaged state file's claimed generation may be and still be
#: believed (2**32 saves: more than any bot makes between two copies).
CLAIM_SLACK = 2**32


class _Copy(Protocol):
    path: Path | None
    state: Any
    generation: int | None
    verdict: str
    max_rev: int
    covered: int
    first_rev: int


def lost(newest_gen: int | None, best: _Copy) -> int | None:
    """Generations known above the recovered copy (None: nothing tells): the damaged file's claim, newer
    copies, and journal records the copy does not hold, against what it holds with its journal replayed
    (a generation its journal's fold record shows it holds in full included, issue 15.4)."""
    held = max(best.generation or 0, best.max_rev, best.covered)
    return None if newest_gen is None else max(0, newest_gen - held)


def main_header(path: Path, skew: float) -> tuple[int, int] | None:
    """(generation, written ms) the damaged state file claims, if its header parses and is plausible."""
    try:
        data = fs.read_file(path)
        h = _format.parse_header(data)
    except (OSError, _format.FormatProblem):
        return None
    if h.written_at_ms > (time.time() + skew) * 1000:
        return None
    if h.generation > _jformat.MAX_BASE:  # a flipped high bit: no real save got there (a journal could not follow it)
        return None
    return (h.generation, h.written_at_ms)


def blind(copies: Iterable[_Copy], cfg: StateConfig, claimed: tuple[int, int] | None) -> bool:
    """True when the state file is there, cannot be used, and its header does not say its generation."""
    state = next((c for c in copies if c.path == cfg.state_path), None)
    return (
        claimed is None and state is not None and state.state is None and state.generation is None and state.verdict != "missing"
    )


def journal_rev(cfg: StateConfig, options: _statefile.ReadOptions) -> int:
    """The highest revision of an authenticated record in the journal files on disk (any snapshot's)."""
    # The ``.next`` segment of a pending background compaction holds acknowledged records too (issue 15 attack:
    # with the snapshot's own journal missing, no copy can replay them, and they must still be counted).
    paths = [cfg.journal_path, _jfiles.next_path(cfg.journal_path)]
    paths += [cfg.legacy_journal_path] if cfg.legacy_journal_path is not None else []
    # Without a key a record only carries a checksum: one planted with a revision no save can reach must not
    # push the next generation past what a journal can start at (it would brick every later save).
    return max((rev for p in paths if (rev := journal_max_rev(p, options)) <= _jformat.MAX_BASE), default=0)


def journal_max_rev(path: Path, options: _statefile.ReadOptions) -> int:
    """The highest revision among the journal records of *path* that authenticate (0: none, or no journal).

    Whatever snapshot the journal belongs to: a record that authenticates was acknowledged under that
    revision, so the number is taken even when the record cannot be replayed onto any copy."""
    try:
        header = _jformat.parse_header(fs.read_file(path, _jformat.HEADER_SIZE))  # (a blank spare: 96 B, not 4 MiB)
    except (OSError, _jformat.JournalProblem, _jformat.JournalTooNew):
        return 0
    probe = StateData(journal={"id": header.id_hex, "seq": header.base_seq})
    r = _records.replay_detail(
        [path], keyring=options.keyring, state=probe, require_encryption=options.require_encryption, chain=False, folds=True
    )
    return max(r.max_rev, r.seen)  # a fold record names a generation a durable save had (issue 15.4)


def blind_floor(copies: Iterable[_Copy], cfg: StateConfig, options: _statefile.ReadOptions | None, *, known: int) -> int:
    """The lowest generation a damaged state file whose header tells none can have had: it replaced .bak after
    every record of .bak's journal (one above both), and every state-file copy in quarantine (each was replaced
    by a later save or recovery; a save that finds the file damaged quarantines it and leaves .bak older, whose
    journal's fold record then names only the quarantined generation: issue 15.4 attack)."""
    floor = max(
        (max(g, c.first_rev) + 1 for c in copies if c.path == cfg.bak_path and (g := c.generation) is not None), default=0
    )
    if options is not None:
        q = quarantined_max(cfg, options, trusted=max(known, floor), slack=CLAIM_SLACK, journals=False)
        floor = max(floor, q + 1 if q else 0)
    return floor


def quarantined_max(cfg: StateConfig, options: _statefile.ReadOptions, *, trusted: int, slack: int, journals: bool = True) -> int:
    """The highest generation (state-file copies' headers) or revision (journal copies' records) in the
    state file's quarantine folder; a header above *trusted* + *slack* is not believed. *journals* False:
    state-file copies only (each was replaced by a later save or recovery, so the state file is above it)."""
    qdir = cfg.quarantine_dir
    try:
        names = fs.listdir(qdir)
    except FileNotFoundError:
        return 0
    except OSError:
        return 0
    state_prefix = f"{cfg.state_path.name}."
    journal_prefix = f"{cfg.journal_path.name}."
    best = 0
    for name in names:
        if not name.startswith(state_prefix):
            continue
        path = qdir / name
        if name.startswith(journal_prefix):
            if not journals:
                continue
            rev = journal_max_rev(path, options)
            if rev <= min(trusted + slack, _jformat.MAX_BASE):  # as for headers below (a keyless planted record)
                best = max(best, rev)
            continue
        try:
            generation = _format.parse_header(fs.read_file(path, max_size=options.max_file_bytes)).generation
        except (OSError, _format.FormatProblem):
            continue
        if generation <= min(trusted + slack, _jformat.MAX_BASE):
            best = max(best, generation)
    return best
