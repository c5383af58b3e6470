"""What the commands say must be true (issue 15.11): history agrees with show, watch flags a generation going
backwards and stops on SIGTERM as on Ctrl-C, an empty file fails the header check, a device is named a device,
a passphrase tried on a key-encrypted file is said in words, and in-memory values never point at `posstate repair`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from test_cli import ROOT, make_state, pos, run
from test_cli_process import DEADLINE, Proc

from posstate import PositionStateManager, StateConfig
from posstate.cli import watcher as _cli_watch
from posstate.core.errors import CorruptStateError, SchemaValidationError, WrongKeyError
from posstate.model.position import Position
from posstate.storage import codec as _codec
from posstate.storage.crypto import Keyring


@pytest.fixture
def proc() -> list[Proc]:
    procs: list[Proc] = []
    yield procs  # type: ignore[misc]
    for p in procs:
        p.stop()


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


# ------------------------------------------------------------------------------------------ history vs show
def test_history_agrees_with_show_after_save(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.11: after save() the journal's records are in the snapshot: show and history both say nothing is
    pending; a change after the save is the one change both report."""
    state = tmp_path / "state"
    make_state(state, key, [pos("BTC/USDT:USDT", "long", "0.1", "97000")])  # sync durability: the journal stays
    assert (state / "positions.json.journal").exists()
    show = run([*keyed(state, key_file), "show"])
    assert "journal: no changes since that snapshot" in show.stdout
    hist = run([*keyed(state, key_file), "history"])
    assert hist.exit_code == 0, hist.stderr
    assert hist.stdout.startswith(f"{state}/positions.json.journal: no changes recorded since the last snapshot")
    assert json.loads(run([*keyed(state, key_file), "history", "--json"]).stdout) == []
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.set_position(pos("ETH/USDT:USDT", "short", "2", "3400"))
    show = run([*keyed(state, key_file), "show"])
    assert "journal: 1 change record since that snapshot" in show.stdout
    entries = json.loads(run([*keyed(state, key_file), "history", "--json"]).stdout)
    assert [(e["key"], e["old_known"]) for e in entries] == [("ETH/USDT:USDT|short", True)]


# ------------------------------------------------------------------------------------------ watch
def test_watcher_flags_a_generation_going_backwards(tmp_path: Path, key: bytes) -> None:
    """issue 15.11: a .bak copied over the state file is flagged generation-backwards (in process)."""
    state = tmp_path / "state"
    make_state(state, key, [pos("A")], durability="snapshot")
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9, durability="snapshot"), key=key) as m:
        m.load_positions()
        m.set_position(pos("B"))
        m.save()
    cfg = StateConfig.in_dir(state)
    w = _cli_watch.Watcher(cfg=cfg, keyring=Keyring(key=key))
    w.start()
    try:
        shutil.copyfile(cfg.bak_path, tmp_path / "old")
        (tmp_path / "old").replace(cfg.state_path)
        rec = None
        while rec is None or rec["file"] != "positions.json":
            rec = w.next_record(DEADLINE)
            assert rec is not None, "no record for positions.json"
    finally:
        w.stop()
    assert "generation-backwards" in rec["flags"]
    assert "went backwards" in rec["detail"]


def test_watch_process_flags_backwards_and_exits_0_on_sigterm(
    tmp_path: Path, key: bytes, key_file: Path, proc: list[Proc]
) -> None:
    """issue 15.11: a real `posstate watch`: the .bak copied over the state file is [GENERATION-BACKWARDS]; SIGTERM exits 0."""
    state = tmp_path / "state"
    make_state(state, key, [pos("A")], durability="snapshot")
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9, durability="snapshot"), key=key) as m:
        m.load_positions()
        m.set_position(pos("B"))
        m.save()
    w = Proc([*keyed(state, key_file), "watch"])
    proc.append(w)
    assert w.line(w.err, "the ready line").startswith("watching ")
    shutil.copyfile(state / "positions.json.bak", tmp_path / "old")
    (tmp_path / "old").replace(state / "positions.json")
    line = ""
    while "positions.json:" not in line:
        line = w.line(w.out, "a line for positions.json")
    assert "[GENERATION-BACKWARDS]" in line
    w.p.send_signal(signal.SIGTERM)
    assert w.p.wait(timeout=DEADLINE) == 0


def test_watch_a_device_as_state_dir_is_refused(tmp_path: Path) -> None:
    """issue 15.11: `watch --state-dir /dev/null` names the device and exits (it used to wait forever)."""
    r = run(["--state-dir", "/dev/null", "watch", "--timeout", "5"])
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: /dev/null: is a character device, not a directory")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_watch_timeout_that_never_ends_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """`watch --timeout nan` is refused at once (nan compares false with every deadline: it looped forever)."""
    args = [sys.executable, str(ROOT / "cli.py"), "--state-dir", str(tmp_path), "watch", "--timeout", value]
    r = subprocess.run(args, capture_output=True, text=True, timeout=DEADLINE, cwd=ROOT, check=False)
    assert r.returncode == 2
    assert "must be a finite number of seconds" in r.stderr


# ------------------------------------------------------------------------------------------ validate
def test_empty_file_fails_the_header_check(tmp_path: Path) -> None:
    """issue 15.11: an empty file fails `header` (no "magic present"); the checksum is not run."""
    f = tmp_path / "empty.json"
    f.write_bytes(b"")
    r = run(["validate", str(f)])
    assert r.exit_code == 1
    assert "magic present" not in r.stdout
    lines = r.stdout.splitlines()
    assert any(line.split()[:2] == ["FAIL", "header"] and "file is empty (0 bytes)" in line for line in lines), r.stdout
    assert any(line.split()[:3] == ["-", "checksum", "not"] for line in lines), r.stdout
    doc = json.loads(run(["validate", str(f), "--json"]).stdout)
    assert [c["ok"] for c in doc["checks"] if c["name"] in ("header", "checksum")] == [False, None]


def test_short_file_with_magic_still_reports_it(tmp_path: Path, key: bytes) -> None:
    """issue 15.11: a file that does start with PSTATE but is cut short says "magic present", then fails the checksum."""
    path = make_state(tmp_path / "state", key, [pos("A")])
    path.write_bytes(path.read_bytes()[:-10])
    r = run(["validate", str(path)])
    assert r.exit_code == 1
    assert "PSTATE magic present" in r.stdout


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize(
    ("args", "code", "start"),
    [
        pytest.param(
            ["--state-dir", "/dev/null", "show"], 2, "Error: /dev/null: is a character device, not a directory", id="state-dir"
        ),
        pytest.param(["show", "/dev/null"], 1, "Error: /dev/null: is a character device, not a state file", id="show"),
        pytest.param(["export", "--out", "/dev/null"], 2, "Error: /dev/null: is a character device", id="export-out"),
        pytest.param(["keygen", "--out", "/dev/null"], 2, "Error: /dev/null: is a character device", id="keygen-out"),
        pytest.param(["reconcile", "--positions", "/dev/null"], 1, "Error: /dev/null: is a character device", id="reconcile"),
    ],
)
def test_dev_null_is_named_a_device(tmp_path: Path, key: bytes, key_file: Path, args: list[str], code: int, start: str) -> None:
    """issue 15.11: /dev/null given where a file or directory belongs is named a character device, never "already
    exists", "not a directory" (ENOTDIR) or "free space"."""
    make_state(tmp_path / "state", key, [pos("A")])
    base = ["--key-file", str(key_file)] if args[0] == "--state-dir" else keyed(tmp_path / "state", key_file)
    r = run([*base, *args])
    assert r.exit_code == code, r.stderr
    assert r.stderr.startswith(start), r.stderr
    assert "free space" not in r.stderr and "already exists" not in r.stderr


# ------------------------------------------------------------------------------------------ passphrase vs key
def test_passphrase_on_a_key_encrypted_file_says_so(tmp_path: Path, key: bytes) -> None:
    """issue 15.11: a passphrase tried on a file encrypted with a key file: the message says that in words."""
    make_state(tmp_path / "state", key, [pos("A")])
    r = run(["--state-dir", str(tmp_path / "state"), "show"], env={"POSSTATE_PASSPHRASE": "correct horse"})
    assert r.exit_code == 3
    assert "not a raw key" not in r.stderr
    assert "encrypted with a key file" in r.stderr and "a passphrase was given" in r.stderr
    data = (tmp_path / "state" / "positions.json").read_bytes()
    with pytest.raises(WrongKeyError) as exc:
        _codec.decode(data, keyring=Keyring(passphrase="correct horse"), path="p.json")
    assert exc.value.our_key_id is None
    assert str(exc.value).startswith("p.json: encrypted with a key file (key id ")


def test_key_on_a_passphrase_encrypted_file_says_so(tmp_path: Path) -> None:
    """issue 15.11: the other way round: a key file tried on a passphrase-encrypted file."""
    state = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), passphrase="correct horse") as m:
        m.load_positions()
        m.set_position(pos("A"))
        m.save()
    with pytest.raises(WrongKeyError) as exc:
        _codec.decode((state / "positions.json").read_bytes(), keyring=Keyring(key=b"k" * 32), path="p.json")
    assert "encrypted with a passphrase" in str(exc.value) and "a key file was given" in str(exc.value)


# ------------------------------------------------------------------------------------------ in-memory values
def test_in_memory_errors_do_not_suggest_repair(manager) -> None:  # type: ignore[no-untyped-def]
    """issue 15.11: a bad value passed in memory is the caller's to fix: no `posstate repair` in the message."""
    m = manager()
    m.load_positions()
    with pytest.raises(SchemaValidationError) as exc:
        m.set_symbol_metadata("BTC/USDT:USDT", {"x": float("nan")})
    assert "posstate repair" not in str(exc.value) and "posstate validate" not in str(exc.value)
    with pytest.raises((SchemaValidationError, ValueError)) as bad:
        Position(symbol="BTC/USDT:USDT", side="long", contracts=Decimal("-1"), entry_price=Decimal(1))
    assert "posstate repair" not in str(bad.value)
    with pytest.raises(CorruptStateError) as corrupt:
        _codec.decode(b"garbage bytes", keyring=None)
    assert "posstate repair" not in str(corrupt.value)


def test_stored_file_errors_still_suggest_repair(tmp_path: Path) -> None:
    """issue 15.11: the same error about a file on disk keeps its next step."""
    err = SchemaValidationError(tmp_path / "positions.json", "$.x", "type", "bad")
    assert "posstate repair" in str(err)


# ------------------------------------------------------------------------------------------ as real processes
def _posstate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "posstate", *args], env=child, capture_output=True, text=True, timeout=120)


def test_checks_as_real_processes(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.11 as real processes: history after save, an empty file, /dev/null, a passphrase on a key file."""
    state = tmp_path / "state"
    make_state(state, key, [pos("BTC/USDT:USDT", "long", "0.1", "97000")])
    hist = _posstate("--state-dir", str(state), "--key-file", str(key_file), "history")
    assert hist.returncode == 0 and "no changes recorded since the last snapshot" in hist.stdout
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    v = _posstate("validate", str(empty))
    assert v.returncode == 1 and "magic present" not in v.stdout and re.search(r"FAIL\s+header\s+file is empty", v.stdout)
    dev = _posstate("--state-dir", "/dev/null", "show")
    assert dev.returncode == 2 and dev.stderr.startswith("Error: /dev/null: is a character device, not a directory")
    pw = _posstate("--state-dir", str(state), "show", POSSTATE_PASSPHRASE="correct horse")
    assert pw.returncode == 3 and "encrypted with a key file" in pw.stderr and "a passphrase was given" in pw.stderr
