"""Hostile files at posstate's paths: a typed error at once, never a hang or a huge read (issue 12.14, 12.15)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from posstate import CorruptStateError, MissingKeyError, PersistenceError, Position, PositionStateManager, StateConfig
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import validate as _validate
from posstate.storage.crypto import encode_key_text, generate_key, read_key_file

ROOT = Path(__file__).resolve().parent.parent
#: A hang must fail the test, not the suite.
TIMEOUT = 30


def _directory(path: Path) -> None:
    path.mkdir()


def _char_device(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a second /dev/null


class Hung(Exception):
    """A read blocked (a FIFO opened without O_NONBLOCK waits for a writer forever)."""


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Turn a blocked open or read into a failure after TIMEOUT seconds (SIGALRM interrupts the system call)."""

    def fire(signum: int, frame: object) -> None:
        raise Hung(f"blocked for {TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


KINDS: dict[str, tuple[Callable[[Path], object], str]] = {
    "fifo": (os.mkfifo, "FIFO"),
    "socket": (lambda p: None, "socket"),  # made by the fixture below (it must stay bound)
    "directory": (_directory, "directory"),
    "char-device": (_char_device, "character device"),
}


@pytest.fixture(params=sorted(KINDS))
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Callable[[Path], None], str]]:
    """A maker of one kind of non-regular file, and the words its error must use."""
    name = request.param
    make, words = KINDS[name]
    sockets: list[socket.socket] = []

    def maker(path: Path) -> None:
        if name == "socket":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path))
            sockets.append(s)
        else:
            make(path)

    yield maker, words
    for s in sockets:
        s.close()


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory with a short path (AF_UNIX socket paths are limited to ~108 bytes; tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


# ------------------------------------------------------------------------------------------ issue 12.14
def test_read_file_refuses_non_regular_files(hostile: tuple[Callable[[Path], None], str], short_dir: Path) -> None:
    """issue 12.14: the file layer refuses a FIFO, socket, directory or device before reading, naming what it is."""
    make, words = hostile
    path = short_dir / "x"
    make(path)
    with pytest.raises(fs.NotRegularFileError) as info:
        fs.read_file(path)
    assert words in str(info.value)
    assert words == "directory" or "directory" not in str(info.value)


def test_dev_null_is_a_device_not_a_directory() -> None:
    """issue 12.14: /dev/null is refused as a character device, not called a directory."""
    with pytest.raises(CorruptStateError) as info:
        _statefile.read(Path("/dev/null"), options=_statefile.ReadOptions(keyring=None))
    assert "character device" in str(info.value) and "directory" not in str(info.value)
    assert info.value.kind == "not-a-regular-file"
    report = _validate.validate_file(Path("/dev/null"), options=_statefile.ReadOptions(keyring=None))
    assert not report.valid and "character device" in str(report.error)


def test_manager_refuses_non_regular_state_file(hostile: tuple[Callable[[Path], None], str], short_dir: Path) -> None:
    """issue 12.14: a non-regular file at the state path is a CorruptStateError at once: no hang, no recovery."""
    make, words = hostile
    d = short_dir / "state"
    d.mkdir()
    make(d / "positions.json")
    with PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m:
        with pytest.raises(CorruptStateError) as info:
            m.load_positions()
        assert words in str(info.value)
        assert m.last_recovery is None
    assert not (d / "quarantine").exists()


def test_manager_refuses_non_regular_journal(hostile: tuple[Callable[[Path], None], str], short_dir: Path) -> None:
    """issue 12.14: a non-regular file at the journal path is a typed error at once (no hang)."""
    make, words = hostile
    d = short_dir / "state"
    with PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m:
        m.set_position(Position(symbol="BTC", side="long", contracts=1, entry_price=1))
        m.save()
    journal = StateConfig.in_dir(d).journal_path
    if journal.exists():
        journal.unlink()
    make(journal)
    with PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m:
        with pytest.raises((CorruptStateError, PersistenceError)) as info:
            m.load_positions()
        assert words in str(info.value)


def test_backup_that_is_not_a_regular_file_is_listed_as_damaged(tmp_path: Path) -> None:
    """issue 12.14: a FIFO where a backup should be is listed as damaged (not a regular file), no hang."""
    d = tmp_path / "state"
    cfg = StateConfig.in_dir(d, encryption=False)
    with PositionStateManager(cfg) as m:
        m.save()
        m.create_backup()
        info = m.list_backups()[0]
        info.path.unlink()
        os.mkfifo(info.path)
        found = m.list_backups()[0]
    assert not found.valid and "FIFO" in (found.reason or "")


def test_key_file_that_is_a_fifo_is_a_key_error(tmp_path: Path) -> None:
    """issue 12.14: a FIFO given as the key file is MissingKeyError at once, no hang."""
    path = tmp_path / "key"
    os.mkfifo(path)
    with pytest.raises(MissingKeyError, match="FIFO"):
        read_key_file(path)
    with pytest.raises(MissingKeyError, match="directory"):
        read_key_file(tmp_path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("POSSTATE_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "posstate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.mark.parametrize("command", [["validate"], ["show"]])
def test_cli_refuses_fifo_state_file(tmp_path: Path, command: list[str]) -> None:
    """issue 12.14: the CLI on a FIFO state file prints one Error: line naming it and exits 1, without hanging."""
    d = tmp_path / "state"
    d.mkdir()
    os.mkfifo(d / "positions.json")
    out = _cli(*command, "--state-dir", str(d), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "FIFO" in lines[0]


def test_cli_validate_dev_null(tmp_path: Path) -> None:
    """issue 12.14: `posstate validate /dev/null` says character device, exit 1."""
    out = _cli("validate", "/dev/null", cwd=tmp_path)
    assert out.returncode == 1
    assert "character device" in out.stdout + out.stderr and "directory" not in out.stdout + out.stderr


def test_cli_key_file_fifo(tmp_path: Path) -> None:
    """issue 12.14: --key-file naming a FIFO is a key problem (exit 3) with one Error: line, no hang."""
    d = tmp_path / "state"
    d.mkdir()
    key = tmp_path / "key"
    os.mkfifo(key)
    out = _cli("show", "--state-dir", str(d), "--key-file", str(key), cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "FIFO" in lines[0]


def _plain_state_with_a_journal(d: Path) -> None:
    """A plaintext state directory whose journal holds one change past the snapshot."""
    with PositionStateManager(StateConfig.in_dir(d, encryption=False, durability="sync", backup_interval=1e9)) as m:
        m.load_positions()
        m.save()
        m.set_position(Position(symbol="BTC", side="long", contracts=1, entry_price=1))


def test_cli_history_refuses_non_regular_state_file(hostile: tuple[Callable[[Path], None], str], short_dir: Path) -> None:
    """issue 12.14: `history` refuses a FIFO, socket, device or directory at the state path (exit 1, one
    Error: line naming it) like validate/show/diff/export, with or without a journal beside it."""
    make, words = hostile
    for journal in (True, False):
        d = short_dir / f"state{journal}"
        _plain_state_with_a_journal(d)
        if not journal:
            StateConfig.in_dir(d).journal_path.unlink()
        (d / "positions.json").unlink()
        make(d / "positions.json")
        out = _cli("history", "--state-dir", str(d), cwd=short_dir)
        assert out.returncode == 1, (journal, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], lines


def test_watch_reports_non_regular_file_at_the_state_path(hostile: tuple[Callable[[Path], None], str], short_dir: Path) -> None:
    """issue 12.14: `watch` flags a FIFO, socket, device or directory put at the state path as damaged,
    naming what it is, never skipping it in silence (nor blocking on it)."""
    from posstate.cli.watcher import Watcher

    make, words = hostile
    d = short_dir / "state"
    _plain_state_with_a_journal(d)
    w = Watcher(cfg=StateConfig.in_dir(d), keyring=None)
    w.start()
    try:
        (d / "positions.json").unlink()
        make(d / "positions.json")
        rec = None
        while rec is None or rec["status"] == "deleted":
            rec = w.next_record(TIMEOUT / 2)
            assert rec is not None, "no record for the non-regular state file"
    finally:
        w.stop()
    assert rec["file"] == "positions.json" and rec["status"] == "damaged" and "damaged" in rec["flags"]
    assert words in rec["detail"]


# ------------------------------------------------------------------------------------------ issue 12.15
def _sparse(path: Path, size: int = 8 * 1024**3) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_huge_state_file_is_refused_before_reading(tmp_path: Path) -> None:
    """issue 12.15: an 8 GiB sparse state file is refused from its size alone (no read of it)."""
    path = tmp_path / "positions.json"
    _sparse(path)
    calls: list[str] = []

    class Spy(fs.FileOps):
        def pread(self, fd: int, size: int, offset: int) -> bytes:  # pragma: no cover - must not happen
            calls.append("pread")
            return super().pread(fd, size, offset)

    with fs.use(Spy()), pytest.raises(CorruptStateError) as info:
        _statefile.read(path, options=_statefile.ReadOptions(keyring=None))
    assert info.value.kind == "too-large" and "max_document_bytes" in str(info.value)
    assert not calls


def test_file_over_the_configured_cap_is_refused(tmp_path: Path) -> None:
    """issue 12.15: the cap follows max_document_bytes: a file just over the container cap is refused."""
    cap = 4096
    path = tmp_path / "positions.json"
    path.write_bytes(b"x" * (_codec.max_file_bytes(cap) + 1))
    with pytest.raises(CorruptStateError) as info:
        _statefile.read(path, options=_statefile.ReadOptions(keyring=None, max_document_bytes=cap))
    assert info.value.kind == "too-large"


def test_manager_with_huge_state_file_and_journal(tmp_path: Path) -> None:
    """issue 12.15: a huge state file or journal is a typed error from the manager, never a multi-GiB read."""
    d = tmp_path / "state"
    d.mkdir()
    _sparse(d / "positions.json")
    with PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m, pytest.raises(CorruptStateError):
        m.load_positions()
    (d / "positions.json").unlink()
    with PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m:
        m.save()
    journal = StateConfig.in_dir(d).journal_path
    _sparse(journal)
    with (
        PositionStateManager(StateConfig.in_dir(d, encryption=False)) as m,
        pytest.raises((CorruptStateError, PersistenceError), match="bytes"),
    ):
        m.load_positions()


def test_huge_key_file_and_import(tmp_path: Path) -> None:
    """issue 12.15: a huge key file is MissingKeyError, a huge import a typed error (exit 1), before reading."""
    key = tmp_path / "key"
    _sparse(key)
    with pytest.raises(MissingKeyError, match="bytes"):
        read_key_file(key)
    src = tmp_path / "doc.json"
    _sparse(src)
    d = tmp_path / "state"
    env_key = tmp_path / "real.key"
    env_key.write_text(encode_key_text(generate_key()))
    out = _cli("import", str(src), "--state-dir", str(d), "--key-file", str(env_key), "--yes", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("Error:") and "bytes" in out.stderr
