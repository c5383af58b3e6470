"""Issue 15.2 and 15.3: backups hold what was acknowledged (timed backups in the journal modes, a backup at a
clean close, restore shows its diff and warns), and an operator backs up a running bot without its lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import backups as _backups
from posstate.cli import base as _cli_base
from posstate.cli.main import cli
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

ROOT = Path(__file__).resolve().parents[1]


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def read_backup(path: Path, key: bytes) -> Any:
    return _statefile.read(path, options=_statefile.ReadOptions(keyring=Keyring(key=key)), what="backup").state


def contracts(state: Any) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in state.positions.items()}


# ------------------------------------------------------------------------------------------ 15.2 timed and close
@pytest.mark.parametrize("durability", ["sync", "group"])
def test_timed_backup_in_a_journal_mode_holds_the_acknowledged_state(tmp_path: Path, key: bytes, durability: str) -> None:
    """issue 15.2: with no threshold compaction at all, a timed backup still holds every acknowledged change (the
    journal's, not only the last snapshot's; issue 14.2: through a compaction the backup asks for)."""
    cfg = StateConfig.in_dir(tmp_path / "state", durability=durability, backup_interval=0.05)
    taken: list[dict[str, Any]] = []
    fresh = threading.Event()
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))  # the first change compacts (a new journal); the rest are records only
        for i in range(2, 6):
            m.set_position(pos("A", i))
        want = m.generation

        def on_backup(event: dict[str, Any]) -> None:
            taken.append(event)
            if event["generation"] >= want:
                fresh.set()

        m.on("backupCreated", on_backup)
        assert fresh.wait(30), taken
        m.on("backupCreated", lambda e: None)
        newest = max(taken, key=lambda e: e["generation"])
        # Issue 14.2: the copy of the snapshot of a compaction the backup service asked for (not memory encoded
        # again), taken after every change above was acknowledged.
        assert "acknowledged" not in newest
        assert contracts(read_backup(Path(newest["path"]), key)) == {"A": 5}


def test_clean_close_leaves_a_fresh_backup(tmp_path: Path, key: bytes) -> None:
    """issue 15.2: a clean close() in a journal mode leaves a backup of every acknowledged change, even when
    no timed backup was due (default interval)."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("B", 2))
        m.set_symbol_metadata("A", {"step": 3})
        m.set_bot_metadata({"tick": 9})
        want = m.generation
    backups = _backups.scan(cfg.backup_path)
    assert backups and backups[0].generation == want
    state = read_backup(backups[0].path, key)
    assert contracts(state) == {"A": 1, "B": 2}
    assert state.metadata == {"A": {"step": 3}} and state.bot_metadata == {"tick": 9}
    with PositionStateManager(cfg, key=key) as m:  # reopened and closed with nothing new: no second backup
        m.load_positions()
        assert m.generation == want
    assert len(_backups.scan(cfg.backup_path)) == len(backups)


def test_close_backup_is_restorable_and_recovery_replays_nothing_twice(tmp_path: Path, key: bytes) -> None:
    """issue 15.2: the close backup names the journal records it holds: restoring it, or recovering from it
    while the journal is still there, gives exactly the acknowledged state."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))
    cfg.state_path.write_bytes(b"\0" * 100)  # the snapshot is gone; .bak is older; the close backup is newest
    cfg.bak_path.unlink(missing_ok=True)
    with PositionStateManager(cfg, key=key) as m:
        assert contracts_of(m) == {"A": 2}
        assert m.last_recovery is not None and m.last_recovery.generations_lost == 0


def contracts_of(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


def test_restore_prints_the_diff_and_warns_on_fewer_positions(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.2: `backups restore` prints what it would change (as `diff` does) before it asks, and warns
    loudly when the backup holds fewer positions than the current state."""
    state = tmp_path / "state"
    cfg = StateConfig.in_dir(state)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.save()
        old = m.create_backup()
        m.set_position(pos("A", 5))
        m.set_position(pos("B", 2))
        m.set_position(pos("C", 3))
        m.save()
    base = ["--state-dir", str(state), "--key-file", str(key_file)]
    r = CliRunner().invoke(cli, [*base, "backups", "restore", old.id, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "- B long" in r.stdout and "- C long" in r.stdout and "~ A long" in r.stdout
    assert 'contracts: "5" -> "1"' in r.stdout
    assert f"WARNING: backup {old.id} holds 1 position(s) but the current state holds 3" in r.stderr
    asked: list[str] = []

    def no(prompt: str, **_: Any) -> bool:
        asked.append(prompt)
        return False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cli_base, "is_terminal", lambda: True)
        mp.setattr("click.confirm", no)
        r = CliRunner().invoke(cli, [*base, "backups", "restore", old.id])
    assert r.exit_code == 1 and asked
    before_question = r.stderr
    assert "- B long" in before_question and "WARNING" in before_question
    r = CliRunner().invoke(cli, [*base, "--json", "backups", "restore", old.id, "--yes"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [p["symbol"] for p in out["changes"]["positions"]["removed"]] == ["B", "C"]
    assert out["warning"].startswith("WARNING")


# ------------------------------------------------------------------------------------------ 15.3 a running bot
_BOT = r"""
import sys
from decimal import Decimal
from posstate import PositionStateManager, Position, StateConfig, load_key
state, key_file, mode = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = StateConfig.in_dir(state, journal_max_records=7, backup_interval=3600)
def pos(s, c):
    return Position(symbol=s, side="long", contracts=Decimal(c), entry_price=Decimal("100"))
with PositionStateManager(cfg, key=load_key(key_file)) as m:
    for i in range(1, 12):
        m.set_position(pos("A", i))
    print("READY", m.generation, flush=True)
    if mode == "churn":  # keep writing (with compactions) until told to stop: X and Y always move together
        i = 0
        import select
        while not select.select([sys.stdin], [], [], 0)[0]:
            i += 1
            with m.transaction():
                m.set_position(pos("X", i))
                m.set_position(pos("Y", i))
        sys.stdin.readline()
    else:
        sys.stdin.readline()
    print("DONE", m.generation, flush=True)
"""


@pytest.fixture
def bot(tmp_path: Path, key_file: Path) -> Iterator[Any]:
    """Start a real bot process holding the writer lock; yields a starter; stops the bot at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str) -> tuple[subprocess.Popen[str], int]:
        p = subprocess.Popen(
            [sys.executable, "-c", _BOT, str(tmp_path / "state"), str(key_file), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("READY"), (line, p.stderr.read() if p.stderr else "")
        return p, int(line.split()[1])

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)  # waits, and closes the pipes


def _stop(p: subprocess.Popen[str]) -> int:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("stop\n")
    p.stdin.flush()
    line = p.stdout.readline()
    assert p.wait(30) == 0
    return int(line.split()[1])


def test_backup_create_and_verify_while_a_bot_holds_the_lock(tmp_path: Path, key: bytes, key_file: Path, bot: Any) -> None:
    """issue 15.3: `backups create` and `backups verify` work while a real bot process holds the writer lock; the
    backup holds every change the bot acknowledged (journal included); restored later, it is that state."""
    proc, acked = bot("idle")
    state = tmp_path / "state"
    base = ["--state-dir", str(state), "--key-file", str(key_file)]
    r = CliRunner().invoke(cli, [*base, "--json", "backups", "create"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert made["online"] is True and made["holder_pid"] == proc.pid and made["generation"] == acked
    assert contracts(read_backup(Path(made["path"]), key)) == {"A": 11}
    r = CliRunner().invoke(cli, [*base, "backups", "verify"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*base, "backups", "restore", made["id"], "--yes"])
    assert r.exit_code == 5  # replacing the state still needs the lock
    _stop(proc)
    with PositionStateManager(StateConfig.in_dir(state), key=key) as m:
        m.set_position(pos("A", 99))  # the bot's successor moves on
    r = CliRunner().invoke(cli, [*base, "backups", "restore", made["id"], "--yes", "--accept-older"])
    assert r.exit_code == 0, r.output
    with PositionStateManager(StateConfig.in_dir(state), key=key) as m:
        assert contracts_of(m) == {"A": 11}


def test_online_backups_of_a_churning_bot_are_consistent(tmp_path: Path, key: bytes, key_file: Path, bot: Any) -> None:
    """issue 15.3: backups taken without the lock while the bot keeps writing and compacting are each one
    consistent state (X and Y, always changed together, are equal) and validate fully."""
    proc, _ = bot("churn")
    state = tmp_path / "state"
    base = ["--state-dir", str(state), "--key-file", str(key_file)]
    seen = []
    for _ in range(8):
        r = CliRunner().invoke(cli, [*base, "--json", "backups", "create"])
        assert r.exit_code == 0, r.output
        made = json.loads(r.stdout)
        got = contracts(read_backup(Path(made["path"]), key))
        assert got.get("X") == got.get("Y"), got
        seen.append(got.get("X", 0))
    _stop(proc)
    assert seen == sorted(seen)
    r = CliRunner().invoke(cli, [*base, "backups", "verify"])
    assert r.exit_code == 0, r.output


def test_online_backup_refuses_without_the_key(tmp_path: Path, key: bytes, key_file: Path, bot: Any) -> None:
    """issue 15.3: without a key the online backup refuses (it must decrypt to check and to replay), exit 3."""
    bot("idle")
    r = CliRunner(env={"POSSTATE_KEY": None}).invoke(cli, ["--state-dir", str(tmp_path / "state"), "backups", "create"])
    assert r.exit_code == 3, r.output
    assert not list((tmp_path / "state" / "backups").glob(".online-*"))


def test_online_temps_are_swept_only_when_old(tmp_path: Path, key: bytes) -> None:
    """issue 15.3: the lock holder's sweep leaves a young online-backup temp alone (one may be in progress) and
    removes one an hour old (a killed online backup's); neither is ever listed as a backup."""
    cfg = StateConfig.in_dir(tmp_path / "state", durability="snapshot")
    cfg.backup_path.mkdir(parents=True)
    young = cfg.backup_path / ".online-positions_20260101_000000.json.0123456789abcdef.tmp"
    old = cfg.backup_path / ".online-positions_20250101_000000.json.fedcba9876543210.tmp"
    young.write_bytes(b"x")
    old.write_bytes(b"y")
    os.utime(old, (1.0, 1.0))
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.save()
        m.create_backup()
        assert all(b.path not in (young, old) for b in m.list_backups())
    assert young.exists() and not old.exists()


def test_restore_preview_reads_a_damaged_state_without_recovering_it(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.2: the diff shown before the question reads the current state read-only: a damaged state file is
    not recovered (nothing moved or written) before the operator answers; answered no, nothing changed."""
    state = tmp_path / "state"
    cfg = StateConfig.in_dir(state)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.save()
        backup = m.create_backup()
    cfg.state_path.write_bytes(b"\0" * 64)
    before = sorted(p.name for p in state.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cli_base, "is_terminal", lambda: True)
        mp.setattr("click.confirm", lambda *a, **k: False)
        r = CliRunner().invoke(cli, ["--state-dir", str(state), "--key-file", str(key_file), "backups", "restore", backup.id])
    assert r.exit_code == 1, r.output
    assert "the current state cannot be read" in r.stderr and "+ A long" in r.stderr
    assert sorted(p.name for p in state.rglob("*")) == before and cfg.state_path.read_bytes() == b"\0" * 64


def test_a_planted_newest_backup_does_not_silence_the_close_backup(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 (T1): a file planted in backups/ whose (unauthenticated) header claims a generation above the
    state's does not make close() believe its changes are backed up already."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    other = StateConfig.in_dir(tmp_path / "other")
    with PositionStateManager(other, key=key) as o:
        for i in range(30):
            o.save_positions([pos("Z", i + 1)])
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
    planted = cfg.backup_path / "positions_29990101_000000.json"  # sorts newest
    planted.write_bytes(other.state_path.read_bytes())
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 2))
        want = m.generation
    assert any(b.generation == want for b in _backups.scan(cfg.backup_path) if b.path != planted)
