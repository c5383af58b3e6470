"""The ``posstate`` command line. Commands are thin: parse, call the library, print.

The group, the common options and the error mapping live in :mod:`posstate.cli.base`; rendering in
:mod:`posstate.cli.render`; the work of ``rekey`` and ``watch`` in :mod:`posstate.cli.rekey_cmd` and
:mod:`posstate.cli.watch_cmd`. New command groups (``backups``, ``repair``, ...) are added the same way.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from posstate.cli import backups_cmd, journal_cmd, reconcile_cmd, repair_cmd  # noqa: F401 (commands register on cli)
from posstate.cli.base import (
    EXIT_INVALID,
    EXIT_KEY,
    CliError,
    Env,
    cli,
    common_options,
    confirm,
    env_of,
    json_out,
    refuse_if_locked,
    state_path_arg,
    write_new_output,
    writer_lock,
)
from posstate.cli.journal_cmd import journal_check, journal_exit_error, journal_refusal, read_state, state_config_for
from posstate.cli.render import diff_json, diff_lines, diff_states, filter_document, show_lines, to_json, validate_lines
from posstate.core.config import StateConfig
from posstate.core.errors import CorruptStateError, PersistenceError, PosStateError, SchemaValidationError, StateNotFoundError
from posstate.journal.current import read_current
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, encode_key_text, generate_key, key_id, read_key_file
from posstate.storage.validate import validate_file

__all__ = ["cli", "main"]

_PATH = click.Path(dir_okay=True, path_type=str)


# ------------------------------------------------------------------------------------------ validate
@cli.command()
@click.argument("path", required=False, type=_PATH)
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
    if env.json:
        out = report.to_dict()
        if verdict is not None:
            out["journal"] = verdict.data
        json_out(out)
    else:
        for line in validate_lines(report):
            click.echo(line)
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
_SNAPSHOT_ONLY = click.option("--snapshot-only", is_flag=True, help="Read the state file alone, without replaying its journal.")


@cli.command()
@click.argument("path", required=False, type=_PATH)
@click.option("--symbol", help="Only this symbol's positions and metadata.")
@_SNAPSHOT_ONLY
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
@click.argument("a", type=_PATH)
@click.argument("b", type=_PATH)
@_SNAPSHOT_ONLY
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
        click.echo(line)


# ------------------------------------------------------------------------------------------ keys
@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the key to this new file (mode 0600; never overwritten).")
@common_options()
@click.pass_context
def keygen(ctx: click.Context, out: str | None) -> None:
    """Make a new random AES-256 key (base64). Without --out it is printed to stdout."""
    env = env_of(ctx)
    key = generate_key()
    text = encode_key_text(key)
    if out is None:
        if env.json:
            json_out({"key": text, "key_id": key_id(key)})
        else:
            click.echo(text)
        return
    write_new_output(Path(out), (text + "\n").encode("ascii"))
    if env.json:
        json_out({"path": out, "key_id": key_id(key)})
    else:
        click.echo(
            f"wrote a new key (key id {key_id(key)}) to {out}; keep it secret and backed up: without it the state cannot be read"
        )


@cli.command()
@click.option(
    "--new-key-file", required=True, type=click.Path(dir_okay=False), help="File with the new base64 key (see keygen --out)."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be re-encrypted; change nothing.")
@common_options()
@click.pass_context
def rekey(ctx: click.Context, new_key_file: str, yes: bool, dry_run: bool) -> None:
    """Re-encrypt the state file, its .bak and every backup under a new key.

    Each file is verified under the new key before it replaces the old one; an interruption leaves every
    file readable with one of the two keys (run rekey again to finish). Refused while a bot holds the lock.
    """
    from posstate.cli import rekey_cmd as _cli_rekey

    env = env_of(ctx)
    cfg = env.config()
    old = env.require_keyring(cfg.state_path)
    new = Keyring(key=read_key_file(new_key_file))
    if old.key_id == new.key_id:
        raise CliError(
            f"{new_key_file}: this is the key in use (key id {new.key_id}); make a new one with `posstate keygen --out FILE`"
        )

    def plan() -> list[_cli_rekey.RekeyItem]:
        items = [
            _cli_rekey.classify(p, old=old, new=new, max_document_bytes=cfg.max_document_bytes)
            for p in _cli_rekey.candidates(cfg)
        ]
        if not items:
            raise StateNotFoundError(cfg.state_path, next_step="nothing to rekey; check --state-dir or --config")
        if not env.json:
            for item in items:
                click.echo(f"  {item.action:<10}  {item.path}  ({item.detail})")
        return items

    if dry_run:
        refuse_if_locked(cfg)
        action, why = _cli_rekey.journal_action(cfg, old=old)
        if action != "none" and not env.json:
            click.echo(f"  journal     {cfg.journal_path}  ({why})")
        items = plan()
        done = 0
    else:
        if _cli_rekey.journal_action(cfg, old=old)[0] == "fold":
            confirm(yes=yes, prompt=f"Save the journal's changes into {cfg.state_path} first?", what="rekey")
            from posstate.manager.manager import PositionStateManager

            with PositionStateManager(cfg.replace(durability="snapshot"), **env.manager_kwargs()) as m:
                m.load_positions()
                if m.dirty:
                    m.save()  # snapshot durability: the journal is folded into this save and removed
        with writer_lock(cfg):
            action, why = _cli_rekey.journal_action(cfg, old=old)
            if action == "fold":  # a bot wrote between the fold and the lock: start again
                raise CliError(f"{cfg.journal_path}: {why.split(':')[0]} appeared meanwhile; rerun rekey", code=EXIT_INVALID)
            items = plan()
            todo = sum(1 for i in items if i.action == "rekey")
            if todo or action == "set aside":
                confirm(yes=yes, prompt=f"Re-encrypt {todo} file(s) under key id {new.key_id}?", what="rekey")
            if action == "set aside":  # under the old key, a load with the new one would refuse it
                moved = _cli_rekey.set_journal_aside(cfg, old)
                if not env.json:
                    click.echo(f"  journal     moved to {moved} (the state file holds all of it)")
            if todo and sys.stderr.isatty():
                with click.progressbar(length=len(items), label="rekeying", file=sys.stderr) as bar:
                    done = _cli_rekey.run(items, old=old, new=new, cfg=cfg, progress=lambda _i: bar.update(1))
            else:
                done = _cli_rekey.run(items, old=old, new=new, cfg=cfg)
    bad = [i for i in items if i.action == "unreadable"]
    if env.json:
        json_out(
            {
                "dry_run": dry_run,
                "new_key_id": new.key_id,
                "rekeyed": done,
                "files": [{"path": str(i.path), "action": i.action, "detail": i.detail} for i in items],
            }
        )
    elif dry_run:
        click.echo(
            f"dry run: {sum(1 for i in items if i.action == 'rekey')} file(s) would be re-encrypted under key id {new.key_id}"
        )
    else:
        click.echo(f"re-encrypted {done} file(s) under key id {new.key_id}; use {new_key_file} from now on")
    if bad:
        raise CliError(
            f"{len(bad)} file(s) could not be read with the old key and were left as they are (first: {bad[0].detail}); "
            f"check them with `posstate validate {bad[0].path}`",
            code=EXIT_INVALID,
        )


# ------------------------------------------------------------------------------------------ export / import
@cli.command()
@click.argument("path", required=False, type=_PATH)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, allow_dash=True), help="New file for the JSON (0600; '-' for stdout)."
)
@_SNAPSHOT_ONLY
@common_options()
@click.pass_context
def export(ctx: click.Context, path: str | None, out: str, snapshot_only: bool) -> None:
    """Write the decrypted state document of PATH (default: the state file) as plain JSON.

    The state file is exported with its journal replayed (the state a restarted bot loads). The output
    is NOT encrypted: it is created 0600 and an existing file is never overwritten.
    """
    env = env_of(ctx)
    target = state_path_arg(env, path)
    try:
        got = read_state(env, target, snapshot_only=snapshot_only)
    except SchemaValidationError:  # a document that does not validate is still exported, with a warning
        got = None
    if got is not None:
        doc = got.document()
        described = got.label(str(target))
        count = len(got.state.positions)
    else:
        header, doc = _statefile.read_document(target, options=env.read_options())
        described = f"{target} (generation {header.generation})"
        count = header.position_count
    problem = None
    try:
        _document.decode_document(doc, path=target, skew=env.config().clock_skew)
    except Exception as exc:  # a document that does not validate is still exported, with a warning
        problem = str(exc)
    text = to_json(doc) + "\n"
    if out == "-":
        click.echo(text, nl=False)
    else:
        write_new_output(Path(out), text.encode("utf-8"))
        click.echo(f"exported {described}, {count} positions, to {out} (plain JSON: keep it safe)", err=True)
    if problem:
        click.echo(f"warning: the document does not validate ({problem}); `posstate import` will refuse it until fixed", err=True)


@cli.command(name="import")
@click.argument("file", type=_PATH)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Validate and show the changes; write nothing.")
@common_options()
@click.pass_context
def import_(ctx: click.Context, file: str, yes: bool, dry_run: bool) -> None:
    """Validate a plain JSON state document (as written by export) and save it as the state, encrypted.

    The document is checked strictly (duplicate keys refused, schema, relationships), then written through
    the normal atomic save as the next generation. Refused while a bot holds the writer lock.
    """
    from posstate.manager.manager import PositionStateManager

    env = env_of(ctx)
    cfg = env.config()
    src = Path(file)
    data = _statefile.read_bytes(src, what="file to import", max_size=cfg.max_document_bytes)
    if data.startswith(b"PSTATE"):
        raise CliError(
            f"{src}: is a posstate state file, not an exported JSON document; "
            f"export it first with `posstate export {src} --out FILE`"
        )
    try:
        doc = _document.loads(data, path=src, strict=True)
    except CorruptStateError as exc:
        raise CorruptStateError(
            src, exc.reason, next_step="give a JSON document written by `posstate export`", kind="not-a-state-file"
        ) from None
    incoming = _document.decode_document(doc, path=src, skew=cfg.clock_skew)

    def preview(current: StateData) -> bool:
        changes = diff_states(current, incoming)
        a = {"path": str(cfg.state_path), "generation": current.generation}
        b = {"path": file, "generation": incoming.generation}
        if env.json:
            json_out(diff_json(changes, a=a, b=b))
        else:
            for line in diff_lines(
                changes, a_label=f"{a['path']} (generation {a['generation']})", b_label=f"{file} (generation {b['generation']})"
            ):
                click.echo(line)
        return changes.identical

    def current_state() -> StateData:
        """The state on disk with its journal; a journal a load would have to recover from is refused."""
        if not fs.exists(cfg.state_path):
            return StateData()
        cur = read_current(cfg, env.read_options())
        if cur.error is not None:
            raise journal_refusal(cur.error, cfg)
        return cur.state

    if dry_run:
        refuse_if_locked(cfg)
        preview(current_state())
        click.echo("dry run: nothing was written", err=True)
        return
    current_state()  # refuse a damaged journal before the manager's load recovers from it unasked
    # One snapshot, all or nothing: the changes are made inside one transaction (memory only) and written
    # by one save. Snapshot durability, so no journal record is written first: a failure anywhere before
    # the save's rename leaves every file as it was (a journal a bot left is replayed on load and folded in).
    with PositionStateManager(cfg.replace(durability="snapshot"), **env.manager_kwargs()) as m:
        positions = m.get_positions()  # loads (and validates) the current state, its journal replayed
        current = StateData(generation=m.generation, positions=positions, metadata=m.get_all_symbol_metadata())
        identical = preview(current)
        if identical:
            click.echo("nothing to import: the state already holds these positions and metadata", err=True)
            return
        confirm(yes=yes, prompt=f"Replace the state in {cfg.state_path} with {file}?", what="import")
        with m.transaction():
            for k in current.positions.keys() - incoming.positions.keys():
                m.delete_position(*k)
            for p in incoming.positions.values():
                m.set_position(p)
            for s in current.metadata.keys() - incoming.metadata.keys():
                m.delete_symbol_metadata(s)
            for s, d in incoming.metadata.items():
                if current.metadata.get(s) != d:
                    m.set_symbol_metadata(s, d)
        try:
            generation = m.save()
        except PersistenceError as exc:
            raise _import_failed(exc, env, cfg, incoming) from exc
    how = "encrypted" if cfg.encryption else "NOT encrypted (encryption is off in the config)"
    click.echo(
        f"imported {len(incoming.positions)} positions and metadata for {len(incoming.metadata)} symbols "
        f"into {cfg.state_path} as generation {generation} ({how})",
        err=True,
    )


def _import_failed(exc: PersistenceError, env: Env, cfg: StateConfig, incoming: StateData) -> Exception:
    """Say whether the failed save left the import on disk (a failure after the rename) or nothing at all."""
    try:
        on_disk = read_current(cfg, env.read_options())
    except (PosStateError, OSError):
        return CliError(f"{exc}; could not read the state back afterwards: check it with `posstate validate`", code=EXIT_INVALID)
    landed = on_disk.state.positions == incoming.positions and on_disk.state.metadata == incoming.metadata
    if landed:
        return CliError(
            f"{cfg.state_path}: import: the new state file was renamed into place, then {exc.operation} failed "
            f"({exc.strerror}); the import IS on disk (generation {on_disk.generation}) but may not survive a power "
            "loss yet; check the disk and run `posstate validate`",
            code=EXIT_INVALID,
        )
    return CliError(f"{exc}; nothing was imported (the state on disk is unchanged)", code=EXIT_INVALID)


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
    from posstate.cli.watch_cmd import Watcher, record_line

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
            click.echo(to_json_line(record) if env.json else record_line(record))
            count += 1
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


def to_json_line(record: dict[str, object]) -> str:
    import orjson

    return orjson.dumps(record).decode("utf-8")


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


def main() -> None:
    """Console-script entry point (``posstate``, ``python -m posstate``, ``python cli.py``)."""
    cli(prog_name="posstate")
