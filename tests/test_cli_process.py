"""The entry points as real processes (``python -m posstate``, ``python cli.py``), ``watch`` end to end, ``demo``."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from test_cli import ROOT, generation_of, make_state, pos, run, write_key

from posstate.cli import watcher as _cli_watch
from posstate.core.config import StateConfig
from posstate.manager.manager import PositionStateManager
from posstate.storage import atomic as _atomic
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

DEADLINE = 30.0


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Proc:
    """A running ``python -m posstate ...`` whose stdout and stderr lines arrive on queues."""

    def __init__(self, args: list[str], **env: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "posstate", *args],
            env=child_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._pump, args=(stream, q), daemon=True)
            for stream, q in ((self.p.stdout, self.out), (self.p.stderr, self.err))
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream: IO[str] | None, q: queue.Queue[str | None]) -> None:
        assert stream is not None
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def line(self, q: queue.Queue[str | None], what: str) -> str:
        """The next line, waiting at most until the deadline."""
        try:
            got = q.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no {what} within {DEADLINE}s") from None
        if got is None:
            raise AssertionError(f"process ended before {what}; rc={self.p.wait()}")
        return got

    def record(self, match: Any) -> dict[str, Any]:
        """Read --json lines until one satisfies *match*."""
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            rec = json.loads(self.line(self.out, "a watch line"))
            if match(rec):
                return rec
        raise AssertionError("no matching watch line before the deadline")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.kill()
        rc = self.p.wait(timeout=DEADLINE)
        for t in self.threads:
            t.join(timeout=DEADLINE)
        for stream in (self.p.stdout, self.p.stderr):
            if stream is not None:
                stream.close()
        return rc


@pytest.fixture
def proc() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def key() -> bytes:
    from posstate.storage.crypto import generate_key

    return generate_key()


# ------------------------------------------------------------------------------------------ entry points
def test_validate_as_a_process(tmp_path: Path, key: bytes) -> None:
    """`python -m posstate validate`: exit 0 on a good file; exit 1 and one Error line on a damaged one."""
    kf = write_key(tmp_path / "k.key", key)
    path = make_state(tmp_path / "state", key, [pos("A")])
    ok = subprocess.run(
        [sys.executable, "-m", "posstate", "--key-file", str(kf), "validate", str(path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1].startswith(f"VALID: generation {generation_of(path)}, 1 positions")
    path.write_bytes(path.read_bytes()[:-10])
    bad = subprocess.run(
        [sys.executable, "-m", "posstate", "validate", str(path)],
        env=child_env(POSSTATE_KEY_FILE=str(kf)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        f"Error: {path}: file is cut short ({path.stat().st_size} of {path.stat().st_size + 10} bytes); "
        "recover with `posstate repair` "
        "or restore a backup with `posstate backups restore latest`"
    ]


def test_cli_py_from_a_checkout(tmp_path: Path) -> None:
    """`python cli.py` in the checkout runs the same app (exit 6 for a missing state file)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--state-dir", str(tmp_path), "validate"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 6
    assert r.stderr.startswith(f"Error: {tmp_path}/positions.json: no such state file")


# ------------------------------------------------------------------------------------------ watch
def test_watch_reports_a_save_and_exits_0_on_ctrl_c(tmp_path: Path, key: bytes, proc: list[Proc]) -> None:
    """A save by a bot gives a line for positions.json with its new generation, valid; SIGINT exits 0."""
    state = tmp_path / "state"
    make_state(state, key, [pos("A")])
    kf = write_key(tmp_path / "k.key", key)
    w = Proc(["--state-dir", str(state), "--key-file", str(kf), "watch", "--json"])
    proc.append(w)
    assert w.line(w.err, "the ready line").startswith("watching ")
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.set_position(pos("B", "short"))
        saved = m.save()
    rec = w.record(lambda r: r["file"] == "positions.json")
    assert (rec["generation"], rec["status"], rec["flags"], rec["positions"]) == (saved, "valid", [], 2)
    assert rec["writer_pid"] == os.getpid()
    w.p.send_signal(signal.SIGINT)
    assert w.p.wait(timeout=DEADLINE) == 0


HOLDER = (
    "import sys; from pathlib import Path; from posstate.storage.lock import WriterLock; "
    "l = WriterLock(Path(sys.argv[1]), state_path=Path(sys.argv[2])); print('locked', flush=True); sys.stdin.read()"
)


def test_watch_flags_unexpected_writer_and_damage(tmp_path: Path, key: bytes, proc: list[Proc]) -> None:
    """A file written behind the lock holder's back is flagged UNEXPECTED-WRITER; bytes damaged in place are DAMAGED."""
    state = tmp_path / "state"
    path = make_state(state, key, [pos("A")])
    cfg = StateConfig.in_dir(state)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cfg.lock_path), str(path)],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        w = Proc(
            ["--state-dir", str(state), "watch", "--json", "--max-events", "2"],
            POSSTATE_KEY_FILE=str(write_key(tmp_path / "k.key", key)),
        )
        proc.append(w)
        assert w.line(w.err, "the ready line").startswith("watching ")
        st = _statefile.read(path, options=_statefile.ReadOptions(keyring=Keyring(key=key))).state
        st.generation += 1
        _, enc = _statefile.encode(st, keyring=Keyring(key=key), compression_level=3)
        _atomic.write_file(path, enc.data)  # bypasses the lock: the writer pid is ours, the holder is the child
        rec = w.record(lambda r: r["file"] == "positions.json")
        assert rec["flags"] == ["unexpected-writer"] and rec["generation"] == st.generation
        assert f"held by pid {holder.pid}" in rec["detail"]
        with open(path, "r+b") as fh:
            fh.seek(200)
            fh.write(b"\0" * 8)
        rec = w.record(lambda r: r["file"] == "positions.json")
        assert (rec["status"], rec["flags"]) == ("damaged", ["damaged"])
        assert rec["detail"] == "checksum mismatch (file damaged on disk)"
        assert w.p.wait(timeout=DEADLINE) == 0  # --max-events 2 reached
        holder.kill()


def test_watch_in_process_first_save(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through CliRunner: the first save into an empty directory gives exactly one text line."""
    state = tmp_path / "state"
    state.mkdir()
    started = threading.Event()
    real_start = _cli_watch.Watcher.start

    def start(self: _cli_watch.Watcher) -> None:
        real_start(self)
        started.set()

    monkeypatch.setattr(_cli_watch.Watcher, "start", start)

    def bot() -> None:
        if started.wait(DEADLINE):
            make_state(state, key, [pos("A"), pos("B")])

    t = threading.Thread(target=bot)
    t.start()
    r = run(
        ["--state-dir", str(state), "watch", "--max-events", "1", "--timeout", str(DEADLINE)],
        env={"POSSTATE_KEY_FILE": str(write_key(tmp_path / "k.key", key))},
    )
    t.join()
    assert r.exit_code == 0, r.stderr
    (line,) = r.stdout.splitlines()
    # The bot's first change writes generation 1 and its save the last one; the watcher reports whichever
    # state file it reads first (a loaded machine may coalesce the events), always valid and from this writer.
    final = generation_of(state / "positions.json")
    assert any(
        line.endswith(f"positions.json: generation {g}, valid (writer pid {os.getpid()} on {os.uname().nodename})")
        for g in range(1, final + 1)
    ), line


def test_watch_missing_directory_exit_6(tmp_path: Path) -> None:
    """No state directory: exit 6 with one Error line."""
    r = run(["--state-dir", str(tmp_path / "none"), "watch", "--timeout", "0"])
    assert r.exit_code == 6
    assert r.stderr.splitlines() == [f"Error: {tmp_path}/none: no such state directory; check --state-dir or --config"]


# ------------------------------------------------------------------------------------------ demo
def test_demo_command(tmp_path: Path) -> None:
    """`posstate demo` kills a saving bot and shows it resumed from its last save (exit 0)."""
    r = run(["demo", "--state-dir", str(tmp_path / "demo"), "--saves", "3", "--seed", "7"])
    assert r.exit_code == 0, r.output
    assert "[operator] OK:" in r.stdout


RESTORE = ("backups", "restore", "latest")


def test_sigterm_at_a_prompt_is_one_error_line_and_exit_143(tmp_path: Path, key: bytes) -> None:
    """SIGTERM to a command waiting at a confirmation (`backups restore` on a terminal) ends it as borg does:
    one `Error: terminated (SIGTERM)` line, exit 143, nothing changed (it used to die without a word)."""
    import pty

    key_file = write_key(tmp_path / "k.key", key)
    state = tmp_path / "s"
    make_state(state, key, [pos("BTC/USDT")])
    before = (state / "positions.json").read_bytes()
    assert run(["--state-dir", str(state), "--key-file", str(key_file), "backups", "create"]).exit_code == 0
    leader, follower = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "posstate", "--state-dir", str(state), "--key-file", str(key_file), *RESTORE],
        env=child_env(),
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    try:
        seen = b""
        assert p.stderr is not None
        while b"[y/N]" not in seen:  # the question is asked: the command waits on the terminal
            chunk = os.read(p.stderr.fileno(), 4096)
            assert chunk, f"ended before asking; rc={p.wait()} stderr={seen!r}"
            seen += chunk
        p.send_signal(signal.SIGTERM)
        _, rest = p.communicate(timeout=DEADLINE)  # never a hang: a command stuck at the prompt fails here
        assert p.returncode == 143
    finally:
        os.close(leader)
        if p.poll() is None:
            p.kill()
            p.communicate()  # closes the pipes
    errors = [line for line in (seen + rest).decode().splitlines() if line.startswith("Error:")]
    assert errors == [errors[0]] and errors[0].startswith("Error: terminated (SIGTERM)"), seen + rest
    assert "Traceback" not in (seen + rest).decode()
    assert (state / "positions.json").read_bytes() == before


def test_sigterm_just_as_the_prompt_starts_reading_is_never_lost(tmp_path: Path, key: bytes) -> None:
    """A SIGTERM that lands between the interpreter's last signal check and the prompt's blocking read used to
    be held until the operator typed a line (the command hung, about one time in three): the prompt now waits
    on a wake-up pipe the signal writes to (posstate/cli/prompt.py). Ten tries, each must end with 143."""
    import pty

    key_file = write_key(tmp_path / "k.key", key)
    state = tmp_path / "s"
    make_state(state, key, [pos("BTC/USDT")])
    assert run(["--state-dir", str(state), "--key-file", str(key_file), "backups", "create"]).exit_code == 0
    for attempt in range(10):
        leader, follower = pty.openpty()
        p = subprocess.Popen(
            [sys.executable, "-m", "posstate", "--state-dir", str(state), "--key-file", str(key_file), *RESTORE],
            env=child_env(),
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        try:
            seen = b""
            assert p.stderr is not None
            while b"[y/N]" not in seen:
                chunk = os.read(p.stderr.fileno(), 4096)
                assert chunk, f"ended before asking; rc={p.wait()} stderr={seen!r}"
                seen += chunk
            p.send_signal(signal.SIGTERM)  # at once: the command is about to block reading the terminal
            try:
                p.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                pytest.fail(f"try {attempt}: the command still waits at the prompt after SIGTERM")
            assert p.returncode == 143, attempt
        finally:
            os.close(leader)
            if p.poll() is None:
                p.kill()
                p.communicate()
