"""``posstate watch``: follow the state directory (the watchdog machinery, :mod:`posstate.cli.watcher`, loads only here)."""

from __future__ import annotations

import time

import click

from posstate.cli.base import (
    cli,
)
from posstate.cli.options import common_options, env_of
from posstate.cli.output import paint


# ------------------------------------------------------------------------------------------ watch
@cli.command()
@click.option("--max-events", type=click.IntRange(1), hidden=True, help="Stop after this many lines (for tests).")
@click.option("--timeout", type=click.FloatRange(0), hidden=True, help="Stop after this many seconds (for tests).")
@common_options()
@click.pass_context
def watch(ctx: click.Context, max_events: int | None, timeout: float | None) -> None:
    """Follow the state directory: one line per change with the file, its generation and whether it validates.

    Damaged files, quarantined files and unexpected writers (a fresh file whose writer is not the lock
    holder) are flagged in capitals. --json prints one JSON object per line. Ctrl-C exits 0.
    """
    from posstate.cli.watcher import Watcher, record_line

    env = env_of(ctx)
    cfg = env.config()
    watcher = Watcher(cfg=cfg, keyring=env.keyring(), require_encryption=env.require_encryption())
    watcher.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    count = 0
    try:
        click.echo(f"watching {cfg.state_dir} (Ctrl-C to stop)", err=True)
        while max_events is None or count < max_events:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                break
            record = watcher.next_record(wait)
            if record is None:
                continue
            click.echo(to_json_line(record) if env.json else paint(record_line(record)))
            count += 1
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def to_json_line(record: dict[str, object]) -> str:
    import orjson

    return orjson.dumps(record).decode("utf-8")
