"""The journal on the command line: ``posstate history`` and ``posstate doctor``, and the helpers that make
``show``, ``export``, ``diff`` and ``validate`` read the state file together with its journal.

Since the write-ahead journal the state a restarted bot loads is the snapshot plus the journal's records
(:func:`posstate.journal.current.read_current`, read-only). Backups and ``.bak`` have no journal and are read as
they are.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import orjson

from posstate.cli.base import cli, json_out
from posstate.cli.options import Env, common_options, env_of
from posstate.cli.render import table
from posstate.core.config import StateConfig, state_file_path
from posstate.core.errors import (
    ConfigError,
    CorruptStateError,
    MissingKeyError,
    PosStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.journal.current import Current, read_current
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.validate import Check

__all__ = [
    "ReadState",
    "history",
    "journal_check",
    "journal_exit_error",
    "journal_refusal",
    "read_state",
    "state_config_for",
]


# ------------------------------------------------------------------------------------------ reading
def state_config_for(env: Env, target: Path) -> StateConfig | None:
    """The config whose state file *target* is (its journal lies beside it), or None for a backup or any
    other copy. The configured state file, a file of the same name in another directory, or any file with its
    own lock or journal beside it (``positions.dat`` beside ``positions.dat.journal``: a second state file of
    the directory, whose bot replays that journal, so the CLI does too)."""
    cfg = env.config()
    if os.path.abspath(target) == os.path.abspath(cfg.state_path):
        return cfg
    if target.name == cfg.state_path.name or any(fs.exists(state_file_path(target, role)) for role in ("journal", "lock")):
        try:
            return cfg.replace(state_file=str(target), backup_dir=str(target.parent / "backups"))
        except ConfigError:
            return None  # not a name a state file can have (a .bak, a backup): a copy
    return None


def journal_read_path(cfg: StateConfig, options: _statefile.ReadOptions, snapshot_journal: Any = False) -> Path:
    """The journal file a load of *cfg*'s state file reads (``posstate.journal.files.journal_file`` decides, as for a load):
    ``cfg.journal_path``, or the old name (``positions.journal`` of posstate 0.1.0) when its header names the
    snapshot's journal. CorruptStateError when both names hold that journal with records past the snapshot.
    *snapshot_journal*: the snapshot's ``journal`` field if already read (False: read the snapshot here)."""
    from posstate.journal.files import journal_file

    legacy = cfg.legacy_journal_path
    if legacy is None or not fs.exists(legacy):
        return cfg.journal_path
    if snapshot_journal is False:
        try:
            snapshot_journal = _statefile.read(cfg.state_path, options=options).state.journal
        except PosStateError:
            return cfg.journal_path
    return journal_file(cfg.journal_path, legacy, snapshot_journal)


def journal_segments(cfg: StateConfig, options: _statefile.ReadOptions, first: Path) -> list[Path]:
    """The journal files a load replays, in order (issue 14: *first*, then a ``.next`` segment linked to it)."""
    from posstate.journal.files import segment_chain

    try:
        snapshot_journal = _statefile.read(cfg.state_path, options=options).state.journal
    except PosStateError:
        snapshot_journal = None
    try:
        chain = segment_chain(cfg.journal_path, cfg.legacy_journal_path, snapshot_journal)
    except CorruptStateError:
        return [first]
    return chain if first in chain or len(chain) == 1 else [first]


@dataclass(frozen=True, slots=True)
class ReadState:
    """What ``show``/``export``/``diff`` display: the state, its label and (for the state file) the journal."""

    path: Path
    state: StateData
    generation: int
    current: Current | None  # None: a backup, a .bak, or --snapshot-only
    options: _statefile.ReadOptions

    @property
    def journal_records(self) -> int:
        return self.current.applied if self.current is not None else 0

    def label(self, shown: str) -> str:
        if self.current is None or not self.current.applied:
            return f"{shown} (generation {self.generation})"
        return (
            f"{shown} (generation {self.current.loaded.state.generation} + {self.current.applied} journal "
            f"record{'s' if self.current.applied != 1 else ''})"
        )

    def document(self) -> Any:
        """The decrypted document: the file's own, or (journal records replayed) what a save would write."""
        if self.current is not None and self.current.applied:
            return self.current.document()
        _, doc = _statefile.read_document(self.path, options=self.options)
        return doc


def read_state(env: Env, target: Path, *, snapshot_only: bool = False) -> ReadState:
    """*target* read as a restarted bot would load it: with its journal when it is a state file.

    A damaged journal (or one a load would refuse) raises its typed error: the state cannot be shown as a
    bot would load it. A torn last record is a warning on stderr (a load cuts it off by itself).
    """
    options = env.read_options()
    cfg = None if snapshot_only else state_config_for(env, target)
    if cfg is None:
        loaded = _statefile.read(target, options=options)
        return ReadState(target, loaded.state, loaded.state.generation, None, options)
    cur = read_current(cfg, options)
    if cur.error is not None:
        raise journal_refusal(cur.error, cfg)
    for note in cur.notes:
        click.echo(f"warning: {cfg.journal_path}: {note}", err=True)
    return ReadState(target, cur.state, cur.generation, cur, options)


def journal_refusal(error: PosStateError, cfg: StateConfig) -> PosStateError:
    """The error to stop a command with when the journal cannot be replayed in full (its next step says how
    a load recovers, and how to see the snapshot alone)."""
    if isinstance(error, CorruptStateError) and error.kind == "journal":
        return CorruptStateError(
            cfg.journal_path,
            error.reason,
            next_step=(
                "the state a bot would load cannot be shown: its next load recovers (snapshot plus the records "
                "before the damage, or a backup) and quarantines the journal; see what it would choose with "
                "`posstate repair --dry-run`, or look at the snapshot alone with --snapshot-only"
            ),
            kind="journal",
        )
    return error


# ------------------------------------------------------------------------------------------ validate
@dataclass(frozen=True, slots=True)
class JournalVerdict:
    check: Check
    data: dict[str, Any]
    error: PosStateError | None  # the typed error for the exit code (damage: 1; key: 3)


def journal_check(env: Env, cfg: StateConfig, *, snapshot_valid: bool) -> JournalVerdict:
    """The ``journal`` line of ``posstate validate`` for the state file of *cfg*.

    With a valid snapshot the journal is checked against it (id, sequence numbers) and replayed read-only,
    as a load would; otherwise its framing, checksums and (with a key) records are checked on their own.
    A torn last record is ok (a load cuts it off); damage before the last record FAILs (exit 1), a wrong
    key FAILs (exit 3). Never writes.
    """
    from posstate.journal.audit import check
    from posstate.journal.format import VERSION

    keyring = env.keyring()
    options = env.read_options()
    cur: Current | None = None
    snapshot_journal = None
    if snapshot_valid:
        try:
            cur = read_current(cfg, options)
            snapshot_journal = cur.loaded.state.journal
        except PosStateError:
            cur = None  # the snapshot changed under us; its own check reports it
    try:
        path = journal_read_path(cfg, options, snapshot_journal if cur is not None else None)
    except CorruptStateError:
        path = cfg.journal_path  # both names hold the snapshot's journal: read_current reported it in cur.error
    jc = check(path, keyring=keyring, snapshot_journal=snapshot_journal, require_encryption=options.require_encryption)
    data = asdict(jc)
    data["applied"] = cur.applied if cur is not None else None
    # issue 14: the segment a background compaction started after *path* is checked too (records only)
    segs = [
        check(p, keyring=keyring, require_encryption=options.require_encryption)
        for p in journal_segments(cfg, options, path)
        if p != path
    ]
    data["segments"] = [asdict(x) for x in segs]
    seg_text = "".join(f"; segment {Path(x.path).name}: {x.records} records" for x in segs if x.exists)
    bad_seg = next((x for x in segs if not x.valid), None)
    if (bad_seg is not None and jc.valid) or (not jc.exists and segs and segs[0].exists):
        jc = bad_seg or segs[0]  # the first file missing: the snapshot's journal had no record past it
        path = Path(jc.path)
        seg_text = ""
    torn = f"; torn last record ({jc.torn_bytes} bytes) ignored, a load cuts it off" if jc.torn_bytes else ""
    if not jc.exists:
        detail = f"no journal at {path} (nothing recorded since the snapshot)"
        return JournalVerdict(Check("journal", True, detail), data, None)
    error: PosStateError | None = cur.error if cur is not None else None
    if error is None and jc.newer_version is not None:
        error = UnsupportedVersionError(path, what="journal format", found=jc.newer_version, supported=VERSION)
    if error is None and not jc.valid:
        typed = _typed(path, keyring, options.require_encryption) if jc.contents_checked else None
        error = typed or CorruptStateError(path, jc.problem, kind="journal")
    if error is not None:
        data["valid"] = False
        data["problem"] = str(error)
        return JournalVerdict(Check("journal", False, _first(str(error))), data, error)
    counted = jc.counted
    if not jc.contents_checked:
        return JournalVerdict(
            Check("journal", None, f"{counted}, framing and checksums ok; contents NOT checked (no key){torn}"),
            data,
            None,
        )
    if cur is None:
        detail = f"{counted} intact (not matched: the snapshot did not validate){torn}"
        return JournalVerdict(Check("journal", True, detail), data, None)
    if jc.matches_snapshot is False:
        detail = f"{counted} of an older journal, all held by the snapshot (ignored; replaced by the next change)"
    else:
        detail = f"{counted}{seg_text}, {cur.applied} after the snapshot (replayed on load){torn}"
    return JournalVerdict(Check("journal", True, detail), data, None)


def _typed(path: Path, keyring: Any, require_encryption: bool) -> PosStateError | None:
    """The typed error behind a failed check (wrong key vs damage), read again without a snapshot."""
    from posstate.journal.records import read_records

    try:
        read_records(fs.read_file(path), path=path, keyring=keyring, require_encryption=require_encryption)
    except PosStateError as exc:
        return exc
    except OSError:
        return None
    return None


def _first(text: str) -> str:
    return text.split("; ")[0]


def journal_exit_error(verdict: JournalVerdict, cfg: StateConfig) -> PosStateError | None:
    """What ``validate`` exits with for a failed journal check: a key problem (exit 3) and a journal written
    by a newer posstate (exit 4) keep their class, anything else is exit 1."""
    err = verdict.error
    if err is None or isinstance(err, (WrongKeyError, MissingKeyError, UnsupportedVersionError)):
        return err
    reason = err.reason if isinstance(err, CorruptStateError) else str(err)
    return CorruptStateError(
        cfg.journal_path,
        reason,
        next_step="a bot's next load stops here and recovers (the snapshot plus the records before the damage, or a "
        "backup) and quarantines the journal; see what it would choose with `posstate repair --dry-run`",
        kind="journal",
    )


# ------------------------------------------------------------------------------------------ history
def _compact(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def change_text(old: dict[str, Any] | None, new: dict[str, Any] | None, *, known: bool) -> str:
    """old -> new in one cell: changed fields only when both exist, else the whole value."""
    if not known:
        return ("removed" if new is None else f"set to {_compact(new)}") + " (old value unknown)"
    if old is None and new is None:
        return "(absent) -> (absent)"
    if old is None:
        return f"(absent) -> {_compact(new)}"
    if new is None:
        return f"{_compact(old)} -> (absent)"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return "unchanged"

    def cell(d: dict[str, Any], k: str) -> str:
        return _compact(d[k]) if k in d else "(absent)"

    return ", ".join(f"{k}: {cell(old, k)} -> {cell(new, k)}" for k in changed)


@cli.command()
@click.option("--symbol", help="Only this symbol's changes.")
@click.option("--orders", is_flag=True, help="The order ledger's events instead (every order, or --id).")
@click.option("--id", "order_id", help="With --orders: only this order (client order id, exchange id or key).")
@common_options()
@click.pass_context
def history(ctx: click.Context, symbol: str | None, orders: bool, order_id: str | None) -> None:
    """List the changes recorded in the journal since the last snapshot: time, key, old and new values.

    Oldest first; read-only (no lock). Old values are rebuilt by replaying the journal on its snapshot.
    A damaged journal is an error (exit 1); without a journal there is nothing to list (exit 0).
    With --orders: every event of the order ledger (all kept, not only since the snapshot), oldest first.
    """
    from posstate.journal.audit import check
    from posstate.journal.audit import history as journal_history

    env = env_of(ctx)
    cfg = env.config()
    if orders or order_id is not None:
        from posstate.cli.ledger_cmd import print_order_history

        got = read_state(env, cfg.state_path)
        print_order_history(env, got.state, path=cfg.state_path, order_id=order_id)
        return
    from posstate.cli.backups_cmd import require_state_dir

    require_state_dir(cfg)  # a mistyped --state-dir is exit 6, not "no changes recorded"
    _refuse_non_regular_state(cfg)
    path = journal_read_path(cfg, env.read_options())
    chain = journal_segments(cfg, env.read_options(), path)
    if not any(fs.exists(p) for p in chain):
        if env.json:
            json_out([])
        click.echo(
            f"no journal at {path}: no changes recorded since the last snapshot (durability {cfg.durability!r})",
            err=env.json,
        )
        return
    keyring = env.keyring()
    required = env.require_encryption()
    listed = journal_history(cfg, keyring=keyring, symbol=symbol, require_encryption=required, path=path, segments=chain)
    path = chain[-1]
    entries, held = _since_snapshot(cfg, env, listed)
    jc = check(path, keyring=keyring, require_encryption=required)
    if jc.torn_bytes:
        click.echo(f"warning: {path}: torn last record ({jc.torn_bytes} bytes) left out; a load cuts it off", err=True)
    if env.json:
        json_out(
            [
                {
                    "seq": e.seq,
                    "time": e.time.isoformat().replace("+00:00", "Z"),
                    "time_ms": e.time_ms,
                    "op": e.op,
                    "symbol": e.symbol,
                    "side": e.side,
                    "key": e.key,
                    "old": e.old,
                    "new": e.new,
                    "old_known": e.old_known,
                    "rev": e.rev,
                    "transaction": e.transaction,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        already = f" ({held} older change record{'s' if held != 1 else ''} already in the snapshot)" if held else ""
        click.echo(f"{path}: no changes recorded" + (f" for {symbol}" if symbol else "") + f" since the last snapshot{already}")
        return
    rows = [
        [
            str(e.seq),
            e.time.strftime("%Y-%m-%d %H:%M:%S.") + f"{e.time_ms % 1000:03d}",
            e.op + (" (txn)" if e.transaction else ""),
            e.key,
            change_text(e.old, e.new, known=e.old_known),
        ]
        for e in entries
    ]
    click.echo(f"{path}: {len(entries)} change{'s' if len(entries) != 1 else ''}" + (f" for {symbol}" if symbol else ""))
    for line in table(("seq", "time (UTC)", "op", "key", "old -> new"), rows, right=frozenset({0})):
        click.echo(line)


def _refuse_non_regular_state(cfg: StateConfig) -> None:
    """A FIFO, socket, device or directory at the state path is the loader's CorruptStateError (exit 1), as for
    every other read command (issue 12.14), never "no changes". Probed without reading a byte; an absent or
    damaged snapshot still leaves the journal to list (old values unknown)."""
    try:
        fs.read_file(cfg.state_path, limit=0, max_size=None)
    except fs.NotRegularFileError:
        _statefile.read_bytes(cfg.state_path)  # refuses it before reading, with the loader's words
    except OSError:
        pass


def _since_snapshot(cfg: StateConfig, env: Env, entries: Any) -> tuple[list[Any], int]:
    """The entries a restart would replay (those after the snapshot), as ``show`` counts them, and how many
    records were left out because the snapshot already holds them (issue 15.11: after ``save()`` both say the
    journal is empty). Without a readable snapshot every entry is kept (old values unknown)."""
    try:
        cur = read_current(cfg, env.read_options())
    except PosStateError:
        return list(entries), 0
    if cur.error is not None:
        return list(entries), 0  # history itself reported any damage; keep what it listed
    snap = cur.loaded.state.journal
    if not cur.applied or snap is None:
        return [], len({e.seq for e in entries})
    after = int(snap["seq"])
    return [e for e in entries if e.seq > after], len({e.seq for e in entries if e.seq <= after})
