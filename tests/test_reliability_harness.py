"""The harness itself: it records what a save does and fires each fault exactly where and as often as told."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from posstate import PersistenceError, PositionStateManager, StateConfig, generate_key
from posstate.selftest.crashchild import save_step
from posstate.selftest.harness import MUTATING, Fault, HarnessOps
from posstate.storage import fileops as _fileops


def _manager(d: Path) -> PositionStateManager:
    m = PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability="snapshot"), key=generate_key())
    m.load_positions()
    save_step(m, 1)
    assert m.wait_for_backups(30)  # the first timed backup runs in the background (issue 14.2)
    return m


def test_records_every_operation_of_a_save_with_paths_and_sizes(tmp_path: Path) -> None:
    """A steady-state save: temp open/write/fsync/close, read, .bak link+rename, rename, dir fsync, verify read."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(keep_data=True)
        with _fileops.use(ops):
            save_step(m, 2)
    names = [op.name for op in ops.ops]
    core = ["open", "write", "fsync", "close", "read_file", "link", "replace", "replace", "fsync_dir", "read_file"]
    assert names[: len(core)] == core  # (a timed backup, once it exists, may follow)
    write = ops.ops[1]
    data = (tmp_path / "s" / "positions.json").read_bytes()
    assert write.size == len(data) and write.offset == 0 and write.data == data
    assert ops.ops[0].path == write.path and Path(ops.ops[0].path or "").name.endswith(".tmp")
    assert ops.ops[7].dst == str(tmp_path / "s" / "positions.json")
    assert ops.ops[8].path == str(tmp_path / "s")


@pytest.mark.parametrize(("persistent", "fired"), [(False, 1), (True, 2)])
def test_fault_fires_once_or_every_time_after(tmp_path: Path, persistent: bool, fired: int) -> None:
    """A once-fault fires at the k-th counted op only; a persistent one at it and every counted op after."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(fault=Fault(at=1, errno=errno.EROFS, persistent=persistent, ops=frozenset({"fsync"})))
        with _fileops.use(ops):
            for _ in range(2):
                with pytest.raises(PersistenceError) as info:
                    save_step(m, 2)
                assert info.value.errno == errno.EROFS
                if not persistent:
                    break
            if not persistent:
                save_step(m, 2)  # the fault does not fire again
    assert ops.fired == fired
    assert [op.faulted for op in ops.ops if op.faulted] == ["raise"] * fired


def test_counting_only_chosen_ops(tmp_path: Path) -> None:
    """Only the named operations are counted: at=2 among MUTATING is the first write, not a read."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(fault=Fault(at=2, errno=errno.EIO, ops=MUTATING))
        with _fileops.use(ops), pytest.raises(PersistenceError) as info:
            save_step(m, 2)
    assert info.value.operation == "write"
    assert [op.name for op in ops.ops if op.faulted] == ["write"]
    assert [op.name for op in ops.ops][:2] == ["open", "write"]


def test_short_write_writes_half_then_nothing(tmp_path: Path) -> None:
    """short: the first faulted write writes half; persistent, later writes write nothing (ENOSPC in write_all)."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(fault=Fault(at=1, action="short", persistent=True, ops=frozenset({"write"})))
        with _fileops.use(ops), pytest.raises(PersistenceError) as info:
            save_step(m, 2)
    sizes = [op.size for op in ops.ops if op.name == "write"]
    assert sizes[0] and sizes[0] > 0 and sizes[1] == 0
    assert info.value.errno == errno.ENOSPC


def test_skip_turns_a_call_into_a_no_op(tmp_path: Path) -> None:
    """skip: the fsync is recorded as skipped and the save still succeeds (the replay shows what it costs)."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(fault=Fault(at=1, action="skip", ops=frozenset({"fsync"})))
        with _fileops.use(ops):
            assert save_step(m, 2) == 2
    assert [(op.name, op.faulted) for op in ops.ops if op.faulted] == [("fsync", "skip")]


def test_counting_can_be_paused(tmp_path: Path) -> None:
    """With counting off nothing fires; turned on, counting starts from there."""
    with _manager(tmp_path / "s") as m:
        ops = HarnessOps(fault=Fault(at=1, errno=errno.EIO, ops=frozenset({"write"})), counting=False)
        with _fileops.use(ops):
            save_step(m, 2)
            ops.counting = True
            with pytest.raises(PersistenceError):
                save_step(m, 3)
    assert ops.fired == 1


def test_real_errors_are_recorded(tmp_path: Path) -> None:
    """An error from the operating system itself (the first save's read of a missing file) is recorded."""
    m = PositionStateManager(StateConfig.in_dir(tmp_path / "s", backup_interval=1e9, durability="snapshot"), key=generate_key())
    with m:
        m.load_positions()
        ops = HarnessOps()
        with _fileops.use(ops):
            save_step(m, 1)
    reads = [op for op in ops.ops if op.name == "read_file"]
    assert reads[0].error == errno.ENOENT and reads[-1].error is None
