"""One writer: the flock on positions.json.lock, in this process and across processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posstate import PositionStateManager, StateConfig, StateLockedError
from posstate.storage.lock import is_locked, read_holder

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys
    from posstate import PositionStateManager, StateConfig
    m = PositionStateManager(StateConfig.in_dir(sys.argv[1]), key=bytes(32))
    print("ready", flush=True)
    sys.stdin.readline()
    m.close()
    print("closed", flush=True)
    """
)


def _child(state_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.communicate()
        pytest.fail("child did not take the lock")
    return proc


def test_second_manager_in_same_process(cfg: StateConfig, key: bytes) -> None:
    """A second manager on the same directory in this process gets StateLockedError naming our pid and host."""
    with PositionStateManager(cfg, key=key):
        with pytest.raises(StateLockedError) as info:
            PositionStateManager(cfg, key=key)
        e = info.value
        assert isinstance(e, TimeoutError)
        assert (e.pid, e.host) == (os.getpid(), socket.gethostname())
        assert f"pid {os.getpid()}" in str(e) and socket.gethostname() in str(e)
        assert is_locked(cfg.lock_path)
    assert not is_locked(cfg.lock_path)
    with PositionStateManager(cfg, key=key):
        pass


def test_lock_is_on_a_separate_file(cfg: StateConfig, key: bytes) -> None:
    """The lock file survives saves (os.replace swaps the state file's inode, not the lock's)."""
    with PositionStateManager(cfg, key=key) as m:
        ino = os.stat(cfg.lock_path).st_ino
        m.save()
        m.save()
        assert os.stat(cfg.lock_path).st_ino == ino
        assert read_holder(cfg.lock_path) == (os.getpid(), socket.gethostname())


def test_child_process_holds_the_lock(cfg: StateConfig, key: bytes) -> None:
    """While a child process holds the lock we are refused with its pid; once it closes we get in."""
    with _child(cfg.state_dir) as proc:
        with pytest.raises(StateLockedError) as info:
            PositionStateManager(cfg, key=key)
        assert info.value.pid == proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        with PositionStateManager(cfg, key=key):
            pass
        assert proc.wait() == 0


def test_kill_9_frees_the_lock(cfg: StateConfig, key: bytes) -> None:
    """SIGKILL of the holder releases the lock (the kernel drops the flock): the next writer gets in."""
    with _child(cfg.state_dir) as proc:
        with pytest.raises(StateLockedError):
            PositionStateManager(cfg, key=key)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not is_locked(cfg.lock_path)
        with PositionStateManager(cfg, key=key) as m:
            assert read_holder(cfg.lock_path)[0] == os.getpid()
            assert m.save() == 1


def test_closed_manager_releases_lock(cfg: StateConfig, key: bytes) -> None:
    """close() releases the lock at once."""
    m = PositionStateManager(cfg, key=key)
    m.close()
    assert not is_locked(cfg.lock_path)
