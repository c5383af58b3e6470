"""The read-only commands on one state: ``validate``, ``show`` and ``diff``."""

from __future__ import annotations

import dataclasses

import click

from posstate.cli.base import (
    EXIT_INVALID,
    EXIT_KEY,
    CliError,
    cli,
    json_out,
    state_path_arg,
)
from posstate.cli.journal_cmd import journal_check, journal_exit_error, read_state, state_config_for
from posstate.cli.options import PATH_ARG, SNAPSHOT_ONLY, common_options, env_of
from posstate.cli.output import paint
from posstate.cli.render import diff_json, diff_lines, diff_states, filter_document, show_lines, validate_lines
from posstate.core.errors import StateNotFoundError
from posstate.storage.validate import validate_file


# ------------------------------------------------------------------------------------------ validate
@cli.command()
@click.argument("path", required=False, type=PATH_ARG)
@common_options()
@click.pass_context
def validate(ctx: click.Context, path: str | None) -> None:
    """Check a state or backup file offline: header, checksum, decryption, schema, relationships.

    Takes no lock and never writes. PATH defaults to the state file. Without a key only the header and
    checksum are checked, and the command says so (exit 3).
    """
    env = env_of(ctx)
    target = state_path_arg(env, path)
    report = validate_file(target, options=env.read_options())
    cfg = state_config_for(env, target) if not isinstance(report.error, StateNotFoundError) else None
    verdict = journal_check(env, cfg, snapshot_valid=report.valid) if cfg is not None else None
    if verdict is not None:
        report = dataclasses.replace(
            report, checks=(*report.checks, verdict.check), valid=report.valid and verdict.check.ok is not False
        )
    violations = None
    if report.valid and report.contents_checked:  # the order ledger's invariants (issue 17.7), reported, not repaired
        from posstate.cli.ledger_cmd import ledger_check

        check, violations = ledger_check(read_state(env, target).state)
        if check is not None:
            report = dataclasses.replace(report, checks=(*report.checks, check), valid=check.ok is not False)
    if env.json:
        out = report.to_dict()
        if verdict is not None:
            out["journal"] = verdict.data
        if violations:
            out["ledger_violations"] = violations
        json_out(out)
    else:
        for line in validate_lines(report, replayed=int((verdict.data.get("applied") or 0) if verdict is not None else 0)):
            click.echo(paint(line))
    if report.valid:
        return
    if report.error is not None:
        raise report.error
    journal_error = journal_exit_error(verdict, cfg) if verdict is not None and cfg is not None else None
    if journal_error is not None:
        raise journal_error
    if not report.contents_checked:
        raise CliError(
            f"{target}: header and checksum are fine, but the contents were NOT checked: the file is encrypted "
            f"(key id {report.key_id}) and no key was given; rerun with --key-file FILE or set POSSTATE_KEY, "
            "POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE",
            code=EXIT_KEY,
        )
    raise CliError(f"{target}: the file did not pass every check; see the list above", code=EXIT_INVALID)


# ------------------------------------------------------------------------------------------ show


@cli.command()
@click.argument("path", required=False, type=PATH_ARG)
@click.option("--symbol", help="Only this symbol's positions and metadata.")
@SNAPSHOT_ONLY
@common_options()
@click.pass_context
def show(ctx: click.Context, path: str | None, symbol: str | None, snapshot_only: bool) -> None:
    """Show the positions (symbol, side, contracts, entry, mark, uPnL, leverage) and symbol metadata.

    Reads PATH (default: the state file), validated in full, with its journal replayed (the state a
    restarted bot loads); takes no lock, never writes. --json prints the decrypted state document.
    """
    env = env_of(ctx)
    target = state_path_arg(env, path)
    got = read_state(env, target, snapshot_only=snapshot_only)
    if env.json:
        doc = got.document()
        json_out(filter_document(doc, symbol) if symbol else doc)
        return
    journal = got.current.applied if got.current is not None else None
    for line in show_lines(str(target), got.state, symbol=symbol, journal_records=journal):
        click.echo(line)


# ------------------------------------------------------------------------------------------ diff
@cli.command()
@click.argument("a", type=PATH_ARG)
@click.argument("b", type=PATH_ARG)
@SNAPSHOT_ONLY
@common_options()
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, snapshot_only: bool) -> None:
    """Compare two state files: positions added, removed and changed (field by field), metadata changes.

    The state file is read with its journal replayed (as a restarted bot loads it). Exit 0 whether or
    not they differ (see "identical" in --json).
    """
    env = env_of(ctx)
    left = read_state(env, state_path_arg(env, a), snapshot_only=snapshot_only)
    right = read_state(env, state_path_arg(env, b), snapshot_only=snapshot_only)
    d = diff_states(left.state, right.state)
    if env.json:
        json_out(
            diff_json(
                d,
                a={"path": a, "generation": left.generation, "journal_records": left.journal_records},
                b={"path": b, "generation": right.generation, "journal_records": right.journal_records},
            )
        )
        return
    for line in diff_lines(d, a_label=left.label(a), b_label=right.label(b)):
        click.echo(paint(line))
