"""An outside review of issue 15.8-15.12 (the command line as a Unix tool, the demo), tried as an attacker who can
write the state directory but has no key, with hostile arguments, and as a newcomer following the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, make_state, pos, run

from posstate import PositionStateManager, StateConfig
from posstate.storage.container import parse_header


def _forged_plaintext(state_dir: Path, tmp_path: Path) -> None:
    """An attacker without the key replaces the state file with a plaintext one of its choosing."""
    forged = tmp_path / "forged"
    with PositionStateManager(StateConfig.in_dir(forged, encryption=False)) as m:
        m.set_position(pos("EVIL/USDT:USDT", "long", "1000", "1"))
        m.save()
    (state_dir / "positions.json").write_bytes((forged / "positions.json").read_bytes())
    for name in ("positions.json.bak", "positions.json.journal"):
        (state_dir / name).unlink(missing_ok=True)


@pytest.fixture
def state_dir(tmp_path: Path, key: bytes) -> Path:
    make_state(tmp_path / "state", key, [pos("BTC/USDT:USDT", "long", "0.5", "97338.1")])
    return tmp_path / "state"


# ------------------------------------------------------------------------------------------ posstate.toml
@pytest.mark.parametrize(
    "toml",
    [
        pytest.param("encryption = false\n", id="flat"),
        pytest.param("[posstate]\nencryption = false\n", id="table"),
        pytest.param("[POSITION_STATE_MANAGER.PERSISTENCE]\nENCRYPTION = false\n", id="reference-form"),
    ],
)
def test_state_dir_config_cannot_turn_encryption_off(state_dir: Path, tmp_path: Path, key_file: Path, toml: str) -> None:
    """issue 15.10 (review): a posstate.toml planted in the state directory cannot make validate call a forged
    plaintext state VALID (it is refused, exit 2, naming the file and what to do)."""
    _forged_plaintext(state_dir, tmp_path)
    (state_dir / "posstate.toml").write_text(toml)
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "validate"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "VALID" not in r.stdout
    assert r.stderr.startswith(f"Error: {state_dir}/posstate.toml: ") and "--config" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_state_dir_config_cannot_make_a_command_write_plaintext(state_dir: Path, tmp_path: Path, key_file: Path) -> None:
    """issue 15.10 (review): with `encryption = false` planted in the state directory, `reconcile --apply` writes
    nothing (before: it wrote the state file in plaintext, readable by the attacker and refused by the bot)."""
    (state_dir / "posstate.toml").write_text("encryption = false\n")
    exchange = tmp_path / "exchange.json"
    exchange.write_text("[]")
    before = (state_dir / "positions.json").read_bytes()
    r = run(
        [
            "--state-dir",
            str(state_dir),
            "--key-file",
            str(key_file),
            "reconcile",
            "--positions",
            str(exchange),
            "--apply",
            "--yes",
        ]
    )
    assert r.exit_code == 2, r.stdout + r.stderr
    assert (state_dir / "positions.json").read_bytes() == before
    assert parse_header(before).encrypted


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("verify_after_write = false", id="verify_after_write"),
        pytest.param("validation_enabled = false", id="validation_enabled"),
        pytest.param('durability = "snapshot"', id="durability"),
        pytest.param(f"max_document_bytes = {2**62}", id="max_document_bytes"),
        pytest.param("clock_skew = 1e12", id="clock_skew"),
        pytest.param("lock_timeout = 1e9", id="lock_timeout"),
    ],
)
def test_state_dir_config_cannot_loosen_any_check(state_dir: Path, key_file: Path, line: str) -> None:
    """issue 15.10 (review): a posstate.toml in the state directory may not loosen a check, a write or a bound
    (each is exit 2 naming the setting); the same settings in a file the operator names with --config, outside the
    state directory, are the operator's choice and are used."""
    toml = state_dir / "posstate.toml"
    toml.write_text(line + "\n")
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "show"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert line.split(" ")[0] in r.stderr
    mine = state_dir.parent / "mine.toml"  # the operator's own file, outside the state directory
    mine.write_text(line + "\n")
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "--config", str(mine), "show"])
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("how", ["--config", "POSSTATE_CONFIG", "symlink-to-outside", "in-backups"])
def test_a_named_config_in_the_state_dir_gets_the_same_limits(state_dir: Path, tmp_path: Path, key_file: Path, how: str) -> None:
    """issue 15.10 (review): a config file the operator names (--config, POSSTATE_CONFIG=$POSSTATE_DIR/posstate.toml)
    but that sits in the state directory is as writable by the attacker as one found there: `encryption = false` in
    it is refused (exit 2), also when the attacker made it a symlink to a file of its own outside the directory."""
    _forged_plaintext(state_dir, tmp_path)
    toml = state_dir / "posstate.toml"
    if how == "symlink-to-outside":
        evil = tmp_path / "evil.toml"
        evil.write_text("encryption = false\n")
        toml.symlink_to(evil)
    elif how == "in-backups":
        toml = state_dir / "backups" / "bot.toml"
        toml.parent.mkdir(exist_ok=True)
        toml.write_text("encryption = false\n")
    else:
        toml.write_text("encryption = false\n")
    args = ["--state-dir", str(state_dir), "--key-file", str(key_file)]
    if how == "POSSTATE_CONFIG":
        r = run([*args, "validate"], env={"POSSTATE_CONFIG": str(toml)})
    else:
        r = run([*args, "--config", str(toml), "validate"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "VALID" not in r.stdout
    assert "outside the state directory" in r.stderr


def test_state_dir_config_cannot_name_itself_the_state_file(state_dir: Path, key_file: Path) -> None:
    """issue 15.10 (review): a state directory's posstate.toml naming itself as the state file is refused (exit 2):
    a restore or repair would otherwise write the state over it."""
    (state_dir / "posstate.toml").write_text('state_file = "posstate.toml"\n')
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "backups", "restore", "latest", "--yes"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "names itself as the state file" in r.stderr
    assert (state_dir / "posstate.toml").read_text() == 'state_file = "posstate.toml"\n'


def test_state_dir_config_may_tighten_and_name_its_state_file(state_dir: Path, key_file: Path) -> None:
    """issue 15.10 (review): what a state directory's posstate.toml may set it still sets: stricter bounds, the
    state file's name (in that directory only), retention; its backup_dir is that directory's backups/."""
    (state_dir / "positions.json").rename(state_dir / "book.json")
    (state_dir / "posstate.toml").write_text(
        'state_file = "/etc/book.json"\nbackup_dir = "/tmp/elsewhere"\nencryption = true\nclock_skew = 10.0\nmax_backups = 5\n'
    )
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "--verbose", "show"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{state_dir}/book.json: generation")
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "backups", "create"])
    assert r.exit_code == 0, r.stderr
    assert list((state_dir / "backups" / "book.json").glob("positions_*.json"))
    assert not Path("/tmp/elsewhere").exists()


def test_state_dir_config_symlink_is_not_followed(state_dir: Path, tmp_path: Path, key_file: Path) -> None:
    """issue 15.10 (review): a posstate.toml in the state directory that is a symlink (to a file the operator can
    read and the attacker cannot) is refused, never read, as every other planted file."""
    secret = tmp_path / "secret.toml"
    secret.write_text("not_for_the_attacker = 1\n")
    (state_dir / "posstate.toml").symlink_to(secret)
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "--json", "show"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "is a symlink, never followed" in r.stderr and "not_for_the_attacker" not in r.stdout + r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "ConfigError"


# ------------------------------------------------------------------------------------------ hostile arguments
def _process(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "posstate", *args], env=child, capture_output=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--json", "show", "/tmp/\udcff\udcfe"], id="path-arg"),
        pytest.param(["--json", "--state-dir", "/tmp/\udcff\udcfe", "show"], id="state-dir"),
    ],
)
def test_json_error_for_a_path_that_is_not_utf8(args: list[str]) -> None:
    """issue 15.9 (review): a path argument that is not UTF-8 (bytes 0xff 0xfe) gives one JSON error document and
    one Error: line, not a TypeError traceback from the JSON encoder and an empty stdout."""
    r = _process(*[os.fsencode(a).decode("utf-8", "surrogateescape") for a in args])
    assert b"Traceback" not in r.stderr
    assert r.returncode == 6, r.stderr
    doc = json.loads(r.stdout)
    assert doc["error"]["exit_code"] == 6 and "\\xff\\xfe" in doc["error"]["message"]
    assert r.stderr.decode("utf-8", "replace").startswith("Error: ")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(["show", "a" * 300], 6, id="show"),
        pytest.param(["diff", "a" * 300, "latest"], 6, id="diff"),
        pytest.param(["--state-dir", "/tmp/" + "a" * 300, "show"], 2, id="state-dir"),
        pytest.param(["doctor", "--state-dir", "/tmp/" + "a" * 300], 2, id="doctor"),
    ],
)
def test_a_name_too_long_is_a_typed_error(state_dir: Path, key_file: Path, args: list[str], code: int) -> None:
    """issue 15.11 (review): a path with a name over NAME_MAX is named for what it is (a file argument: not found,
    exit 6; a state directory: a usage error, exit 2), never "unexpected OSError ... report it"."""
    r = run(["--key-file", str(key_file), *args], env={"POSSTATE_DIR": str(state_dir)})
    assert r.exit_code == code, r.stderr
    assert "unexpected" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: ")


# ------------------------------------------------------------------------------------------ the demo
def _console_script() -> Path:
    """The installed `posstate` beside this interpreter (scripts/_venv.sh installs it); skipped without one, except
    in CI (POSSTATE_CI=1), where its absence is a failure."""
    here = Path(sys.executable).parent / "posstate"
    if not here.exists():
        reason = f"no posstate console script beside {sys.executable} (posstate not installed in this venv)"
        if os.environ.get("POSSTATE_CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return here


def test_demo_says_how_to_reach_posstate_when_it_is_not_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.12 (review): after `bash scripts/demo.sh` from a fresh clone, `posstate` is in .venv/bin, not on the
    PATH: the commands the demo prints to explore must work as printed (it prints the PATH to use)."""
    console_script = _console_script()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    r = run(["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "30", "--seed", "3"])
    assert r.exit_code == 0, r.output
    explore = r.stdout.split("== Explore it yourself", 1)[1].strip().splitlines()
    assert explore[0].strip() == f'export PATH="{console_script.parent}:$PATH"', explore
    # the printed commands work as printed in a shell without posstate on its PATH
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT), PATH="/usr/bin:/bin")
    script = "\n".join(line.strip() for line in explore[:3])
    done = subprocess.run(["bash", "-c", script], env=child, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "generation" in done.stdout


def test_demo_sh_passes_the_callers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.12 (review): scripts/demo.sh puts .venv/bin on its own PATH before it runs the demo, so the demo
    judges by the caller's PATH, which the script saves in POSSTATE_DEMO_CALLER_PATH (it printed no PATH line from a
    fresh clone, where the caller's shell has no posstate)."""
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert script.index('export POSSTATE_DEMO_CALLER_PATH="$PATH"') < script.index("source ")
    console_script = _console_script()
    monkeypatch.setenv("PATH", f"{console_script.parent}:/usr/bin:/bin")  # as _venv.sh leaves it
    monkeypatch.setenv("POSSTATE_DEMO_CALLER_PATH", "/usr/bin:/bin")
    r = run(["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "5", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert f'export PATH="{console_script.parent}:$PATH"' in r.stdout


def test_demo_prints_no_path_when_posstate_is_on_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.12 (review): with the running posstate on the PATH the demo prints no PATH line."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    r = run(["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "5", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "export PATH=" not in r.stdout


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_history_with_a_journal_that_is_not_a_file_is_a_typed_error(state_dir: Path, key_file: Path, kind: str) -> None:
    """issue 15.11 (review): `history` with a FIFO (or a directory) planted as the journal is one Error: line naming
    what it is, exit 1, and a JSON error under --json, never "unexpected NotRegularFileError" (and never a hang)."""
    journal = state_dir / "positions.json.journal"
    journal.unlink(missing_ok=True)
    os.mkfifo(journal) if kind == "fifo" else journal.mkdir()
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "--json", "history"])
    assert r.exit_code == 1, r.stderr
    assert "unexpected" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert f"{journal}: read journal failed" in r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "PersistenceError"


def test_export_to_a_file_under_json_prints_one_document(state_dir: Path, key_file: Path, tmp_path: Path) -> None:
    """issue 15.9 (review): `export --out FILE --json` prints one JSON document saying what it wrote (stdout was
    empty: the one command whose --json run printed nothing to parse)."""
    out = tmp_path / "out.json"
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "--json", "export", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"exported": str(state_dir / "positions.json"), "out": str(out), "positions": 1, "valid": True}
    assert json.loads(out.read_text())["positions"]


# ------------------------------------------------------------------------------------------ watch
def _forged_generation(path: Path, generation: int) -> None:
    """The state file with its keyless header claiming *generation* and the SHA-256 trailer recomputed: what an
    attacker without the key can write (it fails authentication)."""
    from posstate.storage import container as _format

    data = path.read_bytes()
    start, width = _format.OFFSETS["g"]
    head = bytearray(data[: _format.HEADER_SIZE])
    head[start : start + width] = b"%0*x" % (width, generation)
    body = bytes(head) + data[_format.HEADER_SIZE : -_format.TRAILER_SIZE]
    _put(path, body + _format.trailer_for(body))


def _put(path: Path, data: bytes) -> None:
    """Replace *path* by a rename, as an attacker (or a save) would: one change for watch to see."""
    tmp = path.with_name("planted")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.mark.parametrize("when", ["at-start", "while-watching"])
def test_watch_counter_is_not_poisoned_by_a_forged_header(tmp_path: Path, key: bytes, when: str) -> None:
    """issue 15.11 (review): a state file whose unauthenticated header claims a huge generation (flagged as a key
    problem) does not raise watch's highest generation: the bot's next genuine save is not flagged
    generation-backwards (a false alarm that says a rollback happened), and a real rollback still is."""
    from posstate.cli import watcher as _cli_watch
    from posstate.storage.crypto import Keyring

    state = tmp_path / "state"
    make_state(state, key, [pos("A/USDT:USDT")])
    cfg = StateConfig.in_dir(state, backup_interval=1e9, durability="snapshot")
    genuine = (state / "positions.json").read_bytes()
    if when == "at-start":
        _forged_generation(state / "positions.json", 2**40)
    w = _cli_watch.Watcher(cfg=StateConfig.in_dir(state), keyring=Keyring(key=key))
    w.start()

    def next_state_record() -> dict[str, object]:
        while True:
            rec = w.next_record(30)
            assert rec is not None, "no record for positions.json"
            if rec["file"] == "positions.json":
                return rec

    try:
        if when == "while-watching":
            _forged_generation(state / "positions.json", 2**40)
            assert "key" in next_state_record()["flags"]
        _put(state / "positions.json", genuine)  # the authentic file back (as the bot's last save)
        next_state_record()
        with PositionStateManager(cfg, key=key) as m:
            m.load_positions()
            m.set_position(pos("B/USDT:USDT"))
            m.save()
        rec = next_state_record()
        assert rec["status"] == "valid" and "generation-backwards" not in rec["flags"], rec
        _put(state / "positions.json", genuine)  # a real rollback is still flagged
        assert "generation-backwards" in next_state_record()["flags"]
    finally:
        w.stop()


# ------------------------------------------------------------------------------------------ keys in words
def test_a_wrong_passphrase_is_called_a_wrong_passphrase(tmp_path: Path) -> None:
    """issue 15.11 (review): the wrong passphrase on a passphrase-encrypted state (and journal) says the passphrase is
    not the one the file was written with and points at POSSTATE_PASSPHRASE, not "supply the key with that id
    (POSSTATE_KEY, POSSTATE_KEY_FILE or --key-file)", which sends the operator looking for a key file that never
    existed."""
    state = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), passphrase="correct horse") as m:
        m.load_positions()
        m.set_position(pos("A/USDT:USDT"))  # journaled: the journal is checked too
    for args in (["validate"], ["history"], ["show"]):
        r = run(["--state-dir", str(state), *args], env={"POSSTATE_PASSPHRASE": "battery staple"})
        assert r.exit_code == 3, (args, r.stderr)
        assert "not the passphrase" in r.stderr and "POSSTATE_PASSPHRASE" in r.stderr, (args, r.stderr)
        assert "--key-file" not in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("where", ["before", "after"])
def test_demo_under_json_prints_one_document(tmp_path: Path, where: str) -> None:
    """issue 15.9/15.12 (review): `posstate --json demo` (or `demo --json`: common options go before or after the
    command name) tells its story on stderr and prints one JSON document on stdout (it printed the whole story on
    stdout, and `demo --json` was "No such option")."""
    args = ["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "5", "--seed", "3"]
    r = run(["--json", *args] if where == "before" else [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == {"ok": True, "state_dir": str(tmp_path / "demo" / "state"), "key_file": str(tmp_path / "demo" / "demo.key")}
    assert "== 1. SIGKILL" in r.stderr


# ------------------------------------------------------------------------------------------ stdout that fails
@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(["show"], 1, id="show"),
        pytest.param(["--json", "show"], 1, id="show-json"),
        pytest.param(["--json", "show", "/nonexistent/x"], 6, id="json-error"),
        pytest.param(["backups", "list"], 1, id="backups-list"),
        pytest.param(["export", "--out", "-"], 1, id="export-stdout"),
        pytest.param(["--help"], 1, id="help"),
        pytest.param(["show", "--help"], 1, id="command-help"),
        pytest.param(["--version"], 1, id="version"),
        pytest.param([], 1, id="bare"),
        pytest.param(["--json", "bogus"], 2, id="json-usage-error"),
    ],
)
def test_stdout_on_a_full_disk_is_one_error_line(state_dir: Path, key_file: Path, args: list[str], code: int) -> None:
    """issue 15.8/15.9 (review): stdout that fails with ENOSPC (`> /dev/full`) is one Error: line naming stdout and
    exit 1 (a command's own error keeps its code), never "unexpected OSError ... report it", and under --json never
    a traceback from writing the JSON error to the same full stdout."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT), POSSTATE_DIR=str(state_dir), POSSTATE_KEY_FILE=str(key_file))
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "posstate", *args], env=child, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: "), r.stderr
    if code == 1:
        assert r.stderr.startswith("Error: <stdout>: write failed (ENOSPC"), r.stderr


# ------------------------------------------------------------------------------------------ colour
@pytest.mark.parametrize(("value", "coloured"), [("", True), ("0", False), ("false", False), ("1", False)])
def test_no_color_counts_only_when_not_empty(state_dir: Path, key_file: Path, value: str, coloured: bool) -> None:
    """issue 15.10 (review): NO_COLOR turns colour off when set to any non-empty value, "0" and "false" included
    (no-color.org); set but empty it does not."""
    from click.testing import CliRunner

    from posstate.cli.main import cli

    args = ["--state-dir", str(state_dir), "--key-file", str(key_file), "validate"]
    r = CliRunner().invoke(cli, args, env={"NO_COLOR": value, "POSSTATE_KEY": None, "POSSTATE_DIR": None}, color=True)
    assert r.exit_code == 0, r.stderr
    assert ("\x1b[" in r.stdout) is coloured


def test_closed_stdout_is_an_error_not_a_silent_success(state_dir: Path, key_file: Path) -> None:
    """issue 15.8 (review): `posstate show >&-` (stdout closed: Python makes sys.stdout None and click drops every
    write) is one Error: line naming stdout and exit 1, not nothing printed and exit 0."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT), POSSTATE_DIR=str(state_dir), POSSTATE_KEY_FILE=str(key_file))
    for args in ("show", "--json show"):
        r = subprocess.run(
            ["bash", "-c", f'exec "{sys.executable}" -m posstate {args} >&-'],
            env=child,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("Error: <stdout>: write failed (EBADF") and len(r.stderr.splitlines()) == 1, r.stderr


# ------------------------------------------------------------------------------------------ terminal escapes
def test_planted_file_names_cannot_drive_the_terminal(tmp_path: Path, key: bytes) -> None:
    """issue 15.11 (review): a file the attacker plants in quarantine/ (or backups/) with terminal escape sequences
    in its name is printed by `watch` with those bytes escaped (\\x1b), never raw to the operator's terminal (it
    could retitle the window, clear the screen, or hide the line that flags the attack)."""
    from posstate.cli import watcher as _cli_watch
    from posstate.storage.crypto import Keyring

    state = tmp_path / "state"
    make_state(state, key, [pos("A/USDT:USDT")])
    (state / "quarantine").mkdir(exist_ok=True)
    w = _cli_watch.Watcher(cfg=StateConfig.in_dir(state), keyring=Keyring(key=key))
    w.start()
    try:
        (state / "quarantine" / "x\x1b]2;pwned\x07\x1b[2J\x9b1m\u202e").write_bytes(b"planted")
        rec = w.next_record(30)
        assert rec is not None
    finally:
        w.stop()
    line = _cli_watch.record_line(rec)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in line), repr(line)
    assert "\\x1b]2;pwned" in line


def test_error_line_escapes_control_characters(state_dir: Path, key_file: Path) -> None:
    """issue 15.11 (review): the Error: line never carries a control character from a path or a message (a
    name with ESC sequences is shown escaped)."""
    r = run(["--state-dir", str(state_dir), "--key-file", str(key_file), "show", "/tmp/\x1b]2;pwned\x07x"])
    assert r.exit_code == 6
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\\x1b]2;pwned\\x07x" in r.stderr


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path: Path, key: bytes) -> None:
    """issue 15.12 (review): `posstate demo --state-dir /srv/bot` (a real bot's directory: ./state inside) is
    refused, exit 2, with nothing written there: the demo damages and restores its state on purpose (it used to
    write demo.key there, start its bot on the real state and end in a traceback)."""
    real = tmp_path / "bot"
    make_state(real / "state", key, [pos("BTC/USDT:USDT", "long", "0.5", "97338.1")])
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    r = run(["demo", "--state-dir", str(real), "--saves", "5"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"Error: {real}: not empty and not a demo directory")
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before


def test_demo_whose_bot_cannot_start_fails_in_one_line(tmp_path: Path) -> None:
    """issue 15.12 (review): a demo directory whose state its key cannot open (demo.key replaced) ends with a
    FAILED line and one Error: line, exit 1: no traceback from the bot process, no "unexpected ValueError"."""
    workdir = tmp_path / "demo"
    assert run(["demo", "--state-dir", str(workdir), "--saves", "5", "--seed", "1"]).exit_code == 0
    from posstate import generate_key
    from posstate.storage.crypto import encode_key_text

    (workdir / "demo.key").write_text(encode_key_text(generate_key()) + "\n")
    child = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    child.update(PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "posstate", "demo", "--state-dir", str(workdir), "--saves", "5"],
        env=child,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "unexpected" not in r.stderr
    assert "[operator] FAILED: " in r.stdout and "[bot] stopped: " in r.stdout
    assert r.stderr.startswith("Error: a check of the demo failed") and len(r.stderr.splitlines()) == 1, r.stderr
