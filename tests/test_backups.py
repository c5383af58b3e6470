"""Timestamped backups: naming, verification, listing, timed creation, faults, restore, batch save."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from posstate import (
    AmbiguousBackupError,
    BackupInfo,
    CorruptStateError,
    PersistenceError,
    Position,
    PositionStateManager,
    PosStateError,
    StaleBackupError,
    StateConfig,
    StateLockedError,
    StateNotFoundError,
)
from posstate.backup import backups as _backups
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parents[1]


def pos(symbol: str = "BTC/USDT", side: str = "long", contracts: str = "1") -> Position:
    return Position(symbol=symbol, side=side, contracts=contracts, entry_price="100")  # type: ignore[arg-type]


def manager(tmp_path: Path, **kw: Any) -> PositionStateManager:
    kw.setdefault("backup_interval", 0.0)
    return PositionStateManager(StateConfig.in_dir(tmp_path / "state", **kw), key=KEY)


def record(mgr: PositionStateManager, *names: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for n in names:
        mgr.on(n, seen.append)
    return seen


def backup_names(mgr: PositionStateManager) -> list[str]:
    try:
        return sorted(os.listdir(mgr.config.backup_path))
    except FileNotFoundError:
        return []


def old_backup(mgr: PositionStateManager, positions: list[Position], *, age: float) -> BackupInfo:
    """Write a valid backup whose state was saved *age* seconds ago."""
    from posstate.model.document import StateData

    st = StateData(generation=1, positions={p.key: p for p in positions}, position_revs={p.key: 1 for p in positions})
    then = time.time() - age
    return _backups.write_backup(
        st,
        backup_dir=mgr.config.backup_path,
        keyring=Keyring.resolve(key=KEY, passphrase=None),
        compression_level=3,
        options=mgr._read,
        now=then,
        written_at_ms=int(then * 1000),
    )


class FailAt(fs.FileOps):
    """Raise EIO at the k-th file operation (1-based); 0 only records."""

    def __init__(self, k: int = 0) -> None:
        self.k = k
        self.ops: list[str] = []

    def _tick(self, name: str) -> None:
        self.ops.append(name)
        if len(self.ops) == self.k:
            raise OSError(errno.EIO, f"injected EIO at {name}")

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        self._tick("open")
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._tick("write")
        return super().write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self._tick("write")
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._tick("fsync")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        super().close(fd)
        self._tick("close")  # like Linux: the descriptor is gone even when close reports an error

    def replace(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        self._tick("replace")
        super().replace(src, dst)

    def link(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        self._tick("link")
        super().link(src, dst)

    def unlink(self, path: fs.StrPath) -> None:
        self._tick("unlink")
        super().unlink(path)

    def fsync_dir(self, path: fs.StrPath) -> None:
        self._tick("fsync_dir")
        super().fsync_dir(path)

    def read_file(self, path: fs.StrPath, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        self._tick("read_file")
        return super().read_file(path, limit, max_size)

    def mkdir(self, path: fs.StrPath, mode: int = 0o700) -> None:
        self._tick("mkdir")
        super().mkdir(path, mode)

    def listdir(self, path: fs.StrPath) -> list[str]:
        self._tick("listdir")
        return super().listdir(path)

    def lstat(self, path: fs.StrPath) -> os.stat_result:
        self._tick("lstat")
        return super().lstat(path)

    def stat(self, path: fs.StrPath) -> os.stat_result:
        self._tick("stat")
        return super().stat(path)


class FailInDir(fs.FileOps):
    """ENOSPC for every file created inside one directory (the backup directory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        if str(path).startswith(self.directory):
            raise OSError(errno.ENOSPC, "injected ENOSPC")
        return super().open(path, flags, mode)


# ------------------------------------------------------------------------------------------ failure paths


def test_fault_at_each_file_operation_of_create_backup_leaves_no_partial_backup(tmp_path: Path) -> None:
    """EIO at every file operation of create_backup: either PersistenceError and no new file, or a valid backup."""
    with manager(tmp_path, backup_interval=1e9) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        main_before = m.path.read_bytes()
        probe = FailAt(0)
        with fs.use(probe):
            m.create_backup()
        total = len(probe.ops)
        assert total > 5
        failures = 0
        for k in range(1, total + 1):
            before = backup_names(m)
            failed = record(m, "backupFailed")
            with fs.use(FailAt(k)):
                try:
                    info = m.create_backup()
                except PersistenceError:
                    failures += 1
                    assert backup_names(m) == before, f"fault at op {k} left {set(backup_names(m)) - set(before)}"
                    assert failed and failed[-1]["reason"]
                else:
                    names = backup_names(m)
                    assert not [n for n in names if n.startswith(".")], f"temp left at op {k}"
                    assert _backups.full_check(_backups.inspect_file(info.path, info.id, info.created_at), options=m._read)[
                        0
                    ].valid
            assert m.path.read_bytes() == main_before
            m.off("backupFailed")
        assert failures >= 5


def test_fault_at_each_file_operation_of_restore_loses_nothing(tmp_path: Path) -> None:
    """EIO at every file operation of a restore: afterwards the state is the old one or the restored one."""
    old, new = {pos().key: pos(contracts="2")}, {pos().key: pos(contracts="1")}

    def setup(where: Path) -> PositionStateManager:
        m = manager(where, backup_interval=1e9)
        m.save_positions([pos(contracts="1")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos(contracts="2")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        return m

    with setup(tmp_path / "probe") as m:
        probe = FailAt(0)
        with fs.use(probe):
            m.restore_from_backup("latest")
    total = len(probe.ops)
    outcomes = set()
    for k in range(1, total + 1):
        where = tmp_path / f"k{k}"
        with setup(where) as m:
            before_backups = {b.id for b in m.list_backups()}
            with fs.use(FailAt(k)):
                try:
                    m.restore_from_backup("latest")
                    outcomes.add("ok")
                except PosStateError:  # PersistenceError, or a read error that hid the backup
                    outcomes.add("failed")
                    assert m.get_positions() in (old, new)
        with manager(where) as fresh:
            assert fresh.get_positions() in (old, new), f"fault at op {k}"
            assert before_backups <= {b.id for b in fresh.list_backups()}  # no backup lost
    assert outcomes == {"ok", "failed"}


def test_failed_timed_backup_never_fails_the_save(tmp_path: Path) -> None:
    """With the backup directory full, save() still succeeds and backupFailed is emitted."""
    with manager(tmp_path) as m:
        failed = record(m, "backupFailed")
        with fs.use(FailInDir(m.config.backup_path)):
            gen = m.save_positions([pos()])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert gen == 1
        assert failed and "ENOSPC" in failed[0]["reason"]
        assert [n for n in backup_names(m) if n.endswith(".json") or n.startswith(".")] == []
        assert _statefile.read(m.path, options=m._read).state.generation == 1
        m.save_positions([pos(contracts="2")])  # fault cleared: the next save makes the backup
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert len(m.list_backups()) == 1


def test_list_backups_marks_damaged_and_truncated_files(tmp_path: Path) -> None:
    """A bit-flipped and a truncated backup are still listed, marked damaged, with a reason."""
    with manager(tmp_path) as m:
        for i in range(3):
            m.save_positions([pos(contracts=str(i + 1))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        infos = m.list_backups()
        assert len(infos) == 3
        flip = bytearray(infos[0].path.read_bytes())
        flip[200] ^= 0x10
        infos[0].path.write_bytes(bytes(flip))
        infos[1].path.write_bytes(infos[1].path.read_bytes()[:150])
        listed = m.list_backups()
        assert [b.id for b in listed] == [b.id for b in infos]
        assert listed[0].damaged and not listed[0].valid and "checksum" in listed[0].reason
        assert listed[1].damaged and "cut short" in listed[1].reason
        assert listed[2].valid and not listed[2].damaged and listed[2].generation == 1


def test_create_backup_of_nothing_saved_is_refused(tmp_path: Path) -> None:
    """create_backup() before any save raises StateNotFoundError and writes no backup."""
    with manager(tmp_path) as m:
        failed = record(m, "backupFailed")
        with pytest.raises(StateNotFoundError):
            m.create_backup()
        assert failed and backup_names(m) == []


def test_restore_validates_first_and_refuses_a_damaged_backup(tmp_path: Path) -> None:
    """Restoring a damaged backup raises CorruptStateError and changes nothing."""
    with manager(tmp_path) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos(contracts="5")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        target = m.list_backups()[-1]
        data = bytearray(target.path.read_bytes())
        data[-80] ^= 1
        target.path.write_bytes(bytes(data))
        before = m.path.read_bytes()
        with pytest.raises(CorruptStateError):
            m.restore_from_backup(target.id)
        assert m.path.read_bytes() == before
        assert m.get_position("BTC/USDT", "long").contracts == 5  # type: ignore[union-attr]


def test_restore_refuses_a_backup_older_than_threshold_unless_accept_older(tmp_path: Path) -> None:
    """A valid backup two hours older than the last save is refused (duplicate orders) unless accept_older."""
    with manager(tmp_path, backup_interval=1e9, backup_threshold=3600) as m:
        m.load_positions()  # fresh start before the old backup appears
        old = old_backup(m, [pos(contracts="9")], age=7200)
        m.save_positions([pos(contracts="1")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        with pytest.raises(StaleBackupError) as info:
            m.restore_from_backup(old.id)
        assert "duplicate orders" in str(info.value) and "--accept-older" in str(info.value)
        assert info.value.age > 3600
        assert m.get_position("BTC/USDT", "long").contracts == 1  # type: ignore[union-attr]
        result = m.restore_from_backup(old.id, accept_older=True)
        assert m.get_position("BTC/USDT", "long").contracts == 9  # type: ignore[union-attr]
        assert result.generation == 2 and result.source_generation == 1


def test_ambiguous_and_unknown_backup_ids(tmp_path: Path) -> None:
    """A prefix matching two backups raises AmbiguousBackupError; an unknown id StateNotFoundError."""
    with manager(tmp_path) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos(contracts="2")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        ids = [b.id for b in m.list_backups()]
        common = ids[0][:14]  # the ids differ only after the second
        with pytest.raises(AmbiguousBackupError) as info:
            m.restore_from_backup(common)
        assert set(info.value.matches) == set(ids)
        with pytest.raises(StateNotFoundError):
            m.restore_from_backup("19990101")
        assert isinstance(info.value, LookupError)


_HOLDER = """
import sys
from posstate import PositionStateManager, StateConfig
m = PositionStateManager(StateConfig.in_dir(sys.argv[1]), key=bytes(range(32)))
print("locked", flush=True)
sys.stdin.read()
"""


def test_restore_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """While a child process holds the writer lock, a manager for a restore cannot even be created."""
    with manager(tmp_path) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "state")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"locked"
        with pytest.raises(StateLockedError) as info:
            manager(tmp_path).restore_from_backup("latest")
        assert info.value.pid == child.pid
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    with manager(tmp_path) as m:  # lock freed: now the restore runs
        assert m.restore_from_backup("latest").source_generation == 1


_SAVER = """
import sys
from posstate import Position, PositionStateManager, StateConfig
m = PositionStateManager(StateConfig.in_dir(sys.argv[1], backup_interval=0.0, max_backups=5), key=bytes(range(32)))
i = 0
while True:
    i += 1
    m.save_positions([Position(symbol="BTC/USDT", side="long", contracts=str(i), entry_price="1")])
    assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
    print(i, flush=True)
"""


def test_kill_during_save_and_backup_loop_leaves_only_whole_backups(tmp_path: Path) -> None:
    """SIGKILL a child saving (and backing up, and pruning) in a loop: every backup left is whole and valid."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path / "state")], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    acknowledged = 0
    while acknowledged < 25:
        acknowledged = int(child.stdout.readline())
    child.kill()
    child.wait(timeout=30)
    child.stdout.close()
    with manager(tmp_path, max_backups=5) as m:
        contracts = m.get_position("BTC/USDT", "long").contracts  # type: ignore[union-attr]
        assert contracts >= acknowledged
        infos = m.list_backups()
        assert infos and all(b.valid for b in infos)
        assert all(m.validate_backup(b.id).valid for b in infos)
        m.create_backup()  # sweeps any temp a killed backup left
        assert [n for n in backup_names(m) if n.startswith(".")] == []


def test_stats_logger_gets_backup_events(tmp_path: Path) -> None:
    """The stats logger receives STATE_MANAGEMENT records for backupCreated and backupRestored."""

    class Stats:
        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []

        def log_stats(self, stats: dict[str, Any]) -> None:
            self.records.append(stats)

    stats = Stats()
    cfg = StateConfig.in_dir(tmp_path / "state", backup_interval=0.0)
    with PositionStateManager(cfg, key=KEY, stats_logger=stats) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.restore_from_backup("latest")
    events = [r["event"] for r in stats.records]
    assert "backupCreated" in events and "backupRestored" in events
    assert all(r["type"] == "STATE_MANAGEMENT" and "timestamp" in r for r in stats.records)


# ------------------------------------------------------------------------------------------ happy paths


def test_backup_name_mode_and_container(tmp_path: Path) -> None:
    """create_backup writes positions_YYYYMMDD_HHMMSS.json, mode 0600, a container that reads back."""
    with manager(tmp_path, backup_interval=1e9) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        info = m.create_backup()
        assert re.fullmatch(r"[0-9]{8}_[0-9]{6}(_[0-9]+)?", info.id)
        assert info.path.name == f"positions_{info.id}.json"
        assert stat.S_IMODE(info.path.stat().st_mode) == 0o600
        loaded = _statefile.read(info.path, options=m._read)
        assert loaded.state.positions == {pos().key: pos()}
        assert info.generation == 1 and info.position_count == 1 and info.key_id == loaded.header.key_id
        assert m.validate_backup(info.id).valid


def test_same_second_backups_get_suffixes(tmp_path: Path) -> None:
    """Three backups in one second are named ID, ID_2, ID_3 and listed newest first."""
    with manager(tmp_path, backup_interval=1e9) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        now = time.time()
        where = tmp_path / "other"
        made = [
            _backups.write_backup(
                m._state, backup_dir=where, keyring=m._write_keyring, compression_level=3, options=m._read, now=now
            )
            for _ in range(3)
        ]
        base = made[0].id
        assert [b.id for b in made] == [base, f"{base}_2", f"{base}_3"]
        assert [b.id for b in _backups.scan(where)] == [f"{base}_3", f"{base}_2", base]


def test_save_makes_a_backup_only_when_the_newest_is_older_than_the_interval(tmp_path: Path) -> None:
    """With backup_interval=3600 only the first save makes a backup; with 0 every save does."""
    with manager(tmp_path, backup_interval=3600) as m:
        created = record(m, "backupCreated")
        for i in range(3):
            m.save_positions([pos(contracts=str(i + 1))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert len(created) == 1 and len(m.list_backups()) == 1
    with manager(tmp_path / "b", backup_interval=0) as m:
        for i in range(3):
            m.save_positions([pos(contracts=str(i + 1))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert [b.generation for b in m.list_backups()] == [3, 2, 1]


def test_restore_by_prefix_and_latest_keeps_pre_restore_backup(tmp_path: Path) -> None:
    """restore by unique prefix and by 'latest': new generation above all seen, current file kept as a backup."""
    with manager(tmp_path, backup_interval=1e9) as m:
        restored = record(m, "backupRestored")
        m.save_positions([pos(contracts="1")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        first = m.create_backup()
        m.save_positions([pos(contracts="2"), pos("ETH/USDT", "short")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos(contracts="3")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        result = m.restore_from_backup(first.id[:15] if "_" not in first.id[15:] else first.id)
        assert m.get_positions() == {pos().key: pos(contracts="1")}
        assert result.generation == 4 and restored and restored[0]["backup_id"] == first.id
        pre = result.pre_restore_backup
        assert pre is not None
        kept = _statefile.read(m.config.backup_path / f"positions_{pre}.json", options=m._read).state
        assert kept.generation == 3 and kept.positions == {pos().key: pos(contracts="3")}
        result2 = m.restore_from_backup("latest")  # the pre-restore backup is now the newest
        assert result2.backup.id == pre and m.get_positions() == {pos().key: pos(contracts="3")}
        assert result2.generation == 5
        # the closed ETH position has a tombstone newer than any backup holding it
        assert ("ETH/USDT", "short") in m._state.position_tombstones


def test_restore_works_when_the_state_file_is_damaged(tmp_path: Path) -> None:
    """A damaged state file does not block a restore; it is quarantined, not deleted."""
    with manager(tmp_path, backup_interval=1e9) as m:
        m.save_positions([pos()])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.create_backup()
    data = bytearray((tmp_path / "state/positions.json").read_bytes())
    data[190] ^= 0xFF
    (tmp_path / "state/positions.json").write_bytes(bytes(data))
    with manager(tmp_path) as m:
        m.restore_from_backup("latest")
        assert m.get_positions() == {pos().key: pos()}
        assert len(os.listdir(tmp_path / "state/quarantine")) == 1


def test_batch_save_is_one_write(tmp_path: Path) -> None:
    """batch_save_positions applies upserts and deletes in one save (one generation, one stateSaved)."""
    with manager(tmp_path, backup_interval=1e9) as m:
        m.save_positions([pos(), pos("ETH/USDT", "short")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        saved = record(m, "stateSaved")
        gen = m.batch_save_positions([pos("SOL/USDT", "long"), pos(contracts="7")], deletes=[("ETH/USDT", "short")])
        assert gen == 2 and len(saved) == 1
        assert set(m.get_positions()) == {("BTC/USDT", "long"), ("SOL/USDT", "long")}
        with pytest.raises(ValueError):
            m.batch_save_positions([pos()], deletes=[("BTC/USDT", "long")])
        assert m.generation == 2
