"""``posstate replica status|list|verify|restore|prune``: the replica off the machine (docs/REPLICATION.md).

The URL is the argument, else ``replica_url`` of --config; the S3 endpoint is --endpoint-url, else
``replica_endpoint_url``, else boto3's own settings (``AWS_ENDPOINT_URL``). Credentials come from boto3's usual
chain only. ``status``, ``list`` and ``prune`` need no key (names and sizes only); ``verify`` and ``restore``
decrypt and authenticate every object they use, so they need it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import click

from posstate.cli.base import EXIT_INVALID, CliError, cli, json_out
from posstate.cli.options import Env, common_options, env_of
from posstate.core.text import BAD_TEXT
from posstate.replica.client import ReplicaClient

__all__ = ["replica"]

URL = click.argument("url", required=False)
ENDPOINT = click.option(
    "--endpoint-url", default=None, help="S3-compatible endpoint (else replica_endpoint_url, AWS_ENDPOINT_URL)."
)


def _shown(text: object) -> str:
    """*text* from the replica (object names, lease fields: the bucket chooses them) with control and bidi
    characters escaped, so it cannot forge an output line or drive the terminal."""
    return BAD_TEXT.sub(lambda m: ascii(m.group())[1:-1], str(text))


def _client(env: Env, url: str | None, endpoint: str | None) -> ReplicaClient:
    from posstate.replica.clients import open_client

    cfg = env.config() if env.config_file or url is None else None
    found = url or (cfg.replica_url if cfg is not None else None)
    if not found:
        raise CliError("no replica URL: give it as an argument or set replica_url in --config")
    if not found.startswith(("s3://", "file://")):
        raise CliError(f"replica URL {found!r}: only s3://BUCKET/PREFIX and file:///PATH are supported")
    return open_client(found, endpoint_url=endpoint or (cfg.replica_endpoint_url if cfg is not None else None))


@cli.group()
@common_options()
def replica() -> None:
    """The replica off the machine: status, list, verify, restore, prune (docs/REPLICATION.md)."""


@replica.command()
@URL
@ENDPOINT
@common_options()
@click.pass_context
def status(ctx: click.Context, url: str | None, endpoint_url: str | None) -> None:
    """How far the replica is behind this state directory (journal records and seconds), and who holds the lease."""
    from posstate.replica import local as _local
    from posstate.replica import names as _names
    from posstate.replica.lease import read_holder

    env = env_of(ctx)
    client = _client(env, url, endpoint_url)
    cfg = env.config()
    snaps, ranges, _ = _names.split(o.key for o in client.list())
    local = _local.read_local(cfg.state_path, cfg.journal_path)
    holder = read_holder(client)
    epoch = max([s.epoch for s in snaps] + [0])
    shipped = _local.compare(local, snaps, ranges, epoch=epoch)
    out: dict[str, Any] = {
        "url": client.url,
        "state_file": str(cfg.state_path),
        "local_generation": local.generation,
        "snapshot_shipped": shipped.snapshot is not None,
        "records_behind": shipped.records_behind,
        "seconds_behind": round(shipped.lag_seconds(), 3),
        "snapshots": len(snaps),
        "journal_ranges": len(ranges),
        "lease": None,
    }
    if holder is not None:
        out["lease"] = {
            "epoch": holder.epoch,
            "host": holder.host,
            "pid": holder.pid,
            "released": holder.released,
            "expires_in": round(holder.expires_at - time.time(), 1),
        }
    if env.json:
        json_out(out)
        return
    click.echo(f"replica:         {out['url']}")
    if out["local_generation"] is None:  # nothing here to compare (run it where the bot's --state-dir is)
        click.echo(f"local state:     none at {out['state_file']} (give the bot's --state-dir to compare)")
        click.echo("snapshot:        not compared")
    else:
        click.echo(f"local state:     {out['state_file']} (generation {out['local_generation']})")
        click.echo(f"snapshot:        {'shipped' if out['snapshot_shipped'] else 'NOT shipped'}")
    click.echo(f"lag:             {out['records_behind']} journal records, {out['seconds_behind']:.1f} s")
    click.echo(f"objects:         {out['snapshots']} snapshots, {out['journal_ranges']} journal ranges")
    lease = out["lease"]
    if lease is None:
        click.echo("lease:           none")
    else:
        state = "released" if lease["released"] else f"expires in {lease['expires_in']} s (holder's clock)"
        click.echo(f"lease:           epoch {lease['epoch']}, pid {lease['pid']} on {_shown(lease['host'])}, {state}")


@replica.command(name="list")
@URL
@ENDPOINT
@common_options()
@click.pass_context
def list_(ctx: click.Context, url: str | None, endpoint_url: str | None) -> None:
    """What the replica holds: snapshots (generation, epoch, size, time) and journal ranges, by name only."""
    from posstate.replica import names as _names

    env = env_of(ctx)
    client = _client(env, url, endpoint_url)
    objects = client.list()
    info = {o.key: o for o in objects}
    snaps, ranges, other = _names.split(info)
    journals: dict[str, dict[str, Any]] = {}
    for r in ranges:
        j = journals.setdefault(
            r.folder, {"journal": r.journal_id, "base_generation": r.base_generation, "ranges": 0, "bytes": 0}
        )
        j["ranges"] += 1
        j["bytes"] += info[r.key].size
    rows = [
        {
            "key": s.key,
            "generation": s.generation,
            "epoch": s.epoch,
            "session": s.session,
            "size": info[s.key].size,
            "uploaded": _iso(info[s.key].modified),
        }
        for s in reversed(snaps)
    ]
    if env.json:
        json_out({"url": client.url, "snapshots": rows, "journals": list(journals.values()), "other": other})
        return
    click.echo(f"{'generation':>12}  {'epoch':>5}  {'size':>9}  uploaded")
    for row in rows:
        click.echo(f"{row['generation']:>12}  {row['epoch']:>5}  {row['size']:>9}  {row['uploaded'] or '-'}")
    for j in journals.values():
        click.echo(f"journal {j['journal']} (after generation {j['base_generation']}): {j['ranges']} ranges, {j['bytes']} bytes")
    for key in other:
        click.echo(f"unknown object (ignored): {_shown(key)}")


@replica.command()
@URL
@ENDPOINT
@common_options()
@click.pass_context
def verify(ctx: click.Context, url: str | None, endpoint_url: str | None) -> None:
    """Read and check every object: digests, decryption, every journal record authenticated (needs the key)."""
    from posstate.replica.verify import verify as _verify

    env = env_of(ctx)
    env.require_keyring()
    client = _client(env, url, endpoint_url)
    rows = _verify(client, options=env.read_options())
    bad = [r for r in rows if not r["ok"]]
    if env.json:
        json_out({"url": client.url, "objects": rows, "ok": not bad})
    else:
        for r in rows:
            click.echo(f"{'ok ' if r['ok'] else 'BAD'} {_shown(r['key'])}: {_shown(r['reason'])}")
        # one object may have two rows (a snapshot that decrypts, and its chain that restore refuses); the
        # folder row of a replica with no snapshot is no object
        keys = {r["key"] for r in rows if not r["key"].endswith("/")}
        none = "; no snapshot" if any(r["key"].endswith("/") for r in bad) else ""
        click.echo(f"{len(keys)} objects, {len({r['key'] for r in bad} & keys)} bad{none}")
    if bad:
        raise click.exceptions.Exit(EXIT_INVALID)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _parse_at(at: str | None) -> tuple[int | None, datetime | None]:
    if at is None:
        return None, None
    if at.isascii() and at.isdigit() and len(at) <= 20:  # a name holds 20 digits; int() refuses "²" and 4,301
        return int(at), None
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--at {at!r}: give a generation (a number) or an ISO 8601 time (2026-01-31T12:00:00Z)") from None
    return None, when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


@replica.command()
@click.argument("url", required=False)
@click.option("--at", "at", default=None, help="Restore as of this generation or ISO 8601 time (default: the newest).")
@ENDPOINT
@common_options()
@click.pass_context
def restore(ctx: click.Context, url: str | None, at: str | None, endpoint_url: str | None) -> None:
    """Rebuild --state-dir (empty) from the replica, verifying every object; the directory then goes on
    replicating to the same URL when its manager is configured with it."""
    from posstate.replica.restore import restore as _restore

    env = env_of(ctx)
    env.require_keyring()
    client = _client(env, url, endpoint_url)
    at_gen, at_time = _parse_at(at)
    from posstate.storage.lock import WriterLock

    cfg = env.config()
    from posstate.storage import fileops as fs

    fs.ensure_dir(cfg.state_dir)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path, timeout=0)  # a bot starting here meanwhile waits
    try:
        result = _restore(client, cfg, options=env.read_options(), at_generation=at_gen, at_time=at_time)
    finally:
        lock.release()
    if env.json:
        json_out(result.to_dict())
        return
    click.echo(
        f"restored generation {result.generation} (snapshot generation {result.snapshot_generation}, {result.records} journal "
        f"records, {result.objects} objects, {result.bytes} bytes) from {result.url} into {result.state_file}"
    )


@replica.command()
@URL
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@ENDPOINT
@common_options()
@click.pass_context
def prune(ctx: click.Context, url: str | None, dry_run: bool, endpoint_url: str | None) -> None:
    """Apply the local backups' keep rules (max_backups, keep_*) to the replica's snapshots and their journals."""
    from posstate.replica import prune as _prune

    env = env_of(ctx)
    client = _client(env, url, endpoint_url)
    plan = _prune.prune(client, policy=_prune.policy_of(env.config()), dry_run=dry_run)
    if env.json:
        json_out({"dry_run": dry_run, **plan.to_dict()})
        return
    verb = "would remove" if dry_run else "removed"
    for key in plan.remove:
        click.echo(f"{verb} {_shown(key)}: {plan.reasons[key]}")
    click.echo(f"kept {len(plan.keep)} objects, {verb} {len(plan.remove)}")
