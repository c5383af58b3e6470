"""``posstate demo``: kill a saving bot mid-run and show it resumed (the demo itself: :mod:`posstate.cli.demo`)."""

from __future__ import annotations

import click

from posstate.cli.base import (
    EXIT_INVALID,
    cli,
)


# ------------------------------------------------------------------------------------------ demo
@cli.command()
@click.option(
    "--state-dir",
    "demo_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the demo state (default: a new temp dir).",
)
@click.option(
    "--saves", type=click.IntRange(1, 100000), default=None, help="Kill the bot after this many saves (default: random 40-120)."
)
@click.option("--seed", type=int, default=None, help="Random seed, to replay a run.")
@click.pass_context
def demo(ctx: click.Context, demo_dir: str | None, saves: int | None, seed: int | None) -> None:
    """Kill a saving bot with SIGKILL mid-run, restart it, and show it resumed from its last save."""
    from posstate.cli.demo import run_demo

    ok = run_demo(state_dir=demo_dir, saves=saves, seed=seed, echo=click.echo)
    ctx.exit(0 if ok else EXIT_INVALID)
