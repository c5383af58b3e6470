"""What ``posstate backups restore`` would change, shown before it asks (issue 15.2).

The diff is the one ``posstate diff`` prints (positions added, removed and changed against the current state,
symbol and bot metadata), then a loud warning when the backup holds fewer positions than the state it replaces:
restoring it forgets open positions the bot may still hold on the exchange.
"""

from __future__ import annotations

from typing import Any

import click

from posstate.cli.render import diff_json, diff_lines, diff_states
from posstate.model.document import StateData

__all__ = ["fewer_positions_warning", "show_restore_preview"]


def fewer_positions_warning(current: StateData, backup: StateData, backup_id: str) -> str | None:
    """The warning when restoring *backup* drops positions *current* holds (fewer of them, or as many but other
    ones), else None."""
    have, get = len(current.positions), len(backup.positions)
    dropped = sorted(current.positions.keys() - backup.positions.keys())
    if not dropped:
        return None
    shown = ", ".join(f"{s} {side}" for s, side in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
    head = (
        f"WARNING: backup {backup_id} holds {get} position(s) but the current state holds {have}"
        if get < have
        else f"WARNING: backup {backup_id} lacks position(s) the current state holds"
    )
    return (
        f"{head}: restoring it drops {len(dropped)} open position(s) from the state ({shown}; the exchange may "
        "still hold them; reconcile after restoring)"
    )


def show_restore_preview(
    current: StateData,
    backup: StateData,
    *,
    current_label: str,
    backup_label: str,
    backup_id: str,
    as_json: bool,
    err: bool = True,
) -> dict[str, Any]:
    """Print the diff (text mode) and the warning (always on stderr, in red on a terminal). The diff goes to
    stderr (*err*) beside the question, so stdout keeps the command's result for scripts; a dry run prints it
    on stdout, as its report. Returns both as JSON-ready data for ``--json`` output."""
    changes = diff_states(current, backup)
    warning = fewer_positions_warning(current, backup, backup_id)
    if not as_json:
        click.echo("the restore would change the current state as follows:", err=err)
        for line in diff_lines(changes, a_label=current_label, b_label=backup_label):
            click.echo(line, err=err)
    if warning is not None:
        click.secho(warning, err=True, fg="red", bold=True)
    return {"changes": diff_json(changes, a={"label": current_label}, b={"label": backup_label}), "warning": warning}
