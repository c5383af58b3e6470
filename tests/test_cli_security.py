"""Issue 12, points 2 and 13 on the command line: the read commands refuse what a load refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import CLEAN_ENV, ROOT, err_line, run, write_key
from test_journal_security import KEY, _crafted, _raised, authentic, forge_journal, pos

from posstate import PositionStateManager, StateConfig
from posstate.journal import format as jf

COMMANDS = {
    "validate": ["validate"],
    "show": ["show"],
    "diff": ["diff", "{state}/positions.json", "{state}/positions.json"],
    "history": ["history"],
    "export": ["export", "--out", "{tmp}/out.json"],
    "watch": ["watch", "--timeout", "2"],
}


def _plain_state(d: Path) -> None:
    """A plaintext state file and journal (as anyone without the key can write them)."""
    with PositionStateManager(StateConfig.in_dir(d, encryption=False, backup_interval=1e9)) as m:
        m.set_position(pos("FORGED"))
        m.save()
        m.set_position(pos("FORGED2"))


def _args(name: str, state: Path, tmp: Path, key_file: Path) -> list[str]:
    args = [a.format(state=state, tmp=tmp) for a in COMMANDS[name]]
    return [*args, "--state-dir", str(state), "--key-file", str(key_file)]


@pytest.mark.parametrize("what", ["state file", "journal"])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_read_commands_refuse_plaintext_under_encryption(tmp_path: Path, name: str, what: str) -> None:
    """issue 12.2: with a key and encryption on, a plaintext state file (or a plaintext journal carrying the
    real journal id) is a key problem for every read command: exit 3, one Error line, never VALID."""
    state = tmp_path / "state"
    if what == "state file":
        _plain_state(state)
    else:
        authentic(state)
        forge_journal(state, ["FORGED"])
    key_file = write_key(tmp_path / "k.key", KEY)
    result = run(_args(name, state, tmp_path, key_file))
    assert result.exit_code == 3, result.output
    line = err_line(result)
    assert "not encrypted" in line
    assert not any(line == "VALID" for line in result.stdout.splitlines()) and "FORGED" not in result.stdout
    assert not (tmp_path / "out.json").exists()


def test_validate_subprocess_plaintext_journal_exit_3(tmp_path: Path) -> None:
    """issue 12.2: the installed entry point too (a real process): `posstate validate` exits 3."""
    state = tmp_path / "state"
    authentic(state)
    forge_journal(state, ["FORGED"])
    key_file = write_key(tmp_path / "k.key", KEY)
    env = {k: v for k, v in {**CLEAN_ENV, "PYTHONPATH": str(ROOT)}.items() if v is not None}
    proc = subprocess.run(
        [sys.executable, "-m", "posstate", "validate", "--state-dir", str(state), "--key-file", str(key_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("Error: ") == 1 and "not encrypted" in proc.stderr


def test_without_encryption_a_plaintext_state_still_reads(tmp_path: Path) -> None:
    """issue 12.2 (scope): with no key given the commands read a plaintext state as before (exit 0)."""
    state = tmp_path / "state"
    _plain_state(state)
    result = run(["show", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "FORGED2" in result.stdout


@pytest.mark.parametrize("length", [0, 1, jf.MAX_BODY + 1])
@pytest.mark.parametrize("name", ["validate", "show", "history"])
def test_crafted_frame_is_exit_1_not_no_changes(tmp_path: Path, name: str, length: int) -> None:
    """issue 12.13: a last record whose frame length passes its CRC but is 0, 1 or past the record limit is
    journal damage for validate, show and history (exit 1), never "no changes since the snapshot"."""
    state = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=KEY) as m:
        m.set_position(pos("A"))
        m.save()
        m.set_position(pos("B"))
    path = state / "positions.json.journal"
    data = path.read_bytes()
    last = jf.scan(data, jf.parse_header(data)).records[-1]
    path.write_bytes(_crafted(data, last.offset, length))
    key_file = write_key(tmp_path / "k.key", KEY)
    result = run([*COMMANDS[name], "--state-dir", str(state), "--key-file", str(key_file)])
    assert result.exit_code == 1, result.output
    assert "frame length" in err_line(result)
    assert "no changes" not in result.output


@pytest.mark.parametrize("checksum", [False, True], ids=["checksum kept", "checksum rewritten"])
@pytest.mark.parametrize("name", ["validate", "show", "history"])
def test_a_changed_frame_length_is_exit_1_not_a_torn_tail(tmp_path: Path, name: str, checksum: bool) -> None:
    """issue 12.13: the last record's length raised past the end of the file (its CRC recomputed, the record
    checksum kept or rewritten too) hides a whole record: journal damage for validate, show and history with
    the key (exit 1), never a torn last record left out with a warning."""
    state = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=KEY) as m:
        m.set_position(pos("A"))
        m.save()
        m.set_position(pos("B"))
    path = state / "positions.json.journal"
    data = path.read_bytes()
    last = jf.scan(data, jf.parse_header(data)).records[-1]
    path.write_bytes(_raised(data[: last.end], last, last.end - last.offset + 100, checksum=checksum))
    key_file = write_key(tmp_path / "k.key", KEY)
    result = run([*COMMANDS[name], "--state-dir", str(state), "--key-file", str(key_file)])
    assert result.exit_code == 1, result.output
    assert "frame length" in err_line(result) and "torn" not in result.output.replace("not a torn", "")
    assert "no changes" not in result.output
