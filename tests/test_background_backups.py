"""Issue 14.2: timed backups off the caller's thread (a verified copy of the newest snapshot) and cheap pruning
(a verified-backup cache that never trusts a changed file)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import CorruptStateError, Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.backup import ops as _backup_ops
from posstate.selftest.harness import MUTATING, MUTATING_AND_READS, Fault, HarnessOps, copy_tree
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parents[1]


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def cfg_in(d: Path, **kw: Any) -> StateConfig:
    kw.setdefault("backup_interval", 0.0)
    kw.setdefault("durability", "snapshot")
    return StateConfig.in_dir(d, **kw)


def record(m: PositionStateManager, *names: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for n in names:
        m.on(n, seen.append)
    return seen


def listing(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d / "backups"))
    except FileNotFoundError:
        return []


def service(m: PositionStateManager) -> _background.BackupService:
    return _background.service(m._files)


def request_backup(m: PositionStateManager) -> None:
    """Ask for a timed backup now, exactly as a save's hook does (the newest backup made to look old)."""
    m._files.last_backup_at = float("-inf")
    _backup_ops.after_save(m._files, m._state)


class BlockInBackground(fs.FileOps):
    """Holds the background backup thread at its first *op* until released (no sleep: an Event)."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.reached = threading.Event()
        self.release = threading.Event()

    def _gate(self, name: str) -> None:
        if name == self.op and threading.current_thread().name == "posstate-backup" and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(60)

    def link(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        self._gate("link")
        super().link(src, dst)

    def fsync(self, fd: int) -> None:
        self._gate("fsync")
        super().fsync(fd)

    def listdir(self, path: fs.StrPath) -> list[str]:
        self._gate("listdir")
        return super().listdir(path)


class FailInBackground(fs.FileOps):
    """ENOSPC at every open() made by the background backup thread (a backup folder that stays full)."""

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        if threading.current_thread().name == "posstate-backup" and flags & os.O_CREAT:
            raise OSError(28, "injected ENOSPC", str(path))
        return super().open(path, flags, mode)


# ------------------------------------------------------------------------------------------ off the caller's thread


def test_save_returns_while_the_timed_backup_waits_and_the_backup_is_the_state_file(tmp_path: Path) -> None:
    """issue 14.2: a save returns while its timed backup is held in the background; the backup is a byte copy
    of the verified state file (not encoded again), emitted as backupCreated from the background thread."""
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        created = record(m, "backupCreated")
        block = BlockInBackground("listdir")
        with fs.use(block):
            m.save_positions([pos("A")])  # returns although the backup thread is held
            assert block.reached.wait(30) and listing(tmp_path) == [] and not created
            block.release.set()
            assert m.wait_for_backups(30)
        (name,) = listing(tmp_path)
        assert (tmp_path / "backups" / name).read_bytes() == m.path.read_bytes()
        assert created and created[0]["background"] is True and created[0]["generation"] == 1


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_journal_modes_take_timed_backups_as_compactions_produce_snapshots(tmp_path: Path, durability: str) -> None:
    """issue 14.2: a bot that never calls save() gets timed backups from its compactions' snapshots. (Each
    compaction runs in the background since issue 14.1: the test waits for each one, so the next threshold
    starts the next one; a loaded machine otherwise folds several thresholds into one compaction.)"""
    cfg = cfg_in(tmp_path, durability=durability, journal_max_records=20)
    with PositionStateManager(cfg, key=KEY) as m:
        for i in range(100):
            m.set_position(pos(f"S{i % 7}", i + 1))
            job = m._bg_job
            if job is not None:
                assert job.done.wait(60)
            assert m.wait_for_backups(30)
        gens = sorted(b.generation or 0 for b in m.list_backups())
    assert len(gens) >= 4 and gens[-1] > 20  # not only the first, empty snapshot
    assert all(b.valid for b in _backups.scan(cfg.backup_path))


def test_concurrent_writers_lose_nothing_while_backups_run(tmp_path: Path) -> None:
    """issue 14.2: four writer threads in group mode with compactions and background backups: every change
    is kept, backups are created and every one validates fully."""
    cfg = cfg_in(tmp_path, durability="group", journal_max_records=50, max_backups=5)
    with PositionStateManager(cfg, key=KEY) as m:
        created = record(m, "backupCreated")

        def writer(t: int) -> None:
            for i in range(1, 151):
                m.set_position(pos(f"T{t}", i))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert m.wait_for_backups(30)
        assert {k[0]: p.contracts for k, p in m.get_positions().items()} == {f"T{t}": 150 for t in range(4)}
        assert created
        assert all(m.validate_backup(b.id).valid for b in m.list_backups())
    with PositionStateManager(cfg, key=KEY) as again:
        assert {k[0]: p.contracts for k, p in again.load_positions().items()} == {f"T{t}": 150 for t in range(4)}


def test_explicit_create_backup_returns_a_verified_copy(tmp_path: Path) -> None:
    """issue 14.2: create_backup() still returns a verified BackupInfo; the file is the state file's bytes."""
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), key=KEY) as m:
        m.save_positions([pos("A"), pos("B")])
        info = m.create_backup()
        assert info.valid and info.generation == 1 and info.position_count == 2
        assert info.path.read_bytes() == m.path.read_bytes()
        assert m.validate_backup(info.id).valid


# ------------------------------------------------------------------------------------------ the pruning cache


def _with_backups(d: Path, n: int) -> PositionStateManager:
    m = PositionStateManager(cfg_in(d, max_backups=n + 5), key=KEY)
    for i in range(n):
        m.save_positions([pos("A", i + 1)])
        assert m.wait_for_backups(30)
    return m


def test_pruning_decrypts_each_backup_once_not_on_every_run(tmp_path: Path) -> None:
    """issue 14.2: with the cache, a prune fully checks only backups it has not verified (a new one is
    verified when created), so repeated prunes run no full check at all."""
    with _with_backups(tmp_path, 4) as m:
        svc = service(m)
        before = svc.cache.full_checks
        m.prune_old_backups()
        m.prune_old_backups()
        assert svc.cache.full_checks == before == 0
        assert len(svc.cache) == 4


def test_without_a_manager_prune_dry_run_checks_every_backup_fully(tmp_path: Path) -> None:
    """issue 14.2: plan_prune without a cache (the CLI's --dry-run) still validates every backup fully."""
    with _with_backups(tmp_path, 2) as m:
        cfg = m.config
    victim = sorted((tmp_path / "backups").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[200] ^= 1
    victim.write_bytes(bytes(data))
    result = _backup_ops.plan_prune(cfg, _statefile.ReadOptions(keyring=m._keyring))
    assert [d.backup.path for d in result.quarantined] == [victim]


def _damage_keeping_trailer_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[120] ^= 0x01  # inside the sealed payload: the trailer (written over the original bytes) stays
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_with_other_backup(path: Path) -> None:
    other = sorted(p for p in path.parent.iterdir() if p != path)[0]
    tmp = path.with_name(".swap")
    shutil.copyfile(other, tmp)
    data = bytearray(tmp.read_bytes())
    data[120] ^= 0x01
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def _rewrite_whole(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_damage_keeping_trailer_size_and_mtime, id="bitflip-same-trailer-size-mtime"),
        pytest.param(_replace_with_other_backup, id="renamed-over"),
        pytest.param(_rewrite_whole, id="trailer-changed"),
    ],
)
def test_a_backup_changed_after_it_was_verified_is_verified_again(tmp_path: Path, change: Any) -> None:
    """issue 14.2: a backup changed on disk after its verdict was cached is checked fully again (and, being
    damaged, quarantined), never trusted from the cache; the unchanged ones are not decrypted again."""
    with _with_backups(tmp_path, 3) as m:
        svc = service(m)
        victim = sorted((tmp_path / "backups").iterdir())[1]
        change(victim)
        checks = svc.cache.full_checks
        result = m.prune_old_backups()
        assert svc.cache.full_checks == checks + 1
        assert [d.backup.id for d in result.quarantined] == [victim.name[len("positions_") : -len(".json")]]
        assert not victim.exists()


def test_restore_verify_and_recovery_never_use_the_cache(tmp_path: Path) -> None:
    """issue 14.2: a cache entry claiming a damaged backup valid (as if planted) does not fool restore or
    validate_backup: they read and validate the file itself."""
    with _with_backups(tmp_path, 2) as m:
        svc = service(m)
        target = sorted((tmp_path / "backups").iterdir())[-1]
        info = m.list_backups()[0]
        data = bytearray(target.read_bytes())
        data[120] ^= 0x01
        target.write_bytes(bytes(data))
        from posstate.backup.verified import probe

        seen = probe(target)
        assert seen is not None
        svc.cache.remember(target.name, seen, info)  # the cache now vouches for the damaged file
        assert not m.validate_backup(info.id).valid
        with pytest.raises(CorruptStateError):
            m.restore_from_backup(info.id)


# ------------------------------------------------------------------------------------------ faults and close


def _ops_of_one_background_backup(d: Path, counted: frozenset[str]) -> int:
    with _with_backups(d, 2) as m:
        ops = HarnessOps(ignore_threads=frozenset())
        with fs.use(ops):
            request_backup(m)
            assert m.wait_for_backups(30)
    return sum(1 for op in ops.ops if op.name in counted)


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_fault_at_each_operation_of_a_background_backup(tmp_path: Path, persistent: bool) -> None:
    """issue 14.2: EIO at every operation of a background backup, once and persistent: the state file is
    untouched, backupFailed is emitted or the backup is whole, nothing invalid is listed, no temp survives the
    next backup, and the failed backup is retried (at the next snapshot after backup_interval)."""
    total = _ops_of_one_background_backup(tmp_path / "probe", MUTATING_AND_READS)
    assert total > 10
    outcomes = set()
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        with _with_backups(d, 2) as m:
            before_state, before_list = m.path.read_bytes(), listing(d)
            failed, created = record(m, "backupFailed"), record(m, "backupCreated")
            ops = HarnessOps(fault=Fault(at=k, persistent=persistent, ops=MUTATING_AND_READS), ignore_threads=frozenset())
            with fs.use(ops):
                request_backup(m)
                assert m.wait_for_backups(30)
            assert ops.fired >= 1
            assert m.path.read_bytes() == before_state
            assert failed or created, f"op {k}: neither reported"
            outcomes.add("failed" if failed else "created")
            for b in _backups.scan(d / "backups"):
                assert b.valid and m.validate_backup(b.id).valid, f"op {k}: {b.id} listed but invalid"
            if failed:
                new = {n for n in set(listing(d)) - set(before_list) if not n.startswith(".")}
                # Once: the failed backup is removed. Persistent: its removal may fail too; what stays is whole
                # and valid (checked above), as the temp was fsynced before it got the name.
                assert failed[-1]["reason"] and (persistent or not new), f"op {k}: {new}"
                m.save_positions([pos("A", 99)])  # backup_interval is 0: the next snapshot retries
                assert m.wait_for_backups(30)
                assert created, f"op {k}: the failed backup was not retried"
            assert not [n for n in listing(d) if n.startswith(".")], f"op {k}: temp left after the next backup"
    assert outcomes == {"failed", "created"} if not persistent else "failed" in outcomes


def test_a_failed_backup_waits_for_the_interval_before_retrying(tmp_path: Path) -> None:
    """issue 14.2: after a failure no backup is attempted until backup_interval has passed (no retry storm
    at every save), then the next snapshot's backup runs."""
    with PositionStateManager(cfg_in(tmp_path, backup_interval=600), key=KEY) as m:
        failed, created = record(m, "backupFailed"), record(m, "backupCreated")
        svc = service(m)
        t = [1_000_000.0]
        svc.clock = lambda: t[0]
        with fs.use(FailInBackground()):
            m.save_positions([pos("A")])
            assert m.wait_for_backups(30)
            assert len(failed) == 1 and not created and "ENOSPC" in failed[0]["reason"]
            m.save_positions([pos("A", 2)])  # still failing, but not even tried: the interval has not passed
            assert m.wait_for_backups(30) and len(failed) == 1 and not svc.running
        t[0] += 601
        m.save_positions([pos("A", 3)])
        assert m.wait_for_backups(30)
        assert len(created) == 1 and created[0]["generation"] == 3


def test_close_waits_for_a_running_backup(tmp_path: Path) -> None:
    """issue 14.2: close() while a background backup runs lets it finish (within the bound): it is listed."""
    m = PositionStateManager(cfg_in(tmp_path), key=KEY)
    block = BlockInBackground("link")
    with fs.use(block):
        m.save_positions([pos("A")])
        assert block.reached.wait(30)
        closer = threading.Thread(target=m.close)
        closer.start()
        block.release.set()
        closer.join(60)
    assert m.closed and len(listing(tmp_path)) == 1
    assert _backups.scan(tmp_path / "backups")[0].valid


@pytest.mark.parametrize("stuck_at", ["fsync", "link"])
def test_close_gives_up_after_its_bound_and_says_what_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stuck_at: str
) -> None:
    """issue 14.2: a backup stuck past close()'s bound: close() returns, releases the lock and reports what it
    left (backupFailed, log). Stuck before its name (fsync of the temp): cancelled, no backup appears and its
    temp is removed. Stuck giving the name (link): said so; the backup that appears is whole and valid."""
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.01)
    m = PositionStateManager(cfg_in(tmp_path), key=KEY)
    failed = record(m, "backupFailed")
    block = BlockInBackground(stuck_at)
    with fs.use(block):
        m.save_positions([pos("A")])
        assert block.reached.wait(30)
        thread = service(m)._thread
        assert thread is not None
        m.close()  # returns although the backup is stuck
        assert failed and failed[-1]["operation"] == "close"
        with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), key=KEY) as again:  # the lock is free
            again.load_positions()
        block.release.set()
        thread.join(60)
    if stuck_at == "fsync":
        assert "cancelled" in failed[-1]["reason"]
        assert listing(tmp_path) == []  # cancelled before the link; its temp removed
    else:
        assert "may still add a backup" in failed[-1]["reason"]
        assert len(listing(tmp_path)) == 1
        assert _backups.scan(tmp_path / "backups")[0].valid


# ------------------------------------------------------------------------------------------ SIGKILL

_CHILD = """
import sys
from posstate import PositionStateManager, StateConfig
from posstate.backup import ops as _backup_ops
from posstate.selftest.harness import Fault, HarnessOps, MUTATING, MUTATING_AND_READS
from posstate.storage import fileops as fs

d, at, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = PositionStateManager(StateConfig.in_dir(d, backup_interval=0.0, durability="snapshot"), key=bytes(range(32)))
m.load_positions()
fault = None if at == 0 else Fault(at=at, action="crash_" + when, ops=MUTATING_AND_READS)
ops = HarnessOps(fault=fault, ignore_threads=frozenset())
with fs.use(ops):
    m._files.last_backup_at = float("-inf")
    _backup_ops.after_save(m._files, m._state)
    m.wait_for_backups(60)
print(sum(1 for op in ops.ops if op.name in MUTATING_AND_READS), flush=True)
"""


def test_sigkill_at_every_operation_of_a_background_backup(tmp_path: Path) -> None:
    """issue 14.2: a child killed with SIGKILL before and after each operation of a background backup leaves
    the state file untouched, no partial backup listed as valid (every listed one validates fully), and the
    temps are swept by the next backup."""
    seed = tmp_path / "seed"
    with _with_backups(seed, 2):
        pass
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    probe = tmp_path / "probe"
    copy_tree(seed, probe)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(probe), "0", "before"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.strip())
    assert total > 10
    state_bytes = (seed / "positions.json").read_bytes()
    for k in range(1, total + 1):
        for when in ("before", "after"):
            d = tmp_path / f"k{k}{when}"
            copy_tree(seed, d)
            run = subprocess.run([sys.executable, "-c", _CHILD, str(d), str(k), when], env=env, capture_output=True)
            assert run.returncode == -signal.SIGKILL, (k, when, run.stderr)
            assert (d / "positions.json").read_bytes() == state_bytes
            with PositionStateManager(cfg_in(d, backup_interval=1e9), key=KEY) as m:
                listed = m.list_backups()
                assert len(listed) in (2, 3) and all(b.valid and m.validate_backup(b.id).valid for b in listed), (k, when)
                m.create_backup()  # the next backup sweeps a killed one's temp
            assert not [n for n in listing(d) if n.startswith(".")], (k, when)
            shutil.rmtree(d)
    assert MUTATING <= MUTATING_AND_READS
