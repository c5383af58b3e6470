"""Key commands: ``keygen`` (a new key) and ``rekey`` (re-encrypt every file with a new key; the work is
:mod:`posstate.cli.rekey_cmd`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from posstate.cli.base import (
    EXIT_INVALID,
    CliError,
    cli,
    confirm,
    json_out,
    refuse_if_locked,
    write_new_output,
    writer_lock,
)
from posstate.cli.options import common_options, env_of
from posstate.core.errors import MissingKeyError, StateNotFoundError
from posstate.storage.crypto import Keyring, encode_key_text, generate_key, key_id, read_key_file


# ------------------------------------------------------------------------------------------ keys
@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the key to this new file (mode 0600; never overwritten).")
@common_options(hide=("state-dir", "config", "key-file"))
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
@click.option("--new-key-file", required=True, type=click.Path(), help="File with the new base64 key (see keygen --out).")
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
    try:
        new = Keyring(key=read_key_file(new_key_file))
    except MissingKeyError as exc:  # the new key's file: its own option to fix, not --key-file
        step = "give --new-key-file the file `posstate keygen --out FILE` wrote"
        raise MissingKeyError(exc.path, reason=exc.reason, next_step=step) from None
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
