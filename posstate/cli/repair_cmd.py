"""``posstate repair [--dry-run]``: recovery or entry-by-entry repair of the state file, every decision printed.

What is done depends on what is wrong with the state file (checked first with ``validate_file``):

* it passes every check and so does its journal: nothing (exit 0);
* it passes, but its journal is damaged before the last record (or belongs to another snapshot and holds
  newer records): ``attempt_recovery()``, as a bot's load would (snapshot plus the trustworthy records, or
  a copy; the journal goes to quarantine);
* it decrypts but fails the schema or relationship checks: ``repair_state()`` (keep each valid entry,
  take each invalid one from the newest backup that has it, drop the rest);
* it is damaged (checksum, truncation, ...), or missing while ``.bak`` or backups exist:
  ``attempt_recovery()`` (the newest valid copy within ``backup_threshold``);
* a wrong key, a newer format, an I/O error: that error (nothing is repaired with the wrong key).

``--dry-run`` computes the same decisions with the library's read-only planners
(``_repair.plan``, ``_recovery.plan``): no lock taken, nothing moved or written.
"""

from __future__ import annotations

from typing import Any, Literal

import click

from posstate.backup import backups as _backups
from posstate.backup import recovery as _recovery
from posstate.backup import repair as _repair
from posstate.cli.backups_cmd import open_manager, require_state_dir
from posstate.cli.base import EXIT_INVALID, CliError, cli, confirm, json_out, refuse_if_locked
from posstate.cli.options import common_options, env_of
from posstate.cli.render import candidate_lines, repair_decision_lines
from posstate.core.config import StateConfig
from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    SchemaValidationError,
    StateNotFoundError,
    UnrecoverableStateError,
)
from posstate.journal.current import read_current
from posstate.storage import fileops as fs
from posstate.storage.statefile import ReadOptions
from posstate.storage.validate import validate_file

__all__ = ["repair"]

Diagnosis = Literal["valid", "repair", "recover"]


def diagnose(cfg: StateConfig, options: ReadOptions) -> tuple[Diagnosis, str, str]:
    """What is wrong with the state file, so which tool fixes it: (kind, what to print, the bare reason).
    Reads only."""
    path = cfg.state_path
    if not fs.exists(path):
        if fs.exists(cfg.bak_path) or _backups.names_only(cfg.backup_path):
            return "recover", "the state file is missing, but copies exist", "missing"
        raise StateNotFoundError(path, next_step="nothing to repair: there is no state file, no .bak and no backup")
    report = validate_file(path, options=options)
    if report.valid:
        journal = read_current(cfg, options).error  # the snapshot is fine; a load also replays its journal
        if isinstance(journal, CorruptStateError):
            return "recover", f"the snapshot is valid but its journal is not: {journal.reason}", journal.reason
        if journal is not None:
            raise journal  # a journal under another key: nothing is repaired with the wrong key
        return "valid", f"valid (generation {report.generation}, {report.positions} positions)", ""
    err = report.error
    if isinstance(err, SchemaValidationError):
        return (
            "repair",
            f"decrypts but fails validation: {err.json_path}: {err.detail}",
            f"invalid: {err.json_path}: {err.detail}",
        )
    if isinstance(err, CorruptStateError):
        return "recover", f"damaged: {err.reason}", err.reason
    if err is None:  # no key: the contents cannot be judged, so neither can a repair
        raise MissingKeyError(path, reason="repair needs the key to check the contents")
    raise err  # wrong key, newer format, I/O error: not something a repair may touch


@cli.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; take no lock, write nothing.")
@common_options()
@click.pass_context
def repair(ctx: click.Context, yes: bool, dry_run: bool) -> None:
    """Repair or recover the state file and print every decision.

    A damaged (or lost) file is recovered from the newest valid copy (.bak or a backup) within
    backup_threshold; a file that decrypts but fails validation is repaired entry by entry. The original
    always goes to state/quarantine/ first. Refused while a bot holds the writer lock.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    options = env.read_options()
    if dry_run:
        refuse_if_locked(cfg)
        _dry_run(cfg, options, json=env.json)
        return
    with open_manager(env) as m:
        kind, reason, _ = diagnose(cfg, options)
        out: dict[str, Any] = {"dry_run": False, "path": str(cfg.state_path), "diagnosis": kind, "reason": reason}
        _say(env.json, f"{cfg.state_path}: {reason}")
        if kind == "valid":
            _say(env.json, "nothing to repair")
            _finish(env.json, {**out, "action": "none"})
            return
        confirm(
            yes=yes,
            prompt=f"{'Repair' if kind == 'repair' else 'Recover'} {cfg.state_path} (the original goes to quarantine)?",
            what="repair",
        )
        if kind == "repair":
            before = fs.read_file(cfg.state_path)
            try:
                report = m.repair_state()
            except CorruptStateError as exc:
                if not fs.exists(cfg.state_path) or fs.read_file(cfg.state_path) != before:
                    raise  # something was written: do not go on
                _say(env.json, f"entry-by-entry repair is impossible ({exc.reason}); recovering from a copy instead")
                kind = "recover"
            else:
                _say(env.json, "decisions:")
                for line in repair_decision_lines(report.decisions):
                    _say(env.json, line)
                counts = {a: sum(d.action == a for d in report.decisions) for a in ("kept", "restored", "dropped")}
                _say(
                    env.json,
                    f"repaired: {counts['kept']} kept, {counts['restored']} restored, {counts['dropped']} dropped; "
                    f"original moved to {report.quarantined}; written as generation {report.generation}",
                )
                _finish(env.json, {**out, "action": "repair", "repair": report.to_dict()})
                return
        try:
            recovery = m.attempt_recovery()
        except UnrecoverableStateError as exc:
            _say(env.json, "candidates:")
            for line in candidate_lines(exc.candidates):
                _say(env.json, line)
            raise
    if recovery is None:
        _say(env.json, "the state file loaded when read again; nothing was changed")
        _finish(env.json, {**out, "action": "none"})
        return
    _say(env.json, "candidates:")
    for line in candidate_lines(recovery.candidates):
        _say(env.json, line)
    lost = "unknown" if recovery.generations_lost is None else str(recovery.generations_lost)
    moved = f"; damaged file moved to {recovery.quarantined}" if recovery.quarantined else ""
    _say(
        env.json,
        f"recovered from {recovery.source} (generation {recovery.generation}, {recovery.age:.0f} s old; "
        f"{lost} generations lost) as generation {recovery.new_generation}{moved}",
    )
    _finish(env.json, {**out, "action": "recover", "recovery": recovery.to_dict()})


def _say(json: bool, line: str) -> None:
    if not json:
        click.echo(line)


def _finish(json: bool, data: dict[str, Any]) -> None:
    if json:
        json_out(data)


def _dry_run(cfg: StateConfig, options: ReadOptions, *, json: bool) -> None:
    kind, reason, bare = diagnose(cfg, options)
    out: dict[str, Any] = {"dry_run": True, "path": str(cfg.state_path), "diagnosis": kind, "reason": reason}
    _say(json, f"{cfg.state_path}: {reason}")
    if kind == "valid":
        _say(json, "nothing to repair")
        _finish(json, {**out, "action": "none"})
        click.echo("dry run: nothing was written", err=True)
        return
    if kind == "repair":
        try:
            plan = _repair.plan(cfg, options)
        except CorruptStateError as exc:
            _say(json, f"entry-by-entry repair is impossible ({exc.reason}); would recover from a copy instead")
        else:
            _say(json, "would repair entry by entry (the original goes to quarantine first):")
            for line in repair_decision_lines(plan.decisions):
                _say(json, line)
            _finish(json, {**out, "action": "repair", "repair": plan.to_dict()})
            click.echo("dry run: nothing was written", err=True)
            return
    rplan = _recovery.plan(cfg, options, reason=bare)
    _say(json, "candidates:")
    for line in candidate_lines(rplan.candidates):
        _say(json, line)
    _finish(json, {**out, "action": "recover", "recovery": rplan.to_dict()})
    if rplan.source is None:
        raise CliError(
            f"{cfg.state_path}: recovery would fail: no copy within backup_threshold can be trusted (see the candidates); "
            "restore an older backup on purpose with `posstate backups restore ID --accept-older`",
            code=EXIT_INVALID,
        )
    lost = "unknown" if rplan.generations_lost is None else str(rplan.generations_lost)
    _say(
        json,
        f"would recover from {rplan.source} (generation {rplan.generation}; {lost} generations lost) "
        "and move the damaged file to quarantine",
    )
    click.echo("dry run: nothing was written", err=True)
