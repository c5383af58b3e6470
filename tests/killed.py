"""For tests of what the files alone give after a kill: remove the backup a clean close() left (issue 15.2)."""

from __future__ import annotations

from posstate import StateConfig
from posstate.storage import container as _format


def as_if_killed(cfg: StateConfig) -> None:
    """Remove every backup holding a generation above the state file's snapshot: the backups a clean close()
    (or the timer) took of journaled changes, which a bot killed instead of closed would not have left."""
    try:
        snapshot = _format.parse_header(cfg.state_path.read_bytes()).generation
    except (OSError, _format.FormatProblem):
        return
    for path in cfg.backup_path.glob("positions_*.json"):
        try:
            generation = _format.parse_header(path.read_bytes()).generation
        except (OSError, _format.FormatProblem):
            continue
        if generation > snapshot:
            path.unlink()
