"""Every generation a state directory has seen: what a recovery must write above, and what it reports as lost.

A generation number names one content. After a recovery the new state file must take a number no earlier
file ever had, or two different states would share one (a backup, a ``.bak`` or a quarantined copy of the
old generation N and the new generation N). So a recovery looks beyond the copies it chooses among: the
revisions of every journal record that authenticates (on disk or in quarantine, replayable or not) and the
header of every state-file copy in quarantine (issue 15.4). Headers are read without the key; a generation
implausibly far above every trustworthy one (a flipped bit) is ignored, as for a damaged state file's claim.
"""

from __future__ import annotations

from pathlib import Path

from posstate.core.config import StateConfig
from posstate.journal import format as _jformat
from posstate.journal import records as _records
from posstate.model.document import StateData
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

__all__ = ["journal_max_rev", "quarantined_max"]


def journal_max_rev(path: Path, options: _statefile.ReadOptions) -> int:
    """The highest revision among the journal records of *path* that authenticate (0: none, or no journal).

    Whatever snapshot the journal belongs to: a record that authenticates was acknowledged under that
    revision, so the number is taken even when the record cannot be replayed onto any copy."""
    try:
        header = _jformat.parse_header(fs.read_file(path))
    except (OSError, _jformat.JournalProblem, _jformat.JournalTooNew):
        return 0
    probe = StateData(journal={"id": header.id_hex, "seq": header.base_seq})
    _, max_rev, _ = _records.replay_prefix(
        path, keyring=options.keyring, state=probe, require_encryption=options.require_encryption
    )
    return max_rev


def quarantined_max(cfg: StateConfig, options: _statefile.ReadOptions, *, trusted: int, slack: int) -> int:
    """The highest generation (state-file copies' headers) or revision (journal copies' records) in the
    state file's quarantine folder; a header above *trusted* + *slack* is not believed."""
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
            best = max(best, journal_max_rev(path, options))
            continue
        try:
            generation = _format.parse_header(fs.read_file(path, max_size=options.max_file_bytes)).generation
        except (OSError, _format.FormatProblem):
            continue
        if generation <= min(trusted + slack, _jformat.MAX_BASE):
            best = max(best, generation)
    return best
