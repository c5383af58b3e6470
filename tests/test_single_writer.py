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
from posstate.storage import fileops as fs
from posstate.storage.lock import WriterLock, is_locked

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
    assert m.wait_for_backups(30)  # the parent's first timed backup runs in the background (issue 14.2)
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


# ------------------------------------------------------------------------------------------ 12.7 two state files
LEGACY = ROOT / "tests" / "data" / "legacy_journal"
LEGACY_KEY = bytes(range(32))


def test_two_state_files_in_one_directory_share_nothing(tmp_path: Path, key: bytes) -> None:
    """issue 12.7: positions.json and positions.dat in one directory each keep their own acknowledged positions
    across restarts (own journal, lock, .bak), and neither load needs recovery."""
    d = tmp_path / "state"
    a_cfg = StateConfig.in_dir(d)
    b_cfg = a_cfg.replace(state_file=str(d / "positions.dat"))
    assert len({a_cfg.journal_path, b_cfg.journal_path, a_cfg.lock_path, b_cfg.lock_path, a_cfg.bak_path, b_cfg.bak_path}) == 6
    a, b = PositionStateManager(a_cfg, key=key), PositionStateManager(b_cfg, key=key)
    a.set_position(pos("AAA", 1))
    b.set_position(pos("BBB", 2))
    a.save()
    a.set_position(pos("AA2", 3))
    b.set_position(pos("BB2", 4))
    a.close()
    b.close()
    for _ in range(2):
        with PositionStateManager(a_cfg, key=key) as a, PositionStateManager(b_cfg, key=key) as b:
            assert contracts(a) == {"AAA": 1, "AA2": 3}
            assert contracts(b) == {"BBB": 2, "BB2": 4}
            assert a.last_recovery is None and b.last_recovery is None
    assert not (d / "positions.journal").exists()


def _legacy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    for name in ("positions.json", "positions.journal"):
        (d / name).write_bytes((LEGACY / name).read_bytes())
        (d / name).chmod(0o600)
    return d


@pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
def test_journal_under_the_old_name_is_read_once_and_retired(tmp_path: Path, durability: str) -> None:
    """issue 12.7: a directory written by posstate 0.1.0 (journal at positions.journal) loads with every
    acknowledged record; the next journal gets the new name and the old file goes to quarantine, not the bin."""
    d = _legacy_dir(tmp_path)
    cfg = StateConfig.in_dir(d, durability=durability)
    old = (d / "positions.journal").read_bytes()
    with PositionStateManager(cfg, key=LEGACY_KEY) as m:
        assert contracts(m) == {"B": 2, "C": 3}
        assert m.get_symbol_metadata("C") == {"note": "acknowledged"}
        assert m.last_recovery is None
        assert (d / "positions.journal").exists()  # nothing is retired before a snapshot holds it
        m.set_position(pos("D", 4))
        if durability == "snapshot":
            m.save()
    assert not (d / "positions.journal").exists()
    kept = list((d / "quarantine").glob("positions.journal.*.old-name"))
    assert len(kept) == 1 and kept[0].read_bytes() == old
    assert (d / "positions.json.journal").exists() == (durability != "snapshot")
    with PositionStateManager(cfg, key=LEGACY_KEY) as m:
        assert contracts(m) == {"B": 2, "C": 3, "D": 4}
        assert m.last_recovery is None


def test_old_name_read_by_the_read_only_view(tmp_path: Path) -> None:
    """issue 12.7: `posstate show`/`validate` (read_current) replay the journal under the old name like a load."""
    from posstate.journal.current import read_current
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    d = _legacy_dir(tmp_path)
    cfg = StateConfig.in_dir(d)
    cur = read_current(cfg, ReadOptions(keyring=Keyring.resolve(key=LEGACY_KEY), max_document_bytes=1 << 20, clock_skew=300))
    assert cur.error is None and cur.applied == 4
    assert {k[0] for k in cur.state.positions} == {"B", "C"}


def test_old_name_of_another_state_file_is_left_alone(tmp_path: Path) -> None:
    """issue 12.7: positions.dat never adopts positions.journal (the old name it shares with positions.json):
    only the journal whose id the snapshot names is read."""
    d = _legacy_dir(tmp_path)
    old = (d / "positions.journal").read_bytes()
    dat = StateConfig.in_dir(d).replace(state_file=str(d / "positions.dat"))
    with PositionStateManager(dat, key=LEGACY_KEY) as m:
        assert contracts(m) == {}
        m.set_position(pos("X", 9))
    with PositionStateManager(dat, key=LEGACY_KEY) as m:
        assert contracts(m) == {"X": 9}
    assert (d / "positions.journal").read_bytes() == old
    with PositionStateManager(StateConfig.in_dir(d), key=LEGACY_KEY) as m:
        assert contracts(m) == {"B": 2, "C": 3}


@pytest.mark.parametrize("name", ["positions.json.journal", "positions.json.lock", "x.bak", "y.tmp"])
def test_state_file_named_like_a_companion_is_refused(tmp_path: Path, name: str) -> None:
    """issue 12.7: a state file may not be named like another state file's journal, lock, .bak or temp."""
    from posstate import ConfigError

    with pytest.raises(ConfigError):
        StateConfig(state_file=str(tmp_path / name))


def test_two_state_files_never_take_each_others_backups(tmp_path: Path, key: bytes) -> None:
    """issue 12.7: with one backup_dir configured for both, positions.dat never lists, restores, prunes or
    recovers from positions.json's backups (each state file has its own backups and quarantine)."""
    d = tmp_path / "state"
    a_cfg = StateConfig.in_dir(d, durability="snapshot")
    b_cfg = a_cfg.replace(state_file=str(d / "positions.dat"))
    assert a_cfg.backup_path != b_cfg.backup_path and a_cfg.quarantine_dir != b_cfg.quarantine_dir
    with PositionStateManager(a_cfg, key=key) as a:
        a.save_positions([pos("AAA", 1)])
        a.create_backup()
    with PositionStateManager(b_cfg, key=key) as b:
        assert b.list_backups() == []
        assert contracts(b) == {}  # a fresh start: positions.json's backups are not this state's
        assert b.last_recovery is None
        b.save_positions([pos("BBB", 2)])
        b.create_backup()
        assert b.list_backups() and {i.path.parent for i in b.list_backups()} == {b_cfg.backup_path}
        b.restore_from_backup("latest")
        assert contracts(b) == {"BBB": 2}
    with PositionStateManager(a_cfg, key=key) as a:
        assert {i.path.parent for i in a.list_backups()} == {a_cfg.backup_path}
        assert contracts(a) == {"AAA": 1}
