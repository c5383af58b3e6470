"""``posstate backups list|create|restore|prune|verify`` and backup ids as PATH arguments (CliRunner, exact
exit codes and ``Error:`` lines), plus ``backups restore`` through a real ``python -m posstate`` process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import ROOT, err_line, generation_of, make_state, pos, run, snapshot

from posstate.backup import backups as _backups
from posstate.backup.backups import BackupInfo
from posstate.cli import base as _cli_base
from posstate.cli.base import exit_code_for
from posstate.core.config import StateConfig
from posstate.core.errors import AmbiguousBackupError, StaleBackupError
from posstate.manager.manager import PositionStateManager
from posstate.model.document import StateData
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

HOLDER = (
    "import sys; from pathlib import Path; from posstate.storage.lock import WriterLock; "
    "l = WriterLock(Path(sys.argv[1]), state_path=Path(sys.argv[2])); print('locked', flush=True); sys.stdin.read()"
)


@pytest.fixture
def state(tmp_path: Path, key: bytes) -> Path:
    """A state dir after two saves (BTC, then BTC + ETH) holding two backups: generation 1 and generation 2.
    Written in "snapshot" mode so each save is one generation and one backup (no base snapshot, no journal);
    the CLI commands run in the default "sync" mode, and test_sync_mode_state_create_list_restore covers
    a state written in sync mode."""
    d = tmp_path / "state"
    make_state(d, key, [pos("BTC/USDT", "long", "1")], durability="snapshot")  # the first save also makes a backup
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability="snapshot"), key=key) as m:
        m.load_positions()
        m.set_position(pos("ETH/USDT", "short", "2"))
        m.save()
        m.create_backup()
    return d


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


def ids(state: Path) -> list[str]:
    """Backup ids on disk, newest first."""
    return [b for b, _ in _backups.names_only(state / "backups")]


def flip(path: Path, offset: int = 250) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x04
    path.write_bytes(bytes(data))


def positions_of(state: Path, key: bytes) -> set[tuple[str, str]]:
    return set(
        _statefile.read(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key))).state.positions
    )


def old_backup(state: Path, key: bytes, *, hours: float = 2) -> BackupInfo:
    """A valid backup written *hours* ago holding only DOGE (older than backup_threshold)."""
    then = time.time() - hours * 3600
    st = StateData(generation=1, positions={("DOGE/USDT", "long"): pos("DOGE/USDT")}, position_revs={("DOGE/USDT", "long"): 1})
    return _backups.write_backup(
        st,
        backup_dir=state / "backups",
        keyring=Keyring(key=key),
        compression_level=None,
        options=_statefile.ReadOptions(keyring=Keyring(key=key)),
        now=then,
        written_at_ms=int(then * 1000),
    )


# ------------------------------------------------------------------------------------------ list
def test_list_table_and_json(state: Path, key_file: Path) -> None:
    """The table has every column; --json has id, created_at, generation, positions, size, valid per backup."""
    newest, older = ids(state)
    r = run([*keyed(state, key_file), "backups", "list"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["id", "created_at", "(UTC)", "generation", "positions", "size", "valid", "note"]
    assert lines[2].split()[0] == newest and lines[2].split()[3:5] == ["2", "2"] and lines[2].split()[-1] == "yes"
    assert lines[3].split()[0] == older and lines[3].split()[3:5] == ["1", "1"]
    assert lines[-1] == f"2 backups in {state}/backups"
    r = run([*keyed(state, key_file), "backups", "list", "--json"])
    items = json.loads(r.stdout)
    assert [i["id"] for i in items] == [newest, older]
    for i in items:
        assert {"id", "created_at", "generation", "positions", "size", "valid"} <= set(i)
        assert i["valid"] is True and i["size"] == (state / "backups" / f"positions_{i['id']}.json").stat().st_size
    assert [(i["generation"], i["positions"]) for i in items] == [(2, 2), (1, 1)]


def test_list_without_backups_and_without_state_dir(tmp_path: Path, key: bytes) -> None:
    """No backups: a line saying so and exit 0 ([] in JSON); a state dir that does not exist: exit 6."""
    d = tmp_path / "state"
    d.mkdir()
    r = run(["--state-dir", str(d), "backups", "list"])
    assert r.exit_code == 0 and r.stdout.strip() == f"no backups in {d}/backups; make one with `posstate backups create`"
    assert json.loads(run(["--state-dir", str(d), "backups", "list", "--json"]).stdout) == []
    r = run(["--state-dir", str(tmp_path / "nope"), "backups", "list"])
    assert r.exit_code == 6
    assert err_line(r) == f"Error: {tmp_path}/nope: no such state directory; check --state-dir or --config"


def test_damaged_backup_is_listed_as_damaged_and_verify_exits_1(state: Path, key_file: Path) -> None:
    """A bit flip in one backup: list marks it DAMAGED (exit 0); verify checks all, exits 1 naming it."""
    newest, older = ids(state)
    flip(state / "backups" / f"positions_{older}.json")
    r = run([*keyed(state, key_file), "backups", "list"])
    assert r.exit_code == 0
    row = next(line for line in r.stdout.splitlines() if line.split()[0] == older)
    assert "DAMAGED" in row and "checksum mismatch" in row
    assert r.stdout.splitlines()[-1] == f"2 backups in {state}/backups, 1 DAMAGED"
    assert [i["damaged"] for i in json.loads(run([*keyed(state, key_file), "backups", "list", "--json"]).stdout)] == [False, True]
    r = run([*keyed(state, key_file), "backups", "verify"])
    assert r.exit_code == 1
    w = max(len(newest), len(older))  # the id column is as wide as the longest id (a `_2` one)
    assert r.stdout.splitlines() == [
        f"  ok           {newest:<{w}}  generation 2, 2 positions",
        f"  DAMAGED      {older:<{w}}  checksum mismatch (file damaged on disk)",
        "1 of 2 backups valid",
    ]
    assert err_line(r) == (
        f"Error: {state}/backups: 1 of 2 backups damaged; move them to quarantine with `posstate backups prune` "
        f"(first: {older}: checksum mismatch (file damaged on disk))"
    )
    r = run([*keyed(state, key_file), "backups", "verify", "--json"])
    data = json.loads(r.stdout)
    assert r.exit_code == 1 and data["valid"] is False
    assert [(b["id"], b["verdict"], b["valid"]) for b in data["backups"]] == [(newest, "ok", True), (older, "DAMAGED", False)]


def test_verify_all_valid_no_backups_and_no_key(state: Path, key_file: Path, tmp_path: Path) -> None:
    """verify: exit 0 when all are valid; 3 when no key was given (contents not checked); 6 with no backups."""
    r = run([*keyed(state, key_file), "backups", "verify"])
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "2 of 2 backups valid"
    r = run(["--state-dir", str(state), "backups", "verify"])
    assert r.exit_code == 3
    assert err_line(r).startswith(f"Error: {state}/backups: 2 of 2 backups NOT checked: no key was given; rerun with --key-file")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(["--state-dir", str(empty), "backups", "verify"])
    assert r.exit_code == 6
    assert err_line(r) == f"Error: {empty}/backups: no such backup; nothing to verify; make one with `posstate backups create`"


# ------------------------------------------------------------------------------------------ create
def test_create_makes_a_verified_backup(state: Path, key_file: Path) -> None:
    """create writes one more backup of the saved state (generation 2) and prints its id."""
    before = ids(state)
    r = run([*keyed(state, key_file), "backups", "create"])
    assert r.exit_code == 0, r.stderr
    (new,) = set(ids(state)) - set(before)
    assert r.stdout.startswith(f"created backup {new}: generation 2, 2 positions, ")
    assert oct((state / "backups" / f"positions_{new}.json").stat().st_mode & 0o777) == "0o600"
    assert json.loads(run([*keyed(state, key_file), "backups", "create", "--json"]).stdout)["generation"] == 2


def test_create_refuses_a_damaged_or_missing_state_file(state: Path, key_file: Path) -> None:
    """create on a damaged state file: exit 1 pointing at repair, nothing written; no state file: exit 6."""
    flip(state / "positions.json")
    before = snapshot(state)
    r = run([*keyed(state, key_file), "backups", "create"])
    assert r.exit_code == 1
    assert err_line(r) == (
        f"Error: {state}/positions.json: checksum mismatch (file damaged on disk); recover with `posstate repair` "
        "or restore a backup with `posstate backups restore latest`"
    )
    assert snapshot(state) == before
    (state / "positions.json").unlink()
    r = run([*keyed(state, key_file), "backups", "create"])
    assert r.exit_code == 6
    assert err_line(r) == f"Error: {state}/positions.json: no such state file; nothing to back up yet; the bot saves it first"


def test_sync_mode_state_create_list_restore(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """Default (sync) durability throughout: on a state written with journaled changes and a save, create backs
    up the saved generation, list shows it valid, restore brings it back as a new generation, and the
    restored state then takes a journaled change that a fresh manager reloads."""
    d = tmp_path / "sync"
    make_state(d, key, [pos("BTC/USDT")])
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.set_position(pos("ETH/USDT", "short", "2"))
        saved = m.save()
    assert (d / "positions.json.journal").exists() and generation_of(d / "positions.json") == saved
    before = ids(d)
    r = run([*keyed(d, key_file), "backups", "create"])
    assert r.exit_code == 0, r.stderr
    (new,) = set(ids(d)) - set(before)
    assert r.stdout.startswith(f"created backup {new}: generation {saved}, 2 positions, ")
    listed = {i["id"]: i for i in json.loads(run([*keyed(d, key_file), "backups", "list", "--json"]).stdout)}
    assert listed[new]["valid"] is True and (listed[new]["generation"], listed[new]["positions"]) == (saved, 2)
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.delete_position("ETH/USDT", "short")
        changed = m.save()
    r = run([*keyed(d, key_file), "backups", "restore", new, "--yes"])
    assert r.exit_code == 0, r.stderr
    restored = generation_of(d / "positions.json")
    assert restored > changed and f"as generation {restored}; " in r.stdout
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        assert set(m.get_positions()) == {("BTC/USDT", "long"), ("ETH/USDT", "short")}
        m.set_position(pos("SOL/USDT"))  # journaled only: no save
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        assert set(m.get_positions()) == {("BTC/USDT", "long"), ("ETH/USDT", "short"), ("SOL/USDT", "long")}


def test_sync_mode_backup_holds_journaled_changes(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """In sync mode a change is durable on return: `backups create` run after it (no save between) holds it."""
    d = tmp_path / "sync"
    make_state(d, key, [pos("BTC/USDT")])
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.set_position(pos("ETH/USDT", "short", "2"))  # durable in the journal; not saved
    r = run([*keyed(d, key_file), "backups", "create"])
    assert r.exit_code == 0, r.stderr
    newest = d / "backups" / f"positions_{ids(d)[0]}.json"
    held = _statefile.read(newest, options=_statefile.ReadOptions(keyring=Keyring(key=key))).state.positions
    assert set(held) == {("BTC/USDT", "long"), ("ETH/USDT", "short")}


# ------------------------------------------------------------------------------------------ restore
def test_restore_by_unique_prefix_and_latest(state: Path, key: bytes, key_file: Path) -> None:
    """restore OLDER (a unique prefix, or the full id when it is a prefix of the newer id) brings back
    generation 1's positions as generation 3; latest brings back BTC+ETH."""
    newest, older = ids(state)
    prefix = next((older[:i] for i in range(1, len(older)) if not newest.startswith(older[:i])), older)
    r = run([*keyed(state, key_file), "backups", "restore", prefix, "--yes"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"restored backup {older} (generation 1, ")
    assert " into " + f"{state}/positions.json as generation 3; the replaced file is kept as backup " in r.stdout
    assert positions_of(state, key) == {("BTC/USDT", "long")}
    r = run([*keyed(state, key_file), "backups", "restore", "latest", "--yes", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generation"] == 4 and out["source_generation"] == 2
    assert positions_of(state, key) == {("BTC/USDT", "long"), ("ETH/USDT", "short")}


def test_restore_ambiguous_unknown_and_no_backups(state: Path, key_file: Path, tmp_path: Path, key: bytes) -> None:
    """An ambiguous prefix is exit 2 listing the matches; an unknown id exit 6; latest with no backups exit 6."""
    newest, older = ids(state)
    before = snapshot(state)
    r = run([*keyed(state, key_file), "backups", "restore", "20", "--yes"])
    assert r.exit_code == 2
    assert err_line(r) == (
        f"Error: {state}/backups: backup id '20' matches 2 backups ({newest}, {older}); give more digits of the id "
        "(`posstate backups list` shows them)"
    )
    r = run([*keyed(state, key_file), "backups", "restore", "19990101", "--yes"])
    assert r.exit_code == 6
    assert err_line(r) == (
        f"Error: {state}/backups/positions_19990101.json: no such backup; list backups with `posstate backups list`"
    )
    assert snapshot(state) == before
    bare = tmp_path / "bare"
    make_state(bare, key, [pos("A")])
    for f in (bare / "backups").iterdir():
        f.unlink()
    r = run([*keyed(bare, key_file), "backups", "restore", "latest", "--yes"])
    assert r.exit_code == 6
    assert err_line(r) == (
        f"Error: {bare}/backups: no such valid backup; no backup can be restored; list them with `posstate backups list`"
    )


def test_stale_backup_refused_then_accepted_with_accept_older(state: Path, key: bytes, key_file: Path) -> None:
    """A two-hour-old backup: restore exits 1 telling to use --accept-older (nothing changed); with it, exit 0."""
    old = old_backup(state, key)
    before = snapshot(state)
    r = run([*keyed(state, key_file), "backups", "restore", old.id, "--yes"])
    assert r.exit_code == 1
    line = err_line(r)
    assert line.startswith(f"Error: {old.path}: backup {old.id} is ")
    assert line.endswith(
        "s older than the last save, over the backup threshold of 3600 s; restoring it brings back stale positions, "
        "and stale positions lead to duplicate orders; reconcile with the exchange first, then restore on purpose with "
        f"`posstate backups restore {old.id} --accept-older`"
    )
    assert snapshot(state) == before
    r = run([*keyed(state, key_file), "backups", "restore", old.id, "--dry-run"])
    assert r.exit_code == 1 and err_line(r) == line  # the dry run applies the same age rule
    r = run([*keyed(state, key_file), "backups", "restore", old.id, "--dry-run", "--accept-older"])
    assert r.exit_code == 0
    assert r.stderr.splitlines()[-1].startswith(f"dry run: would restore backup {old.id} (generation 1, 1 positions, ")
    assert r.stderr.startswith(f"WARNING: backup {old.id} holds 1 position(s) but the current state holds 2")  # issue 15.2
    assert snapshot(state) == before
    r = run([*keyed(state, key_file), "backups", "restore", old.id, "--accept-older", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert positions_of(state, key) == {("DOGE/USDT", "long")}


def test_restore_confirmation(state: Path, key: bytes, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a terminal restore needs --yes (exit 2); on one, 'n' is exit 1 and nothing changes, 'y' restores."""
    before = snapshot(state)
    r = run([*keyed(state, key_file), "backups", "restore", "latest"])
    assert r.exit_code == 2
    assert err_line(r) == "Error: restore needs confirmation and there is no terminal to ask on; rerun with --yes"
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    r = run([*keyed(state, key_file), "backups", "restore", ids(state)[-1]], input="n\n")
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == "Error: restore not confirmed; nothing was changed"
    assert snapshot(state) == before
    r = run([*keyed(state, key_file), "backups", "restore", ids(state)[-1]], input="y\n")
    assert r.exit_code == 0 and positions_of(state, key) == {("BTC/USDT", "long")}


def test_restore_dry_run_validates_and_writes_nothing(state: Path, key_file: Path) -> None:
    """--dry-run prints the backup's checks and what would be restored; every file is unchanged."""
    newest, _ = ids(state)
    before = snapshot(state)
    listing = sorted(p.name for p in state.rglob("*"))
    r = run([*keyed(state, key_file), "backups", "restore", "latest", "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "VALID: generation 2, 2 positions, key id " + Keyring(key=_key_of(key_file)).key_id
    assert re.fullmatch(
        rf"dry run: would restore backup {newest} \(generation 2, 2 positions, \d+ s older than the last save\) into "
        rf"{state}/positions.json as a new generation; nothing was written",
        r.stderr.strip(),
    )
    assert snapshot(state) == before and sorted(p.name for p in state.rglob("*")) == listing
    flip(state / "backups" / f"positions_{newest}.json")
    r = run([*keyed(state, key_file), "backups", "restore", newest, "--dry-run"])
    assert r.exit_code == 1
    assert err_line(r).startswith(f"Error: {state}/backups/positions_{newest}.json: checksum mismatch (file damaged on disk)")


def _key_of(key_file: Path) -> bytes:
    from posstate.storage.crypto import read_key_file

    return read_key_file(key_file)


def test_restore_refused_while_a_child_process_holds_the_lock(state: Path, key_file: Path) -> None:
    """A real child process holds the writer lock: restore (and its dry run) exit 5 naming its pid and host."""
    cfg = StateConfig.in_dir(state)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cfg.lock_path), str(cfg.state_path)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(state)
        try:
            for extra in (["--yes"], ["--dry-run"]):
                r = run([*keyed(state, key_file), "backups", "restore", "latest", *extra])
                assert r.exit_code == 5
                assert err_line(r) == (
                    f"Error: {state}/positions.json: locked by pid {holder.pid} on host {socket.gethostname()}; stop that "
                    "process first, or use a read-only command such as `posstate validate` or `posstate show`"
                )
            assert snapshot(state) == before
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=30)


def test_restore_through_python_m_posstate(state: Path, key: bytes, key_file: Path) -> None:
    """`python -m posstate backups restore latest --yes` as a real process: exit 0, state restored. (Snapshot
    mode, as the fixture: in the journal modes a clean close backs up the last save, issue 15.2.)"""
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9, durability="snapshot"), key=key) as m:
        m.load_positions()
        m.delete_position("ETH/USDT", "short")
        m.set_position(pos("SOL/USDT"))
        m.save()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(
        [sys.executable, "-m", "posstate", *keyed(state, key_file), "backups", "restore", "latest", "--yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"restored backup {ids(state)[1]} (generation 2, ")
    assert positions_of(state, key) == {("BTC/USDT", "long"), ("ETH/USDT", "short")}


# ------------------------------------------------------------------------------------------ prune
def _many(state: Path, key: bytes, extra: int) -> None:
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=key) as m:
        for _ in range(extra):
            m.create_backup()


def _keep_one(tmp_path: Path) -> Path:
    cfg = tmp_path / "keep1.toml"
    cfg.write_text("[posstate]\nmax_backups = 1\n")
    return cfg


def test_prune_dry_run_removes_nothing_then_prune_removes(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """max_backups = 1: the dry run lists the newest as kept and the others as removed, each with its reason,
    and changes no file; prune --yes then removes exactly those."""
    _many(state, key, 1)
    newest, *rest = ids(state)
    args = [*keyed(state, key_file), "--config", str(_keep_one(tmp_path)), "backups", "prune"]
    before = snapshot(state)
    r = run([*args, "--dry-run"])
    assert r.exit_code == 0, r.stderr
    w = max(len(i) for i in (newest, *rest))  # the id column is as wide as the longest id (a `_2` one)
    assert r.stdout.splitlines() == [
        f"  keep         {newest:<{w}}  newest valid backup (never pruned)",
        *[f"  remove       {i:<{w}}  redundant: not selected by any retention rule (max_backups=1)" for i in rest],
        f"dry run: would leave 1 kept, {len(rest)} removed, 0 quarantined; nothing was changed",
    ]
    assert snapshot(state) == before
    r = run([*args])
    assert r.exit_code == 2
    assert err_line(r) == "Error: prune needs confirmation and there is no terminal to ask on; rerun with --yes"
    assert snapshot(state) == before
    r = run([*args, "--yes"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"1 kept, {len(rest)} removed, 0 quarantined"
    assert ids(state) == [newest]


def test_prune_and_verify_columns_align_with_a_same_second_suffix(state: Path, key_file: Path, tmp_path: Path) -> None:
    """newcomer leftovers 4: a `_2` id (two backups in one second) does not shift the reason/detail column of
    `backups prune` or `backups verify`; `backups list` stays aligned too."""
    backups = state / "backups"
    older, newer = sorted(backups.iterdir())  # generation 1, generation 2
    older.rename(backups / "positions_20261201_033000.json")
    newer.rename(backups / "positions_20261201_033000_2.json")
    args = [*keyed(state, key_file), "--config", str(_keep_one(tmp_path)), "backups"]
    r = run([*args, "prune", "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        "  keep         20261201_033000_2  newest valid backup (never pruned)",
        "  remove       20261201_033000    redundant: not selected by any retention rule (max_backups=1)",
    ]
    r = run([*args, "verify"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        "  ok           20261201_033000_2  generation 2, 2 positions",
        "  ok           20261201_033000    generation 1, 1 positions",
    ]
    listed = run([*args, "list"]).stdout.splitlines()
    assert len({line.index("  ", len("20261201_033000_2")) for line in listed if line.startswith("2026")}) == 1


def test_prune_on_a_terminal_shows_the_plan_and_asks(
    state: Path, key: bytes, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal prune shows what it would remove and asks: 'n' is exit 1 with nothing removed."""
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    newest, older = ids(state)
    before = snapshot(state)
    r = run([*keyed(state, key_file), "--config", str(_keep_one(tmp_path)), "backups", "prune"], input="n\n")
    assert r.exit_code == 1
    err = r.stderr.splitlines()
    w = max(len(newest), len(older))
    assert err[:2] == [
        f"  keep         {newest:<{w}}  newest valid backup (never pruned)",
        f"  remove       {older:<{w}}  redundant: not selected by any retention rule (max_backups=1)",
    ]
    assert err[-1] == "Error: prune not confirmed; nothing was changed"
    assert snapshot(state) == before


def test_prune_quarantines_a_damaged_backup(state: Path, key_file: Path) -> None:
    """A damaged backup is quarantined (never deleted) with its reason; the JSON says so."""
    _, older = ids(state)
    flip(state / "backups" / f"positions_{older}.json")
    r = run([*keyed(state, key_file), "backups", "prune", "--yes", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [d["id"] for d in out["quarantined"]] == [older] and out["removed"] == []
    assert "damaged (checksum mismatch" in out["quarantined"][0]["reason"]
    assert len(list((state / "quarantine").iterdir())) == 1 and older not in ids(state)


# ------------------------------------------------------------------------------------------ ids as PATH
def test_backup_ids_as_path_arguments(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """validate, show, diff and export accept `latest`, a full id and a prefix; read-only (no file changes)."""
    newest, older = ids(state)
    before = snapshot(state)
    r = run([*keyed(state, key_file), "validate", "latest"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == f"{state}/backups/positions_{newest}.json"
    r = run([*keyed(state, key_file), "show", older])
    assert r.exit_code == 0 and "BTC/USDT" in r.stdout and "ETH/USDT" not in r.stdout
    r = run([*keyed(state, key_file), "diff", older, "latest"])
    assert r.exit_code == 0 and any(line.startswith("+ ETH/USDT short") for line in r.stdout.splitlines())
    r = run([*keyed(state, key_file), "export", f"positions_{older}.json", "--out", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["generation"] == 1
    assert snapshot(state) == before


def test_backup_id_not_found_or_ambiguous_as_path(state: Path, key_file: Path) -> None:
    """An argument that is neither a file nor a backup: exit 6; an ambiguous prefix: exit 2."""
    newest, older = ids(state)
    r = run([*keyed(state, key_file), "show", "nosuch"])
    assert r.exit_code == 6
    assert err_line(r) == (
        f"Error: nosuch: no such file or backup; no file of that name and no backup with that id in {state}/backups; "
        "list backups with `posstate backups list`"
    )
    r = run([*keyed(state, key_file), "validate", "20"])
    assert r.exit_code == 2
    assert err_line(r).startswith(f"Error: {state}/backups: backup id '20' matches 2 backups ({newest}, {older})")


def test_new_errors_exit_codes() -> None:
    """An ambiguous backup prefix is a usage error (2); a refused stale restore is 1."""
    assert exit_code_for(AmbiguousBackupError("p", prefix="2", matches=["a", "b"])) == 2
    assert exit_code_for(StaleBackupError("p", backup_id="x", age=9000, threshold=3600)) == 1
