"""Moving a state in and out: ``export`` (plain JSON) and ``import`` (a JSON document as the next generation)."""

from __future__ import annotations

from pathlib import Path

import click

from posstate.cli.base import (
    EXIT_INVALID,
    CliError,
    cli,
    confirm,
    json_out,
    refuse_if_locked,
    state_path_arg,
    write_new_output,
)
from posstate.cli.journal_cmd import journal_refusal, read_state
from posstate.cli.options import PATH_ARG, SNAPSHOT_ONLY, Env, common_options, env_of
from posstate.cli.output import echo_text
from posstate.cli.render import diff_json, diff_lines, diff_states, to_json
from posstate.core.config import StateConfig
from posstate.core.errors import (
    CorruptStateError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    UnsupportedVersionError,
)
from posstate.journal.current import read_current
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile


# ------------------------------------------------------------------------------------------ export / import
@cli.command()
@click.argument("path", required=False, type=PATH_ARG)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, allow_dash=True), help="New file for the JSON (0600; '-' for stdout)."
)
@SNAPSHOT_ONLY
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
        echo_text(text)
    else:
        write_new_output(Path(out), text.encode("utf-8"))
        click.echo(f"exported {described}, {count} positions, to {out} (plain JSON: keep it safe)", err=True)
        if env.json:  # --json: one document on stdout, as every other command
            json_out({"exported": str(target), "out": out, "positions": count, "valid": problem is None})
    if problem:
        click.echo(f"warning: the document does not validate ({problem}); `posstate import` will refuse it until fixed", err=True)


@cli.command(name="import")
@click.argument("file", type=PATH_ARG)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Validate and show the changes; write nothing.")
@common_options()
@click.pass_context
def import_(ctx: click.Context, file: str, yes: bool, dry_run: bool) -> None:
    """Validate a plain JSON state document (as written by export) and save it as the state, encrypted.

    The document is checked strictly (duplicate keys refused, schema, relationships), then written through
    the normal atomic save as the next generation. Refused while a bot holds the writer lock.

    The document replaces the positions, the symbol metadata (per-symbol data such as entry counts or
    trailing-stop state) and the bot metadata; a document without bot metadata clears the state's, with a
    warning. Order-ledger entries the document lacks or holds older are kept.
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
    found = doc.get("schema_version") if isinstance(doc, dict) else None
    if type(found) is int and found > _document.SCHEMA_VERSION:  # a newer posstate's export: exit 4, not damage
        raise UnsupportedVersionError(src, what="schema", found=found, supported=_document.SCHEMA_VERSION)
    incoming = _document.decode_document(doc, path=src, skew=cfg.clock_skew)

    def preview(current: StateData) -> bool:
        _keep_ledger_orders(current, incoming)
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
        cur.state.generation = cur.generation  # as the manager reports it after the replay (the import's label)
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
        current = StateData(
            generation=m.generation,
            positions=positions,
            metadata=m.get_all_symbol_metadata(),
            bot_metadata=m.get_bot_metadata(),
        )
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
            if (incoming.bot_metadata or {}) != (current.bot_metadata or {}):
                m.set_bot_metadata(incoming.bot_metadata or {})
        try:
            generation = m.save()
        except PersistenceError as exc:
            raise _import_failed(exc, env, cfg, incoming) from exc
    how = "encrypted" if cfg.encryption else "NOT encrypted (encryption is off in the config)"
    bot = f"the bot metadata ({len(incoming.bot_metadata)} keys)" if incoming.bot_metadata else "no bot metadata"
    if not incoming.bot_metadata and current.bot_metadata:  # newcomer leftovers 2: never a silent drop
        click.echo(
            f"warning: the document holds no bot metadata: the state's bot metadata ({len(current.bot_metadata)} "
            "keys) is cleared",
            err=True,
        )
    click.echo(
        f"imported {len(incoming.positions)} positions, metadata for {len(incoming.metadata)} symbols and {bot} "
        f"into {cfg.state_path} as generation {generation} ({how})",
        err=True,
    )


def _keep_ledger_orders(current: StateData, incoming: StateData) -> None:
    """Put the order-ledger entries the document lacks or holds older back into it: an order is the exchange's
    fact, and one forgotten here would be sent again when its decision is recorded anew (forget finished orders
    with ``forget_order``)."""
    from posstate.account import ledgerformat

    keep = ledgerformat.carry_orders(current.metadata, incoming.metadata)
    if keep:
        incoming.metadata.update(keep)
        keys = sorted(e["order"]["key"] for n, e in keep.items() if n != ledgerformat.FORGOTTEN)
        if keys:
            click.echo(
                f"keeping {len(keys)} ledger orders the document lacks or holds older (the exchange does not roll "
                f"back): {', '.join(keys)}",
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
