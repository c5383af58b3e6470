"""``posstate backups list|create|restore|prune|verify``: thin commands over the manager's backup methods.

``list`` and ``verify`` only read (no lock, like ``validate``). ``create`` goes through
:class:`PositionStateManager` when the writer lock is free; while a bot holds it, it backs up the snapshot and
its journal read without the lock (a consistent state, written atomically: :mod:`posstate.backup.acked`).
``restore`` and ``prune`` replace files and need the lock (they refuse while a bot runs). Dry runs read only:
they take no lock, but refuse like a write would while a bot holds it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

import click

from posstate.backup import backups as _backups
from posstate.backup import ops as _backup_ops
from posstate.backup.retention import PruneResult
from posstate.cli import base as _cli_base
from posstate.cli.base import EXIT_INVALID, EXIT_KEY, EXIT_VERSION, CliError, cli, confirm, json_out, refuse_if_locked
from posstate.cli.ledger_cmd import keep_newer_orders
from posstate.cli.options import Env, common_options, env_of
from posstate.cli.render import backup_json, backups_table, prune_lines, validate_lines, verdict_lines, verify_verdict
from posstate.cli.restore_preview import show_restore_preview
from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError, StaleBackupError, StateLockedError, StateNotFoundError
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.validate import ValidationReport, validate_file

if TYPE_CHECKING:
    from posstate.manager.manager import PositionStateManager

__all__ = ["backups"]


def require_state_dir(cfg: StateConfig) -> None:
    """A mistyped --state-dir is an error, not an empty directory to create."""
    if not fs.exists(cfg.state_dir):
        raise StateNotFoundError(cfg.state_dir, what="state directory", next_step="check --state-dir or --config")


def open_manager(env: Env) -> PositionStateManager:
    """The manager for a command that writes: it takes the writer lock (StateLockedError, exit 5, if held)."""
    from posstate.manager.manager import PositionStateManager

    return PositionStateManager(env.config(), **env.manager_kwargs())


def _refuse_invalid(report: ValidationReport, what: str) -> None:
    """Raise the report's own error (its exit code), or a generic one."""
    if report.valid:
        return
    if report.error is not None:
        raise report.error
    if not report.contents_checked:
        raise CliError(
            f"{report.path}: the contents were NOT checked: no key was given; rerun with --key-file FILE or set "
            "POSSTATE_KEY, POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE",
            code=EXIT_KEY,
        )
    raise CliError(f"{report.path}: {what} did not pass every check; see `posstate validate {report.path}`", code=EXIT_INVALID)


@cli.group()
@common_options()
def backups() -> None:
    """List, create, restore, prune and verify the timestamped backups (state/backups/).

    Backup ids are the YYYYMMDD_HHMMSS[_N] part of the file name; a unique prefix or `latest` works too.
    """


# ------------------------------------------------------------------------------------------ list
@backups.command(name="list")
@common_options()
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List the backups, newest first: id, creation time, generation, positions, size, valid.

    Reads headers and checksums only (no lock, nothing decrypted); `backups verify` checks contents.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    infos = _backups.scan(cfg.backup_path)
    if env.json:
        json_out([backup_json(b) for b in infos])
        return
    if not infos:
        click.echo(f"no backups in {cfg.backup_path}; make one with `posstate backups create`")
        return
    for line in backups_table(infos):
        click.echo(line)
    damaged = sum(1 for b in infos if b.damaged)
    click.echo(f"{len(infos)} backups in {cfg.backup_path}" + (f", {damaged} DAMAGED" if damaged else ""))


# ------------------------------------------------------------------------------------------ create
@backups.command()
@common_options()
@click.pass_context
def create(ctx: click.Context) -> None:
    """Back up the state now (written, read back and validated), then apply retention.

    In the journal modes the backup holds every acknowledged change. While a bot holds the writer lock the
    state file and its journal are read without it (a consistent snapshot, as borg and restic back up live
    data) and retention is left to the bot. Refused when the state file does not validate (run `posstate
    repair` first).
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    try:
        manager = open_manager(env)
    except StateLockedError as locked:
        info = _online_backup(env, cfg)
        if env.json:
            json_out({**backup_json(info), "online": True, "holder_pid": locked.pid})
        else:
            click.echo(
                f"created backup {info.id} of the running bot's state (pid {locked.pid} holds the writer lock; read "
                f"without it): generation {info.generation}, {info.position_count} positions, {info.size} bytes, "
                f"{info.path}; retention is left to the bot"
            )
        return
    with manager as m:
        if not fs.exists(cfg.state_path):
            raise StateNotFoundError(cfg.state_path, next_step="nothing to back up yet; the bot saves it first")
        _refuse_invalid(validate_file(cfg.state_path, options=env.read_options()), "the state file")
        info = m.create_backup()
    if env.json:
        json_out(backup_json(info))
    else:
        click.echo(
            f"created backup {info.id}: generation {info.generation}, {info.position_count} positions, "
            f"{info.size} bytes, {info.path}"
        )


def _online_backup(env: Env, cfg: StateConfig) -> _backups.BackupInfo:
    """`backups create` while a bot holds the lock: the snapshot and its journal, read without the lock."""
    from posstate.backup import acked as _acked

    if not fs.exists(cfg.state_path):
        raise StateNotFoundError(cfg.state_path, next_step="nothing to back up yet; the bot saves it first")
    options = env.read_options()
    _refuse_invalid(validate_file(cfg.state_path, options=options), "the state file")
    keyring = options.keyring if cfg.encryption else None
    return _acked.online(cfg, options, write_keyring=keyring)


def _current_state(env: Env, cfg: StateConfig) -> StateData:
    """The state a restore would replace, its journal replayed, read only (empty when there is no state file,
    or when it cannot be read: restoring is then the way out, and the diff shows everything as added)."""
    from posstate.journal.current import read_current

    if not fs.exists(cfg.state_path):
        return StateData()
    try:
        cur = read_current(cfg, env.read_options())
    except PosStateError as exc:
        click.echo(f"the current state cannot be read ({exc}); the changes below are against nothing", err=True)
        return StateData()
    if cur.error is not None:  # a load would recover; the diff is against what could be read, and says so
        click.echo(
            f"the current state's journal could not be replayed in full ({str(cur.error).split('; ')[0]}); the "
            "changes below are against the snapshot plus the records before the problem",
            err=True,
        )
    state = cur.state.copy()
    state.generation = cur.generation
    return state


# ------------------------------------------------------------------------------------------ restore
@backups.command()
@click.argument("backup_id", metavar="ID")
@click.option("--accept-older", is_flag=True, help="Restore even if the backup is older than backup_threshold.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--dry-run", is_flag=True, help="Validate the backup, apply the age rule, say what would be restored; write nothing."
)
@common_options()
@click.pass_context
def restore(ctx: click.Context, backup_id: str, accept_older: bool, yes: bool, dry_run: bool) -> None:
    """Make backup ID (full id, unique prefix or `latest`) the current state, as a new generation.

    What the restore would change (positions added, removed and changed, as `diff` prints them) is shown
    before it asks, with a warning when the backup holds fewer positions than the current state.
    The backup is validated first and the current file is kept as a pre-restore backup. A backup older
    than backup_threshold relative to the last save is refused unless --accept-older (stale positions lead
    to duplicate orders). Refused while a bot holds the writer lock.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    if dry_run:
        refuse_if_locked(cfg)
        found = _backups.scan(cfg.backup_path)
        info = _backups.resolve(found, backup_id, backup_dir=cfg.backup_path)
        report = validate_file(info.path, options=env.read_options())
        age = None if info.written_at is None else _backup_ops.backup_age(cfg, found, int(info.written_at.timestamp() * 1000))
        stale: Exception | None = None
        if info.written_at is not None and report.generation is not None and not accept_older:
            try:
                _backup_ops.check_fresh(
                    _backup_ops.known_saves(cfg, found),
                    path=info.path,
                    backup_id=info.id,
                    generation=report.generation,
                    written_ms=int(info.written_at.timestamp() * 1000),
                    threshold=cfg.backup_threshold,
                )
            except StaleBackupError as exc:
                stale = exc
        preview: dict[str, object] = {}
        if report.valid and stale is None:
            preview = show_restore_preview(
                _current_state(env, cfg),
                _statefile.read(info.path, options=env.read_options(), what="backup").state,
                current_label=f"{cfg.state_path} (current)",
                backup_label=f"backup {info.id}",
                backup_id=info.id,
                as_json=env.json,
                err=False,
            )
        if env.json:
            json_out({"dry_run": True, "backup": backup_json(info), "age": age, "validation": report.to_dict(), **preview})
        else:
            for line in validate_lines(report):
                click.echo(line)
        _refuse_invalid(report, f"backup {info.id}")
        if stale is not None:
            raise stale
        click.echo(
            f"dry run: would restore backup {info.id} (generation {report.generation}, {report.positions} positions, "
            f"{age or 0:.0f} s older than the last save) into {cfg.state_path} as a new generation; nothing was written",
            err=True,
        )
        return
    with open_manager(env) as m:
        info = _backups.resolve(m.list_backups(), backup_id, backup_dir=cfg.backup_path)
        report = m.validate_backup(info.id)
        _refuse_invalid(report, f"backup {info.id}")
        if not accept_older and report.generation is not None and info.written_at is not None:
            # Refuse a stale backup before showing what it would change (the restore itself checks again).
            _backup_ops.check_fresh(
                _backup_ops.known_saves(cfg, m.list_backups()),
                path=info.path,
                backup_id=info.id,
                generation=report.generation,
                written_ms=int(info.written_at.timestamp() * 1000),
                threshold=cfg.backup_threshold,
            )
        if not yes and not _cli_base.is_terminal():
            confirm(yes=yes, prompt="", what="restore")  # no one to show the changes to: refuse now
        current = _current_state(env, cfg)  # read only: a state that needs recovery is not recovered before asking
        preview = show_restore_preview(
            current,
            _statefile.read(info.path, options=env.read_options(), what="backup").state,
            current_label=f"{cfg.state_path} (current, generation {current.generation})",
            backup_label=f"backup {info.id} (generation {report.generation})",
            backup_id=info.id,
            as_json=env.json,
        )
        confirm(
            yes=yes,
            prompt=f"Replace the state in {cfg.state_path} with backup {info.id} "
            f"(generation {report.generation}, {report.positions} positions)?",
            what="restore",
        )
        before = m.get_all_symbol_metadata()
        result = m.restore_from_backup(info.id, accept_older=accept_older)
        orders = keep_newer_orders(m, before)
    if env.json:
        json_out({**result.to_dict(), "path": str(cfg.state_path), **preview, "orders_kept": orders})
        return
    kept = f"; the replaced file is kept as backup {result.pre_restore_backup}" if result.pre_restore_backup else ""
    click.echo(
        f"restored backup {info.id} (generation {result.source_generation}, {result.age:.0f} s older than the last save) "
        f"into {cfg.state_path} as generation {result.generation}{kept}"
    )
    if orders:
        click.echo(
            f"kept {len(orders)} ledger orders newer than the backup (the exchange does not roll back; an order "
            f"forgotten here would be sent again): {', '.join(orders)}",
            err=True,
        )


# ------------------------------------------------------------------------------------------ prune
@backups.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be kept, removed and quarantined; change nothing.")
@common_options()
@click.pass_context
def prune(ctx: click.Context, yes: bool, dry_run: bool) -> None:
    """Apply the retention rules: print every backup kept, removed or quarantined, with the reason.

    Every backup is validated first; only valid ones fill a slot; damaged ones go to quarantine, never
    deleted; the newest valid backup is always kept. Refused while a bot holds the writer lock.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    result: PruneResult
    if dry_run:
        refuse_if_locked(cfg)
        result = _backup_ops.plan_prune(cfg, env.read_options(), dry_run=True)
    else:
        with open_manager(env) as m:
            planned = m.prune_old_backups(dry_run=True)
            if planned.removed or planned.quarantined:
                if not yes and _cli_base.is_terminal():  # show what the question is about
                    for line in prune_lines(planned)[:-1]:
                        click.echo(line, err=True)
                confirm(
                    yes=yes,
                    prompt=f"Remove {len(planned.removed)} and quarantine {len(planned.quarantined)} backup(s)?",
                    what="prune",
                )
                result = m.prune_old_backups()
            else:
                result = dataclasses.replace(planned, dry_run=False)
    if env.json:
        json_out(result.to_dict())
        return
    if not result.decisions:
        click.echo(f"no backups in {cfg.backup_path}; nothing to prune")
        return
    for line in prune_lines(result):
        click.echo(line)


# ------------------------------------------------------------------------------------------ verify
@backups.command()
@common_options()
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Validate every backup fully (checksum, decryption, schema, relationships); no lock, no writes.

    Exit 1 if any backup is damaged, 3 if one cannot be checked with the key given, 4 if one is from a
    newer posstate. A progress bar is shown on a terminal.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    infos = _backups.scan(cfg.backup_path)
    if not infos:
        raise StateNotFoundError(
            cfg.backup_path, what="backup", next_step="nothing to verify; make one with `posstate backups create`"
        )
    options = env.read_options()
    reports: list[ValidationReport] = []
    if sys.stderr.isatty() and not env.json:
        with click.progressbar(infos, label="verifying", file=sys.stderr) as bar:
            reports = [validate_file(b.path, options=options) for b in bar]
    else:
        reports = [validate_file(b.path, options=options) for b in infos]
    # A backup removed since it was listed (a running bot's retention) is gone, not damaged (issue 15.3).
    gone = [b for b, r in zip(infos, reports, strict=True) if isinstance(r.error, StateNotFoundError)]
    if gone:
        for b in gone:
            click.echo(f"  {'gone':<11}  {b.id}  removed since it was listed (retention by the running bot)", err=True)
        kept = [(b, r) for b, r in zip(infos, reports, strict=True) if not isinstance(r.error, StateNotFoundError)]
        infos, reports = [b for b, _ in kept], [r for _, r in kept]
        if not infos:
            raise StateNotFoundError(
                cfg.backup_path, what="backup", next_step="every one listed was removed meanwhile; run it again"
            )
    verdicts = [verify_verdict(r) for r in reports]
    if env.json:
        json_out(
            {
                "valid": all(v == "ok" for v, _ in verdicts),
                "backups": [
                    {"id": b.id, "verdict": v, "detail": d, **r.to_dict()}
                    for b, r, (v, d) in zip(infos, reports, verdicts, strict=True)
                ],
            }
        )
    else:
        for line in verdict_lines([(v, b.id, d) for b, (v, d) in zip(infos, verdicts, strict=True)]):
            click.echo(line)
        ok = sum(1 for v, _ in verdicts if v == "ok")
        click.echo(f"{ok} of {len(infos)} backups valid")
    for verdict, code, what in (
        ("DAMAGED", EXIT_INVALID, "damaged; move them to quarantine with `posstate backups prune`"),
        ("KEY", EXIT_KEY, "not readable with the key given (another key?); check --key-file"),
        ("NOT CHECKED", EXIT_KEY, "NOT checked: no key was given; rerun with --key-file FILE"),
        ("NEWER", EXIT_VERSION, "written by a newer posstate; upgrade posstate"),
    ):
        bad = [(b, d) for b, (v, d) in zip(infos, verdicts, strict=True) if v == verdict]
        if bad:
            first, detail = bad[0]
            raise CliError(
                f"{cfg.backup_path}: {len(bad)} of {len(infos)} backups {what} (first: {first.id}: {detail})", code=code
            )
