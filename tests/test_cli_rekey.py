"""``posstate rekey``: every file re-encrypted and verified; faults and a SIGKILL leave each file readable."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import ROOT, err_line, make_state, pos, run, write_key

from posstate.core.config import StateConfig
from posstate.core.errors import WrongKeyError
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage.crypto import Keyring, generate_key, key_id
from posstate.storage.lock import WriterLock


@pytest.fixture
def keys(tmp_path: Path) -> tuple[bytes, Path, bytes, Path]:
    old, new = generate_key(), generate_key()
    return old, write_key(tmp_path / "old.key", old), new, write_key(tmp_path / "new.key", new)


def build(state: Path, key: bytes) -> list[Path]:
    """A state file, its .bak and (at least) two timestamped backups; returns their paths."""
    make_state(state, key, [pos("A")], {"A": {"n": 1}})
    make_state(state, key, [pos("B", "short")])
    (state / "backups").mkdir(mode=0o700, exist_ok=True)
    for stamp in ("20260101_000000", "20260102_000000"):
        shutil.copyfile(state / "positions.json.bak", state / "backups" / f"positions_{stamp}.json")
    return [state / "positions.json", state / "positions.json.bak", *sorted((state / "backups").iterdir())]


def documents(files: list[Path], key: bytes) -> dict[Path, bytes]:
    return {p: _codec.decode(p.read_bytes(), keyring=Keyring(key=key), path=p)[1] for p in files}


def readable_with(path: Path, *keys: bytes) -> bytes | None:
    for k in keys:
        try:
            _codec.decode(path.read_bytes(), keyring=Keyring(key=k), path=path)
        except WrongKeyError:
            continue
        return k
    return None


def temp_files(state: Path) -> list[Path]:
    return [p for p in state.rglob("*") if p.name.endswith(".tmp")]


def test_rekey_reencrypts_every_file(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path]) -> None:
    """State, .bak and backups end up under the new key only, with the same documents and generations."""
    old, old_file, new, new_file = keys
    state = tmp_path / "state"
    files = build(state, old)
    before = documents(files, old)
    r = run(["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--yes"])
    assert r.exit_code == 0, r.stderr
    assert (
        r.stdout.splitlines()[-1] == f"re-encrypted {len(files)} file(s) under key id {key_id(new)}; use {new_file} from now on"
    )
    assert documents(files, new) == before
    for p in files:
        assert readable_with(p, old) is None
        assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert run(["--state-dir", str(state), "--key-file", str(new_file), "validate"]).exit_code == 0


def test_rekey_dry_run_changes_nothing(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path]) -> None:
    """--dry-run lists the plan and leaves every byte (and no lock file beyond the bot's) as it was."""
    old, old_file, _new, new_file = keys
    state = tmp_path / "state"
    files = build(state, old)
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    r = run(
        ["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--dry-run", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
    assert '"rekeyed": 0' in r.stdout and r.stdout.count('"action": "rekey"') == len(files)


def test_rekey_refused_while_locked(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path]) -> None:
    """A bot holding the writer lock: exit 5 naming pid and host; nothing changes."""
    old, old_file, _new, new_file = keys
    state = tmp_path / "state"
    files = build(state, old)
    before = {p: p.read_bytes() for p in files}
    cfg = StateConfig.in_dir(state)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        r = run(["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--yes"])
    finally:
        lock.release()
    assert r.exit_code == 5
    assert err_line(r) == (
        f"Error: {state}/positions.json: locked by pid {os.getpid()} on host {socket.gethostname()}; stop that process first, "
        "or use a read-only command such as `posstate validate` or `posstate show`"
    )
    assert {p: p.read_bytes() for p in files} == before


@pytest.mark.parametrize(
    ("setup", "code", "line"),
    [
        pytest.param(
            "same-key",
            2,
            "Error: {old_file}: this is the key in use (key id {old_id}); make a new one with `posstate keygen --out FILE`",
            id="same-key",
        ),
        pytest.param(
            "no-yes", 2, "Error: rekey needs confirmation and there is no terminal to ask on; rerun with --yes", id="no-yes"
        ),
        pytest.param(
            "no-old-key",
            3,
            "Error: {state}/positions.json: this command needs the key and none was supplied; pass --key-file FILE, "
            "or set POSSTATE_KEY, POSSTATE_KEY_FILE or POSSTATE_PASSPHRASE (make a key with `posstate keygen`)",
            id="no-old-key",
        ),
        pytest.param(
            "no-state",
            6,
            "Error: {state}/positions.json: no such state file; nothing to rekey; check --state-dir or --config",
            id="no-state",
        ),
        pytest.param("no-dir", 6, "Error: {state}: no such state directory; check --state-dir or --config", id="no-dir"),
    ],
)
def test_rekey_refusals(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path], setup: str, code: int, line: str) -> None:
    """Same key, no --yes without a terminal, no old key, nothing to rekey, no directory: each its code."""
    old, old_file, _new, new_file = keys
    state = tmp_path / "state"
    if setup == "no-state":
        state.mkdir()
    elif setup != "no-dir":
        build(state, old)
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} if state.exists() else {}
    args = ["--state-dir", str(state), "rekey", "--new-key-file", str(old_file if setup == "same-key" else new_file)]
    if setup != "no-old-key":
        args[2:2] = ["--key-file", str(old_file)]
    if setup != "no-yes":
        args.append("--yes")
    r = run(args)
    assert r.exit_code == code
    assert err_line(r) == line.format(old_file=old_file, old_id=key_id(old), state=state)
    after = (
        {p: p.read_bytes() for p in state.rglob("*") if p.is_file() and p.name != "positions.json.lock"} if state.exists() else {}
    )
    assert after == {p: b for p, b in before.items() if p.name != "positions.json.lock"}


def test_rekey_skips_unreadable_and_finishes_after_rerun(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path]) -> None:
    """A damaged backup is left alone and reported (exit 1); a rerun recognises files already rekeyed."""
    old, old_file, new, new_file = keys
    state = tmp_path / "state"
    files = build(state, old)
    damaged = state / "backups" / "positions_20260103_000000.json"
    damaged.write_bytes(b"PSTATE01 cut")
    args = ["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--yes"]
    r = run(args)
    assert r.exit_code == 1
    assert err_line(r).startswith(
        f"Error: 1 file(s) could not be read with the old key and were left as they are (first: {damaged}: "
    )
    assert damaged.read_bytes() == b"PSTATE01 cut"
    assert all(readable_with(p, new) == new for p in files)
    r = run(args)
    assert r.stdout.count("already under the new key") == len(files)


class FailAt(fs.FileOps):
    """Raise EIO at the k-th file operation."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.fired = False

    def _tick(self) -> None:
        self.n += 1
        if self.n == self.k:
            self.fired = True
            raise OSError(5, "injected I/O error")

    def open(self, path, flags, mode=0o600):  # type: ignore[no-untyped-def]
        self._tick()
        return super().open(path, flags, mode)

    def write(self, fd, data):  # type: ignore[no-untyped-def]
        self._tick()
        return super().write(fd, data)

    def pwrite(self, fd, data, offset):  # type: ignore[no-untyped-def]
        self._tick()
        return super().pwrite(fd, data, offset)

    def fsync(self, fd):  # type: ignore[no-untyped-def]
        self._tick()
        super().fsync(fd)

    def close(self, fd):  # type: ignore[no-untyped-def]
        self._tick()
        super().close(fd)

    def replace(self, src, dst):  # type: ignore[no-untyped-def]
        self._tick()
        super().replace(src, dst)

    def fsync_dir(self, path):  # type: ignore[no-untyped-def]
        self._tick()
        super().fsync_dir(path)

    def read_file(self, path, limit=None, max_size=fs.DEFAULT_MAX_READ_BYTES):  # type: ignore[no-untyped-def]
        self._tick()
        return super().read_file(path, limit, max_size)


def test_rekey_fault_at_every_file_operation(tmp_path: Path, keys: tuple[bytes, Path, bytes, Path]) -> None:
    """EIO at each file operation in turn: exit 1, every file readable with one of the keys, no temp left;
    a rerun without the fault finishes with every file under the new key and the documents unchanged."""
    old, old_file, new, new_file = keys
    k = failures = 0
    while True:
        k += 1
        state = tmp_path / f"s{k}"
        files = build(state, old)
        before = documents(files, old)
        ops = FailAt(k)
        args = ["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--yes"]
        with fs.use(ops):
            r = run(args)
        if not ops.fired:
            assert r.exit_code == 0
            break
        if r.exit_code == 0:  # a fault the command tolerates (the lock file's courtesy holder line)
            assert documents(files, new) == before, k
            shutil.rmtree(state)
            continue
        # A fault reading a key file is a key problem (exit 3): key files are read through the file layer too.
        assert r.exit_code == (3 if "key file unreadable" in r.stderr else 1), (k, r.output)
        assert len(r.stderr.splitlines()) == 1
        failures += 1
        for p in files:
            assert readable_with(p, old, new) is not None, (k, p)
        assert temp_files(state) == [], k
        assert run(args).exit_code == 0
        assert documents(files, new) == before
        shutil.rmtree(state)
    assert failures > 20  # the loop really failed the command at the operations of four files


CHILD = """
import os, signal, sys
from posstate.storage import fileops as fs
from posstate.cli.main import main

class KillAt(fs.FileOps):
    n = 0
    def replace(self, src, dst):
        KillAt.n += 1
        if KillAt.n == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        super().replace(src, dst)

with fs.use(KillAt()):
    sys.argv = ["posstate"] + sys.argv[1:]
    main()
"""


@pytest.mark.parametrize("kill_at", [1, 3])
def test_rekey_killed_midway_leaves_every_file_readable(
    tmp_path: Path, keys: tuple[bytes, Path, bytes, Path], kill_at: int
) -> None:
    """A real child killed with SIGKILL before its k-th rename: each file opens with one of the keys; rekey again finishes."""
    old, old_file, new, new_file = keys
    state = tmp_path / "state"
    files = build(state, old)
    before = documents(files, old)
    args = ["--state-dir", str(state), "--key-file", str(old_file), "rekey", "--new-key-file", str(new_file), "--yes"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")} | {
        "PYTHONPATH": str(ROOT),
        "KILL_AT": str(kill_at),
    }
    child = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    under_new = [p for p in files if readable_with(p, old, new) == new]
    assert len(under_new) == kill_at - 1
    assert all(readable_with(p, old, new) is not None for p in files)
    r = run(args)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("already under the new key") == kill_at - 1
    assert documents(files, new) == before
