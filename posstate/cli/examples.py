"""An example in every command's ``--help`` (issue 15.10), kept in one table so a new command is noticed:
``tests/test_cli_output.py`` fails for a command without one. :func:`add_examples` appends them to each
command's epilog when :mod:`posstate.cli.main` has registered every command."""

from __future__ import annotations

import click

#: Command path (space-separated, "" for posstate itself) -> example command lines, each with a comment.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "": (
        "posstate keygen --out ~/.config/posstate.key   # once; keep it safe",
        "export POSSTATE_KEY_FILE=~/.config/posstate.key POSSTATE_DIR=/srv/bot/state",
        "posstate validate && posstate show",
        'eval "$(_POSSTATE_COMPLETE=bash_source posstate)"   # tab completion (zsh_source, fish_source)',
    ),
    "validate": (
        "posstate validate                         # the state file and its journal",
        "posstate validate latest --json | jq .valid  # the newest backup",
    ),
    "show": (
        "posstate show --symbol BTC/USDT:USDT",
        "posstate show --json | jq '.positions | length'",
    ),
    "diff": ("posstate diff latest state/positions.json   # what changed since the newest backup",),
    "history": ("posstate history --symbol ETH/USDT:USDT   # changes since the last snapshot, old -> new",),
    "doctor": ("posstate doctor --state-dir /srv/bot/state   # before the first run",),
    "export": ("posstate export --out /tmp/state.json   # plain JSON: keep it safe",),
    "import": ("posstate import /tmp/state.json --dry-run && posstate import /tmp/state.json --yes",),
    "keygen": ("posstate keygen --out ~/.config/posstate.key",),
    "rekey": ("posstate keygen --out new.key && posstate rekey --new-key-file new.key --yes",),
    "repair": ("posstate repair --dry-run && posstate repair --yes",),
    "reconcile": (
        "posstate reconcile --positions exchange.json   # compare only",
        "posstate reconcile --positions exchange.json --apply --yes",
    ),
    "watch": ("posstate watch --json | jq -c 'select(.flags != [])'   # only what looks wrong",),
    "demo": ("posstate demo --state-dir /tmp/posstate-demo",),
    "backups": ("posstate backups list && posstate backups verify",),
    "backups list": ("posstate backups list --json | jq -r '.[0].id'",),
    "backups create": ("posstate backups create   # works while the bot runs",),
    "backups restore": ("posstate backups restore latest --dry-run && posstate backups restore latest --yes",),
    "backups prune": ("posstate backups prune --dry-run",),
    "backups verify": ("posstate backups verify || echo 'a backup is damaged'",),
    "replica": ("posstate replica status s3://my-bucket/bot1   # how far behind, who holds the lease",),
    "replica status": ("posstate replica status s3://my-bucket/bot1 --json | jq .seconds_behind",),
    "replica list": ("posstate replica list s3://my-bucket/bot1   # snapshots and journal ranges",),
    "replica verify": ("posstate replica verify s3://my-bucket/bot1 || echo 'an object is damaged'",),
    "replica restore": (
        "posstate replica restore s3://my-bucket/bot1 --state-dir /srv/bot/state   # an empty directory",
        "posstate replica restore s3://my-bucket/bot1 --state-dir /tmp/then --at 2026-01-31T12:00:00Z",
    ),
    "replica prune": ("posstate replica prune s3://my-bucket/bot1 --dry-run",),
    "serve": (
        "posstate serve --state-dir /srv/bot/state   # http://127.0.0.1:8787/",
        "posstate serve --host 0.0.0.0 --token-file ~/.config/posstate.token   # the LAN: bearer token required",
    ),
}


def example_text(path: str) -> str | None:
    """The ``Examples:`` block for a command path, as click prints it verbatim (``\\b``)."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def add_examples(group: click.Group, prefix: str = "") -> None:
    """Append its examples to the epilog of *group* and of every command under it."""
    text = example_text(prefix)
    if text and "Examples:" not in (group.epilog or ""):
        group.epilog = f"{group.epilog}\n\n{text}" if group.epilog else text
    for name, command in group.commands.items():
        path = f"{prefix} {name}".strip()
        if isinstance(command, click.Group):
            add_examples(command, path)
            continue
        text = example_text(path)
        if text and "Examples:" not in (command.epilog or ""):
            command.epilog = f"{command.epilog}\n\n{text}" if command.epilog else text
