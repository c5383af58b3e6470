"""``posstate watch``: follow the state directory (the watchdog machinery, :mod:`posstate.cli.watcher`, loads only here)."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable

import click

from posstate.cli.base import (
    cli,
)
from posstate.cli.options import common_options, env_of
from posstate.cli.output import paint


# ------------------------------------------------------------------------------------------ watch
def _finite(value: float | None) -> float | None:
    """A finite number of seconds or None: ``nan`` compares false with every deadline and would never stop."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number of seconds, got {value}")
    return value


@cli.command()
@click.option("--max-events", type=click.IntRange(1), hidden=True, help="Stop after this many lines (for tests).")
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    hidden=True,
    callback=lambda _ctx, _param, value: _finite(value),
    help="Stop after this many seconds (for tests).",
)
@common_options()
@click.pass_context
def watch(ctx: click.Context, max_events: int | None, timeout: float | None) -> None:
    """Follow the state directory: one line per change with the file, its generation and whether it validates.

    Damaged files, quarantined files, unexpected writers (a fresh file whose writer is not the lock
    holder) and a generation going backwards (an older copy put in place of the state file) are flagged in
    capitals. --json prints one JSON object per line. Ctrl-C or SIGTERM exits 0.
    """
    from posstate.cli.watcher import Watcher, record_line

    env = env_of(ctx)
    cfg = env.config()
    watcher = Watcher(cfg=cfg, keyring=env.keyring(), require_encryption=env.require_encryption())
    watcher.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    count = 0
    restore: Callable[[], object] = lambda: None  # noqa: E731
    try:
        restore = _stop_on_sigterm()
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
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        restore()
        watcher.stop()


class _Stopped(Exception):
    """SIGTERM arrived: stop as on Ctrl-C (exit 0), as service managers stop a follower."""


def _stop_on_sigterm() -> Callable[[], object]:
    """Make SIGTERM end ``watch`` like Ctrl-C; returns what puts the previous handler back. Only the main
    thread may set handlers (a test runner thread leaves SIGTERM alone)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(_signum: int, _frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def to_json_line(record: dict[str, object]) -> str:
    import orjson

    return orjson.dumps(record).decode("utf-8")
