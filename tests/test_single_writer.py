"""One writer per state file (issue 12, points 5-7): a replaced lock file, a forked child, two states in one directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig, StateLockedError
from posstate import _fileops as fs
from posstate._lock import WriterLock, is_locked

ROOT = Path(__file__).resolve().parent.parent


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal(100))


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.load_positions().items()}


def _take_over_lock_file(lock_path: Path, how: str) -> None:
    """What an operator's cleanup script (or an attacker) does: remove or replace the lock file in use."""
    if how == "removed":
        os.unlink(lock_path)
    else:
        fresh = lock_path.with_name("lock.new")
        fresh.write_text("0 nowhere\n")
        os.replace(fresh, lock_path)


# ------------------------------------------------------------------------------------------ 12.5 lock file replaced
@pytest.mark.parametrize("how", ["removed", "replaced"])
@pytest.mark.parametrize("durability", ["sync", "group"])
def test_lock_file_replaced_old_holder_stops_writing(cfg: StateConfig, key: bytes, how: str, durability: str) -> None:
    """issue 12.5: once its lock file is removed or replaced, the old holder refuses to write (typed error,
    memory unchanged), so the second writer's acknowledged change is never overwritten."""
    c = cfg.replace(durability=durability)
    first = PositionStateManager(c, key=key)
    first.set_position(pos("A", 1))
    _take_over_lock_file(c.lock_path, how)
    second = PositionStateManager(c, key=key)  # gets in: the path now names a file nobody locks
    assert contracts(second) == {"A": 1}
    second.set_position(pos("B", 2))  # acknowledged
    with pytest.raises(StateLockedError) as info:
        first.set_position(pos("C", 3))
    assert "removed or replaced" in str(info.value) and info.value.reason
    assert first.get_positions().keys() == {("A", "long")}  # memory unchanged
    with pytest.raises(StateLockedError):
        first.save()
    first.close()
    second.close()
    with PositionStateManager(c, key=key) as again:
        assert contracts(again) == {"A": 1, "B": 2}


def test_lock_lost_between_group_write_and_sync(cfg: StateConfig, key: bytes) -> None:
    """issue 12.5: in group mode a lock file replaced after the record was written but before the shared sync
    fails the change with StateLockedError (rolled back in memory), and the journal is not cut by the old holder."""
    c = cfg.replace(durability="group")
    m = PositionStateManager(c, key=key)
    m.set_position(pos("A", 1))

    class ReplaceAfterPwrite(fs.FileOps):
        def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
            n = super().pwrite(fd, data, offset)
            _take_over_lock_file(c.lock_path, "replaced")
            return n

        def ftruncate(self, fd: int, size: int) -> None:  # pragma: no cover - the failure under test
            raise AssertionError("the old holder cut the journal after losing the lock")

    with fs.use(ReplaceAfterPwrite()), pytest.raises(StateLockedError):
        m.set_position(pos("B", 2))
    assert m.get_positions().keys() == {("A", "long")}
    m.close()


def test_lock_taken_on_the_file_at_the_path(tmp_path: Path) -> None:
    """issue 12.5: a lock file replaced between open() and flock() is detected; the lock ends up on the file
    now at the path (device and inode), so a later writer is refused."""
    lock_path = tmp_path / "positions.json.lock"
    opened: list[str] = []

    class ReplaceAfterOpen(fs.FileOps):
        def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
            fd = super().open(path, flags, mode)
            opened.append(str(path))
            if len(opened) == 1:
                _take_over_lock_file(lock_path, "replaced")
            return fd

    with fs.use(ReplaceAfterOpen()):
        lock = WriterLock(lock_path, state_path=tmp_path / "positions.json")
    try:
        assert len(opened) == 2
        assert lock._fd is not None and os.fstat(lock._fd).st_ino == os.stat(lock_path).st_ino
        assert is_locked(lock_path)
        lock.check()
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------ 12.6 forked child
_FORK = textwrap.dedent(
    """
    import gc, hashlib, json, os, sys
    from decimal import Decimal
    from pathlib import Path
    from posstate import Position, PositionStateManager, StateConfig, StateLockedError

    d, action = Path(sys.argv[1]), sys.argv[2]
    cfg = StateConfig.in_dir(d, durability=sys.argv[3])
    key = bytes(range(32))

    def files():
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    def pos(sym, n):
        return Position(symbol=sym, side="long", contracts=Decimal(n), entry_price=Decimal(100))

    m = PositionStateManager(cfg, key=key)
    m.set_position(pos("A", 1))
    if sys.argv[3] == "group":
        m.save()
    before = files()
    pid = os.fork()
    if pid == 0:
        code = 0
        if action == "close":
            m.close()
        elif action == "gc":
            del m
            gc.collect()
        elif action == "write":
            try:
                m.set_position(pos("B", 2))
                code = 10
            except StateLockedError:
                code = 0
        sys.exit(code)  # a normal exit: atexit handlers and finalizers run
    _, status = os.waitpid(pid, 0)
    after = files()
    try:
        PositionStateManager(cfg, key=key).close()
        refused = False
    except StateLockedError:
        refused = True
    m.set_position(pos("C", 3))
    m.close()
    with PositionStateManager(cfg, key=key) as again:
        final = sorted(k[0] for k in again.load_positions())
    print(json.dumps({"status": os.waitstatus_to_exitcode(status), "untouched": before == after,
                      "refused": refused, "final": final}))
    """
)


@pytest.mark.parametrize("durability", ["sync", "group"])
@pytest.mark.parametrize("action", ["close", "exit", "gc", "write"])
def test_forked_child_never_releases_or_writes(tmp_path: Path, action: str, durability: str) -> None:
    """issue 12.6: a forked child's close(), normal exit or dropped manager leaves the parent's lock held and the
    files untouched; its set_position raises StateLockedError; the parent goes on writing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _FORK, str(tmp_path / "state"), action, durability],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"status": 0, "untouched": True, "refused": True, "final": ["A", "C"]}, proc.stderr


def test_forked_manager_refuses_and_close_is_inert(cfg: StateConfig, key: bytes) -> None:
    """issue 12.6: a manager whose lock was taken by another pid (a fork the at-fork hook did not see) never
    unlocks: close() leaves the lock held."""
    m = PositionStateManager(cfg, key=key)
    m.set_position(pos("A", 1))
    m._writer_lock._pid = -1  # as in a child forked without the Python at-fork hooks
    m.close()
    assert is_locked(cfg.lock_path)
    with pytest.raises(StateLockedError):
        m.set_position(pos("B", 2))
    m._writer_lock._pid = os.getpid()
    m._forked = m._closed = False
    m.close()
    assert not is_locked(cfg.lock_path)
