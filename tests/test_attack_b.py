"""An outside review of issue 12, points 5-7 (one writer, forked child, per-state names), tried as an attacker:
each test names the hole it closes (or, marked xfail, the one still open)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from posstate import ConfigError, PersistenceError, Position, PositionStateManager, StateConfig
from posstate.cli.main import cli
from posstate.storage.lock import WriterLock, is_locked

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "data" / "legacy_journal"
LEGACY_KEY = bytes(range(32))
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal(100))


def run(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env=CLEAN_ENV, catch_exceptions=False)


def key_file(path: Path, key: bytes) -> Path:
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    return path


def legacy_dir(tmp_path: Path) -> Path:
    """A state directory written by posstate 0.1.0: positions.json and its journal under the old name."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    for name in ("positions.json", "positions.journal"):
        (d / name).write_bytes((LEGACY / name).read_bytes())
        (d / name).chmod(0o600)
    return d


# ------------------------------------------------------------------------------------------ the lock file
def test_fifo_at_the_lock_path_never_hangs_a_command(tmp_path: Path) -> None:
    """issue 12.5 (review): a FIFO planted at positions.json.lock makes `posstate repair --dry-run` (is_locked)
    return at once instead of blocking forever in open()."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.mkfifo(d / "positions.json.lock", 0o600)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in CLEAN_ENV:
        env.pop(k, None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "posstate", "repair", "--dry-run", "--state-dir", str(d)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:  # pragma: no cover - the failure under test
        pytest.fail("posstate repair --dry-run blocked on the FIFO at the lock path")
    assert "Traceback" not in proc.stderr


def test_writer_lock_refuses_a_lock_path_that_is_not_a_regular_file(tmp_path: Path) -> None:
    """issue 12.5 (review): a FIFO at the lock path is refused with a typed error, never taken as the lock (a
    lock on a FIFO cannot name its holder, and every probe of it could block)."""
    lock_path = tmp_path / "positions.json.lock"
    os.mkfifo(lock_path, 0o600)
    with pytest.raises(PersistenceError):
        WriterLock(lock_path, state_path=tmp_path / "positions.json")
    assert not is_locked(lock_path)


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["quarantine", "backups"])
def test_state_file_named_like_a_folder_of_the_directory_is_refused(tmp_path: Path, name: str) -> None:
    """issue 12.7 (review): a state file named `quarantine` (or `backups`) is the folder positions.json quarantines
    into (backs up into): positions.json then cannot start after a torn journal tail; such a name is a ConfigError."""
    with pytest.raises(ConfigError):
        StateConfig.in_dir(tmp_path / "state").replace(state_file=str(tmp_path / "state" / name))


def test_state_file_inside_which_its_backups_would_go_is_refused(tmp_path: Path) -> None:
    """issue 12.7 (review): a state file whose own backup folder would be inside itself is a ConfigError."""
    with pytest.raises(ConfigError):
        StateConfig(state_file=str(tmp_path / "data"), backup_dir=str(tmp_path / "data"))


# ------------------------------------------------------------------------------------------ the CLI and names
def test_cli_path_argument_of_a_second_state_file_replays_its_journal(tmp_path: Path, key: bytes) -> None:
    """issue 12.7 (review): `posstate show DIR/positions.dat` shows what positions.dat's bot loads (its journal
    replayed), never the bare snapshot with a closed position back."""
    d = tmp_path / "state"
    dat = StateConfig.in_dir(d).replace(state_file=str(d / "positions.dat"))
    with PositionStateManager(dat, key=key) as m:
        m.set_position(pos("OLD", 1))
        m.save()
        m.delete_position("OLD", "long")  # acknowledged, in positions.dat.journal only
        m.set_position(pos("NEW", 2))
    kf = key_file(tmp_path / "k.key", key)
    res = run(["show", str(d / "positions.dat"), "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 0 and "NEW" in res.output and "OLD" not in res.output, res.output
    res = run(["export", str(d / "positions.dat"), "--out", "-", "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 0 and sorted(json.loads(res.output)["positions"]) == ["NEW|long"], res.output
    res = run(["validate", str(d / "positions.dat"), "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 0 and "after the snapshot" in res.output, res.output


def test_validate_and_history_read_the_journal_under_its_old_name(tmp_path: Path) -> None:
    """issue 12.7 (review): `validate` and `history` look at the journal a load reads (positions.journal of
    0.1.0), like `show`: never "no journal, nothing recorded" while a load replays four records."""
    d = legacy_dir(tmp_path)
    kf = key_file(tmp_path / "k.key", LEGACY_KEY)
    res = run(["validate", "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 0 and "4 after the snapshot" in res.output, res.output
    res = run(["history", "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 0 and "no journal" not in res.output and "C" in res.output, res.output


def test_validate_fails_on_damage_in_the_journal_under_its_old_name(tmp_path: Path) -> None:
    """issue 12.7 (review): damage before the last record of positions.journal (0.1.0) stops a load, so
    `validate` must not say VALID (exit 1)."""
    d = legacy_dir(tmp_path)
    j = d / "positions.journal"
    data = bytearray(j.read_bytes())
    data[-300] ^= 0xFF  # inside a record that others follow
    j.write_bytes(bytes(data))
    kf = key_file(tmp_path / "k.key", LEGACY_KEY)
    res = run(["validate", "--state-dir", str(d), "--key-file", str(kf)])
    assert res.exit_code == 1, res.output


def test_rekey_folds_the_journal_under_its_old_name(tmp_path: Path) -> None:
    """issue 12.7 (review): `posstate rekey` on a 0.1.0 directory folds positions.journal into the state file
    first; otherwise the snapshot (new key) names a journal under the old key and the bot cannot start."""
    d = legacy_dir(tmp_path)
    old = key_file(tmp_path / "old.key", LEGACY_KEY)
    new_key = bytes(range(1, 33))
    new = key_file(tmp_path / "new.key", new_key)
    res = run(["rekey", "--new-key-file", str(new), "--yes", "--state-dir", str(d), "--key-file", str(old)])
    assert res.exit_code == 0, res.output
    with PositionStateManager(StateConfig.in_dir(d), key=new_key) as m:
        assert {k[0] for k in m.load_positions()} == {"B", "C"}
        assert m.get_symbol_metadata("C") == {"note": "acknowledged"}
    assert not (d / "positions.journal").exists()
    assert list((d / "quarantine").glob("positions.journal.*"))  # kept, never deleted
