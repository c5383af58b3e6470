"""``posstate demo``: crash, damage and the operator's view in under a minute (the demo itself: :mod:`posstate.cli.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from posstate.cli.base import (
    EXIT_INVALID,
    CliError,
    cli,
    json_out,
)
from posstate.cli.options import common_options, env_of


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
    "--saves", type=click.IntRange(1, 100000), default=None, help="Kill the bot after this many trades (default: random 40-120)."
)
@click.option("--seed", type=int, default=None, help="Random seed, to replay a run.")
@common_options(omit=("state-dir",), hide=("config", "key-file"))
@click.pass_context
def demo(ctx: click.Context, demo_dir: str | None, saves: int | None, seed: int | None) -> None:
    """The whole story in under a minute: a trading bot killed with SIGKILL resumes exactly; its damaged state
    file is recovered at the next start from the newest trustworthy copy; then the operator's view (validate,
    backups list, a restore with its diff). The directory and its key file are left for you to explore.
    """
    import tempfile

    from posstate.cli.demo import run_demo

    env = env_of(ctx)
    if demo_dir:
        _refuse_foreign_dir(Path(demo_dir))
    workdir = Path(demo_dir) if demo_dir else Path(tempfile.mkdtemp(prefix="posstate-demo-"))
    # --json: the story goes to stderr and stdout holds one document, as for every other command
    ok = run_demo(state_dir=str(workdir), saves=saves, seed=seed, echo=lambda line: click.echo(line, err=env.json))
    if env.json:
        json_out({"ok": ok, "state_dir": str(workdir / "state"), "key_file": str(workdir / "demo.key")})
    if not ok:
        raise CliError("a check of the demo failed (see the FAILED line above)", code=EXIT_INVALID)


def _refuse_foreign_dir(workdir: Path) -> None:
    """The demo damages and restores the state in its directory on purpose: it runs only in a new or empty
    directory, or one an earlier demo left (it holds ``demo.key``), never in a real bot's (``--state-dir
    /srv/bot`` would otherwise put ``demo.key`` there and start a bot on ``/srv/bot/state``)."""
    from posstate.storage import fileops as fs

    try:
        entries = fs.listdir(workdir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CliError(f"{workdir}: cannot list it ({exc.strerror}); give a new or empty directory") from None
    if entries and "demo.key" not in entries:
        raise CliError(
            f"{workdir}: not empty and not a demo directory (no demo.key); the demo damages and restores the state "
            "in its directory on purpose: give a new or empty directory"
        )
