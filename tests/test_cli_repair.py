"""``posstate repair [--dry-run]``: recovery of damaged files, entry-by-entry repair of invalid ones, every
decision printed; dry runs write nothing (CliRunner, exact exit codes and ``Error:`` lines)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import err_line, generation_of, make_state, pos, run, write_key

from posstate.cli import base as _cli_base
from posstate.core.config import StateConfig
from posstate.manager.manager import PositionStateManager
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import codec as _codec
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, generate_key
from posstate.storage.lock import WriterLock


@pytest.fixture
def state(tmp_path: Path, key: bytes, request: pytest.FixtureRequest) -> Path:
    """Three saves: backup of generation 1 (first save), .bak = generation 2 (BTC 2), main = generation 3 (BTC 3).

    Written in "snapshot" mode (one generation per save, no journal) unless parametrized indirectly with
    another durability; repair itself runs in the default "sync" mode."""
    durability = getattr(request, "param", "snapshot")
    d = tmp_path / "state"
    make_state(d, key, [pos("BTC/USDT", "long", "1")], durability=durability)
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability=durability), key=key) as m:
        m.load_positions()
        for n in ("2", "3"):
            m.set_position(pos("BTC/USDT", "long", n))
            m.save()
    return d


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


def flip(path: Path, offset: int = 250) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x04
    path.write_bytes(bytes(data))


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every entry under *directory* (directories too) with the bytes of each file."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in sorted(directory.rglob("*"))}


def loaded(state: Path, key: bytes) -> StateData:
    return _statefile.read(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key))).state


def write_doc(state: Path, key: bytes, doc: dict[str, Any], *, generation: int, count: int) -> None:
    """An encrypted container holding *doc* as it is (it may break the schema) as the state file."""
    enc = _codec.encode(
        _document.dumps(doc),
        generation=generation,
        written_at_ms=int(time.time() * 1000),
        position_count=count,
        compression_level=3,
        keyring=Keyring(key=key),
    )
    (state / "positions.json").write_bytes(enc.data)


def invalid_entries(state: Path, key: bytes) -> None:
    """Generation 4 with BTC valid, ETH with negative contracts (in no backup), SOL with a bad entry price."""
    st = StateData(
        generation=4,
        written_at="2020-01-01T00:00:00.000Z",
        writer={"host": "h", "pid": 1, "version": "0"},
        positions={("BTC/USDT", "long"): pos("BTC/USDT", "long", "4")},
        position_revs={("BTC/USDT", "long"): 4},
    )
    doc = _document.build_document(st)
    doc["positions"]["ETH/USDT|short"] = {
        "rev": 4,
        "position": {"symbol": "ETH/USDT", "side": "short", "contracts": "-5", "entry_price": "1"},
    }
    write_doc(state, key, doc, generation=4, count=2)


# ------------------------------------------------------------------------------------------ recovery
def test_repair_of_a_bit_flipped_file_restores_from_bak(state: Path, key: bytes, key_file: Path) -> None:
    """A flipped bit in the state file: repair prints every candidate, recovers from .bak (generation 2, the
    newest valid copy) as generation 4, and moves the damaged file to quarantine."""
    flip(state / "positions.json")
    (backup,) = os.listdir(state / "backups")
    bid = backup.removeprefix("positions_").removesuffix(".json")
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:5] == [
        f"{state}/positions.json: damaged: checksum mismatch (file damaged on disk)",
        "candidates:",
        "  positions.json: checksum mismatch (file damaged on disk)",
        "  positions.json.bak: chosen",
        f"  backup {bid}: valid, older than the chosen copy (generation 1)",
    ]
    (quarantined,) = os.listdir(state / "quarantine")
    assert lines[5].startswith("recovered from positions.json.bak (generation 2, ")
    assert lines[5].endswith(f"1 generations lost) as generation 4; damaged file moved to {state}/quarantine/{quarantined}")
    st = loaded(state, key)
    assert st.generation == 4 and st.positions[("BTC/USDT", "long")].contracts == 2


def test_repair_dry_run_writes_nothing(state: Path, key_file: Path) -> None:
    """--dry-run on a damaged file says what recovery would choose; the directory listing and every byte
    are the same afterwards (no lock file change, no quarantine, no temp)."""
    flip(state / "positions.json")
    before = tree(state)
    r = run([*keyed(state, key_file), "repair", "--dry-run"])
    assert r.exit_code == 0, r.stderr
    assert "  positions.json.bak: chosen" in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == (
        "would recover from positions.json.bak (generation 2; 1 generations lost) and move the damaged file to quarantine"
    )
    assert r.stderr.strip() == "dry run: nothing was written"
    assert tree(state) == before
    out = json.loads(run([*keyed(state, key_file), "repair", "--dry-run", "--json"]).stdout)
    assert out["action"] == "recover" and out["recovery"]["source"] == "positions.json.bak"
    assert tree(state) == before


def test_repair_needs_yes_and_can_be_declined(state: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No terminal: exit 2 asking for --yes; on a terminal 'n' is exit 1; nothing changed either way."""
    flip(state / "positions.json")
    before = tree(state)
    r = run([*keyed(state, key_file), "repair"])
    assert r.exit_code == 2
    assert err_line(r) == "Error: repair needs confirmation and there is no terminal to ask on; rerun with --yes"
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    r = run([*keyed(state, key_file), "repair"], input="n\n")
    assert r.exit_code == 1 and r.stderr.splitlines()[-1] == "Error: repair not confirmed; nothing was changed"
    assert tree(state) == before


@pytest.mark.parametrize("state", ["snapshot", "sync"], indirect=True)
def test_repair_of_a_valid_file_changes_nothing(state: Path, key_file: Path, request: pytest.FixtureRequest) -> None:
    """A valid state file (written in either mode; in sync mode with its journal beside it): 'nothing to
    repair', exit 0, no file touched."""
    before = tree(state)
    assert ("positions.json.journal" in before) == (request.node.callspec.params["state"] == "sync")
    generation = generation_of(state / "positions.json")
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 0
    assert r.stdout.splitlines() == [f"{state}/positions.json: valid (generation {generation}, 1 positions)", "nothing to repair"]
    assert tree(state) == before


def test_repair_with_nothing_trustworthy_lists_candidates_and_exits_1(state: Path, key_file: Path) -> None:
    """Every copy damaged: the candidates are printed, exit 1 with UnrecoverableStateError, nothing moved."""
    for p in [state / "positions.json", state / "positions.json.bak", *(state / "backups").iterdir()]:
        flip(p)
    before = tree(state)
    r = run([*keyed(state, key_file), "repair", "--dry-run"])
    assert r.exit_code == 1
    assert err_line(r) == (
        f"Error: {state}/positions.json: recovery would fail: no copy within backup_threshold can be trusted (see the "
        "candidates); restore an older backup on purpose with `posstate backups restore ID --accept-older`"
    )
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 1
    assert "  positions.json.bak: checksum mismatch (file damaged on disk)" in r.stdout.splitlines()
    assert err_line(r).startswith(f"Error: {state}/positions.json: no copy within the backup threshold could be loaded (")
    assert err_line(r).endswith("restore an older backup on purpose with `posstate backups restore ID --accept-older`")
    assert tree(state) == before


def test_repair_with_the_wrong_key_touches_nothing(state: Path, tmp_path: Path) -> None:
    """A wrong key is not corruption: exit 3, nothing quarantined or written."""
    other = write_key(tmp_path / "other.key", generate_key())
    before = tree(state)
    r = run([*keyed(state, other), "repair", "--yes"])
    assert r.exit_code == 3
    assert err_line(r).startswith(f"Error: {state}/positions.json: ")
    assert tree(state) == before


def test_repair_of_a_missing_state_file(state: Path, key: bytes, key_file: Path, tmp_path: Path) -> None:
    """State file lost but .bak kept: recovered from it. No state dir, or nothing at all: exit 6."""
    (state / "positions.json").unlink()
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{state}/positions.json: the state file is missing, but copies exist"
    assert loaded(state, key).positions[("BTC/USDT", "long")].contracts == 2
    r = run([*keyed(tmp_path / "nope", key_file), "repair", "--yes"])
    assert r.exit_code == 6
    assert err_line(r) == f"Error: {tmp_path}/nope: no such state directory; check --state-dir or --config"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run([*keyed(empty, key_file), "repair", "--dry-run"])
    assert r.exit_code == 6
    assert err_line(r) == (
        f"Error: {empty}/positions.json: no such state file; nothing to repair: there is no state file, no .bak and no backup"
    )


def test_repair_refused_while_locked(state: Path, key_file: Path) -> None:
    """A bot holds the writer lock: repair and its dry run exit 5 naming pid and host."""
    flip(state / "positions.json")
    cfg = StateConfig.in_dir(state)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        for extra in (["--yes"], ["--dry-run"]):
            r = run([*keyed(state, key_file), "repair", *extra])
            assert r.exit_code == 5
            assert err_line(r) == (
                f"Error: {state}/positions.json: locked by pid {os.getpid()} on host {socket.gethostname()}; stop that "
                "process first, or use a read-only command such as `posstate validate` or `posstate show`"
            )
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ entry-by-entry repair
def test_repair_entry_by_entry_dry_run_then_real(state: Path, key: bytes, key_file: Path) -> None:
    """A file that decrypts but fails validation: the dry run prints the per-entry decisions and writes
    nothing; the real run makes the same decisions, quarantines the original and writes a valid file."""
    invalid_entries(state, key)
    before = tree(state)
    r = run([*keyed(state, key_file), "repair", "--dry-run"])
    assert r.exit_code == 0, r.stderr
    expected = [
        "  kept      position BTC/USDT|long: valid",
        "  dropped   position ETH/USDT|short: invalid in the state file: $.contracts: contracts must be >= 0, got -5",
        "  dropped   position ETH/USDT|short: no valid backup holds it",
    ]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{state}/positions.json: decrypts but fails validation: ")
    assert lines[1] == "would repair entry by entry (the original goes to quarantine first):"
    assert lines[2:] == expected
    assert tree(state) == before
    r = run([*keyed(state, key_file), "repair", "--yes"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "decisions:" and lines[2:5] == expected
    (quarantined,) = os.listdir(state / "quarantine")
    assert lines[5] == (
        f"repaired: 1 kept, 0 restored, 2 dropped; original moved to {state}/quarantine/{quarantined}; written as generation 5"
    )
    st = loaded(state, key)
    assert set(st.positions) == {("BTC/USDT", "long")} and st.positions[("BTC/USDT", "long")].contracts == 4
