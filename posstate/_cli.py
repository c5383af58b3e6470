"""The ``posstate`` command line: the only module that imports click. Thin: parse, call the library, print."""

from __future__ import annotations

import sys

import click

from posstate._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="posstate")
def cli() -> None:
    """Crash-safe, encrypted, backed-up position state for trading bots."""


@cli.command()
@click.option("--state-dir", type=click.Path(file_okay=False), default=None, help="Directory for the demo state (default: a new temp dir).")
@click.option("--saves", type=click.IntRange(1, 100000), default=None, help="Kill the bot after this many saves (default: random 40-120).")
@click.option("--seed", type=int, default=None, help="Random seed, to replay a run.")
def demo(state_dir: str | None, saves: int | None, seed: int | None) -> None:
    """Kill a saving bot with SIGKILL mid-run, restart it, and show it resumed from its last save."""
    from posstate._demo import run_demo

    ok = run_demo(state_dir=state_dir, saves=saves, seed=seed, echo=click.echo)
    sys.exit(0 if ok else 1)


def main() -> None:
    cli(prog_name="posstate")
