"""``posstate doctor``: is the state directory a safe place for a bot's state (no key needed)."""

from __future__ import annotations

import stat

import click

from posstate.cli.base import EXIT_INVALID, CliError, cli, json_out
from posstate.cli.options import common_options, env_of
from posstate.cli.output import paint
from posstate.storage import fileops as fs

__all__ = ["doctor"]


@cli.command()
@common_options(hide=("key-file",))
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check that the state directory is a safe place for a bot's state (no key needed).

    File-system type, directory fsync, lock exclusivity against another process, free space, permissions,
    and a short crash (SIGKILL) and fault (ENOSPC, EIO) self-test in a scratch subdirectory that is
    removed afterwards. Exit 1 when anything is unsafe.
    """
    from posstate.selftest.doctor import format_report, run_doctor

    env = env_of(ctx)
    state_dir = env.config().state_dir
    try:
        is_dir = stat.S_ISDIR(fs.stat_(state_dir).st_mode)
    except FileNotFoundError:
        is_dir = True  # not created yet: the doctor checks the nearest existing parent
    except NotADirectoryError:
        raise CliError(
            f"{state_dir}: a parent of this path is a file, not a directory; choose a directory with --state-dir",
            code=EXIT_INVALID,
        ) from None
    if not is_dir:
        raise CliError(f"{state_dir}: exists but is not a directory; choose a directory with --state-dir", code=EXIT_INVALID)
    report = run_doctor(state_dir)
    if env.json:
        json_out(
            {
                "state_dir": str(report.state_dir),
                "filesystem": report.filesystem,
                "mount_point": report.mount_point,
                "verdict": report.verdict,
                "ok": report.ok,
                "findings": [{"check": f.check, "status": f.status, "detail": f.detail} for f in report.findings],
            }
        )
    else:
        click.echo("\n".join(paint(line) for line in format_report(report).splitlines()))
    if not report.ok:
        bad = [f for f in report.findings if f.status == "unsafe"]
        raise CliError(
            f"{state_dir}: unsafe for posstate state: {len(bad)} finding(s) marked UNSAFE (first: {bad[0].check}: "
            f"{bad[0].detail}); fix them and rerun `posstate doctor`",
            code=EXIT_INVALID,
        )
