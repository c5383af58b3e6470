"""Issue 14.2 (timed backups in the journal modes): a timed backup is a copy of the newest durable snapshot,
written by a background compaction the backup service asks for when memory is ahead; memory is never
encoded again for it (posstate/backup/viacompaction.py)."""

from __future__ import annotations

import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import acked as _acked
from posstate.backup import background as _background
from posstate.backup import viacompaction as _via
from posstate.manager import compaction as _compaction
from posstate.manager import procompaction as _proc
from posstate.manager.files import ManagerFiles
from posstate.selftest.harness import HarnessOps
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.container import checksum_of

KEY = bytes(range(32))
N = 300


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _compacting() -> bool:
    return threading.current_thread().name.startswith("posstate-compact")


class Spy:
    """Every encode of a whole state (its thread and trailer checksum) and every backup of memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.encodes: list[tuple[str, str]] = []
        self.memory: list[str] = []
        real_encode, real_memory = _statefile.encode, _acked.from_memory

        def encode(*a: Any, **kw: Any) -> Any:
            st, enc = real_encode(*a, **kw)
            self.encodes.append((threading.current_thread().name, enc.checksum))
            return st, enc

        def from_memory(*a: Any, **kw: Any) -> Any:
            self.memory.append(threading.current_thread().name)
            return real_memory(*a, **kw)

        real_answer = _proc._answer

        def answer(*a: Any, **kw: Any) -> Any:  # compaction="process": the worker encoded it, this thread installs it
            got = real_answer(*a, **kw)
            self.encodes.append((threading.current_thread().name, got.checksum))
            return got

        monkeypatch.setattr(_statefile, "encode", encode)
        monkeypatch.setattr(_acked, "from_memory", from_memory)
        monkeypatch.setattr(_proc, "_answer", answer)

    def snapshots(self) -> set[str]:
        """Trailer checksums of the snapshots background compactions wrote."""
        return {c for t, c in self.encodes if t.startswith("posstate-compact")}


class Watch:
    """Background backupCreated/backupFailed events; wait for one that matches."""

    def __init__(self, m: PositionStateManager) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        m.on("backupCreated", self._seen)
        m.on("backupFailed", self._seen)

    def _seen(self, e: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(e)
            self._cond.notify_all()

    def created_after(self, generation: int) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events
                if e["event"] == "backupCreated" and e.get("background") and (e["generation"] or 0) > generation
            ]

    def wait(self, pred: Any, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.events), timeout)


def _start(tmp_path: Path, durability: str, **kw: Any) -> tuple[PositionStateManager, StateConfig]:
    kw.setdefault("backup_interval", 0.05)
    kw.setdefault("journal_max_records", 1_000_000)  # no threshold compaction: only the ones a backup asks for
    cfg = StateConfig.in_dir(tmp_path, durability=durability, **kw)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(N)])
    assert m.wait_for_backups(30)
    return m, cfg


def _prefix_length(positions: dict[Any, Position], changed: int) -> int:
    """The k such that *positions* is the state after the first k changes (change s set key s to 5)."""
    fives = sorted(int(k[0][1:]) for k, p in positions.items() if p.contracts == 5)
    assert len(positions) == N
    assert fives == list(range(len(fives))) and len(fives) <= changed, fives
    return len(fives)


# ------------------------------------------------------------------------------------------ the copy


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_timed_backup_in_journal_modes_is_a_copy_of_a_compaction_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14.2: with acknowledged changes only in the journal, a timed backup is the byte copy of a snapshot a
    background compaction wrote (same trailer checksum); nothing is encoded on the backup thread, memory is never
    backed up, and the backup holds a prefix of the acknowledged changes."""
    m, _cfg = _start(tmp_path, durability)
    try:
        base = m.generation
        spy = Spy(monkeypatch)
        watch = Watch(m)
        changed = 0
        for s in range(N - 1):
            m.set_position(pos(s, 5))
            changed += 1
            if watch.created_after(base):
                break
        assert watch.wait(lambda ev: watch.created_after(base) or any(e["event"] == "backupFailed" for e in ev)), watch.events
        assert m.wait_for_backups(30)
    finally:
        m.close()
    assert [e for e in watch.events if e["event"] == "backupFailed"] == []
    assert spy.memory == [] or spy.memory == ["MainThread"]  # the close backup (issue 15.2) runs on close()'s thread
    assert [t for t, _ in spy.encodes if t == "posstate-backup"] == []
    created = watch.created_after(base)[0]
    assert "acknowledged" not in created and created["background"] is True
    data = Path(created["path"]).read_bytes()
    assert checksum_of(data) in spy.snapshots()
    loaded = _statefile.read(Path(created["path"]), options=_statefile.ReadOptions(keyring=m._keyring), what="backup")
    assert _prefix_length(loaded.state.positions, changed) >= 1


def test_concurrent_writers_lose_nothing_and_every_timed_backup_is_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2: four group-mode writers while timed backups fall due: every change is kept, two or more
    timed backups are taken, each a copy of a snapshot a compaction wrote, and memory is never backed up."""
    m, cfg = _start(tmp_path, "group", backup_interval=0.02)
    spy = Spy(monkeypatch)
    try:
        base = m.generation
        watch = Watch(m)
        stop = threading.Event()

        def writer(t: int) -> None:
            c = 2
            while not stop.is_set() and c < 20_000:
                m.set_position(pos(t, c))
                c += 1
            m.set_position(pos(t, 1_000_000))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        ok = watch.wait(lambda ev: len(watch.created_after(base)) >= 2 or any(e["event"] == "backupFailed" for e in ev))
        stop.set()
        for th in threads:
            th.join(60)
        assert ok, watch.events
        assert m.wait_for_backups(30)
        want = m.get_positions()
        created = watch.created_after(base)
        assert all(m.validate_backup(Path(e["path"]).name[len("positions_") : -len(".json")]).valid for e in created)
    finally:
        m.close()
    assert [e for e in watch.events if e["event"] == "backupFailed"] == []
    assert "posstate-backup" not in spy.memory
    assert all(checksum_of(Path(e["path"]).read_bytes()) in spy.snapshots() for e in created)
    assert all(want[pos(t).key].contracts == 1_000_000 for t in range(4))
    with PositionStateManager(cfg, key=KEY) as again:
        assert again.load_positions() == want


# ------------------------------------------------------------------------------------------ failure paths


class FailCompaction(fs.FileOps):
    """ENOSPC at every file created by a background compaction (a disk that stays full for it)."""

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        if _compacting() and flags & os.O_CREAT:
            raise OSError(28, "injected ENOSPC", str(path))
        return super().open(path, flags, mode)


def test_a_failing_compaction_leaves_the_backup_due_and_reported_then_falls_back_to_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2: while the compaction a timed backup waits for fails, the backup stays due and each failure
    is reported (backupFailed, operation "compaction"); after FALLBACK_AFTER failed attempts the acknowledged
    state in memory is backed up instead (acknowledged: true), holding every change."""
    monkeypatch.setattr(_compaction, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(_compaction, "RETRY_MAX", 0.02)
    monkeypatch.setattr(_via, "FALLBACK_AFTER", 2)
    m, _cfg = _start(tmp_path, "sync", compaction="thread")  # its fault hooks are in-process
    try:
        base = m.generation
        last = m._files.last_backup_at
        watch = Watch(m)
        with fs.use(FailCompaction()):
            for s in range(5):
                m.set_position(pos(s, 5))
            assert watch.wait(lambda ev: any(e["event"] == "backupFailed" for e in ev)), watch.events
            assert m._files.last_backup_at == last and _background.due(m._files, m._files.backups.clock())  # type: ignore[union-attr]
            assert watch.wait(lambda ev: bool(watch.created_after(base))), watch.events
        assert m.wait_for_backups(30)
        want = m.get_positions()
    finally:
        m.close()
    failed = [e for e in watch.events if e["event"] == "backupFailed"]
    assert failed and all(e["operation"] == "compaction" and "ENOSPC" in e["reason"] for e in failed), failed
    created = watch.created_after(base)[0]
    assert created["acknowledged"] is True
    loaded = _statefile.read(Path(created["path"]), options=_statefile.ReadOptions(keyring=m._keyring), what="backup")
    assert loaded.state.positions == want


def test_a_refused_rotation_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.2: a rotation the journal refuses (group mode: records waiting for their sync) is asked for
    again; the timed backup is then the copy of that compaction's snapshot, never a backup of memory."""
    m, _cfg = _start(tmp_path, "group")
    try:
        spy = Spy(monkeypatch)
        real = m._journal.rotate
        refused: list[int] = []

        def rotate(generation: int) -> Any:
            if len(refused) < 3:
                refused.append(generation)
                return None
            return real(generation)

        monkeypatch.setattr(m._journal, "rotate", rotate)
        base = m.generation
        watch = Watch(m)
        m.set_position(pos(0, 5))
        assert watch.wait(lambda ev: bool(watch.created_after(base)) or any(e["event"] == "backupFailed" for e in ev))
        assert m.wait_for_backups(30)
    finally:
        m.close()
    assert len(refused) == 3
    created = watch.created_after(base)[0]
    assert "posstate-backup" not in spy.memory
    assert checksum_of(Path(created["path"]).read_bytes()) in spy.snapshots()


class HoldCompaction:
    """Holds the background compaction's encode until released (no sleep: Events)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        real = _statefile.encode

        def encode(*a: Any, **kw: Any) -> Any:
            if _compacting():
                self.reached.set()
                assert self.release.wait(60)
            return real(*a, **kw)

        monkeypatch.setattr(_statefile, "encode", encode)


def test_interval_shorter_than_a_compaction_starts_one_compaction_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2: with backup_interval far shorter than the compaction it waits for, the service keeps asking
    while it runs but starts no second one; once it is durable its snapshot is the backup."""
    m, _cfg = _start(tmp_path, "sync", backup_interval=0.001, compaction="thread")  # held in-process
    try:
        hold = HoldCompaction(monkeypatch)
        asks: list[str] = []
        asked = threading.Event()
        real_ask = ManagerFiles.request_compaction

        def ask(files: ManagerFiles) -> Any:
            got = real_ask(files)
            asks.append(got.state)
            if len([a for a in asks if a != "refused"]) >= 4:  # refused: while the spare segment is prepared
                asked.set()
            return got

        monkeypatch.setattr(ManagerFiles, "request_compaction", ask)
        rotations: list[int] = []
        real_rotate = m._rotate_journal

        def rotate() -> None:
            rotations.append(1)
            real_rotate()

        monkeypatch.setattr(m, "_rotate_journal", rotate)
        base = m.generation
        watch = Watch(m)
        m.set_position(pos(0, 5))
        assert hold.reached.wait(60)
        job = m._bg_job
        assert job is not None
        for s in range(1, 4):
            m.set_position(pos(s, 5))
        assert asked.wait(60), asks
        after = [a for a in asks if a != "refused"]  # refused only until the spare segment is ready (issue 14.3)
        assert len(rotations) == 1 and after[0] == "started" and set(after[1:]) == {"pending"}, asks
        assert watch.created_after(base) == []
        hold.release.set()
        assert watch.wait(lambda ev: bool(watch.created_after(base))), watch.events
        assert m.wait_for_backups(30)
    finally:
        hold.release.set()
        m.close()
    assert watch.created_after(base)[0]["generation"] == job.generation


def test_close_while_the_asked_compaction_is_pending_takes_the_close_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2: close() while the compaction a timed backup waits for is still running: the close backup of
    the acknowledged state is taken (issue 15.2), nothing is named after close() returned, and every change loads."""
    m, cfg = _start(tmp_path, "sync", compaction="thread")  # held in-process
    monkeypatch.setattr(m, "_close_wait", 0.2)
    hold = HoldCompaction(monkeypatch)
    watch = Watch(m)
    try:
        for s in range(3):
            m.set_position(pos(s, 5))
        assert hold.reached.wait(60)
        m.set_position(pos(3, 5))
        want = m.get_positions()
        m.close()
        after_close = sorted(os.listdir(cfg.backup_path))
    finally:
        hold.release.set()
        m.close()
    thread = m._bg_thread
    if thread is not None:
        thread.join(60)
    closing = [e for e in watch.events if e["event"] == "backupCreated" and e.get("operation") == "close"]
    assert len(closing) == 1, watch.events
    assert [e for e in watch.events if e["event"] == "backupFailed"] == []
    loaded = _statefile.read(Path(closing[0]["path"]), options=_statefile.ReadOptions(keyring=m._keyring), what="backup")
    assert loaded.state.positions == want
    assert sorted(os.listdir(cfg.backup_path)) == after_close
    with PositionStateManager(cfg, key=KEY) as again:
        assert again.load_positions() == want


# ------------------------------------------------------------------------------------------ SIGKILL

_CHILD = """
import sys
from decimal import Decimal
from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.selftest.harness import Fault, HarnessOps, MUTATING_AND_READS
from posstate.storage import fileops as fs

d, at, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = StateConfig.in_dir(d, backup_interval=1e9, durability="sync", journal_max_records=1_000_000)
m = PositionStateManager(cfg, key=bytes(range(32)))
m.load_positions()
for i in range(3):  # acknowledged (journal only) before the timed backup begins
    m.set_position(Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(50 + i), entry_price=Decimal("10.5")))
fault = None if at == 0 else Fault(at=at, action="crash_" + when, ops=MUTATING_AND_READS)
ops = HarnessOps(fault=fault, ignore_threads=frozenset())
with fs.use(ops):
    m._files.last_backup_at = float("-inf")
    assert _background.service(m._files).request()
    assert m.wait_for_backups(60)  # the compaction it asks for, then the copy of its snapshot
print(sum(1 for op in ops.ops if op.name in MUTATING_AND_READS), flush=True)
"""


def test_sigkill_at_every_operation_of_a_timed_backup_through_a_compaction(tmp_path: Path) -> None:
    """issue 14.2: a child killed (SIGKILL) before and after each operation of a journal-mode timed backup (the
    compaction it asks for, then the copy of its snapshot) loads every acknowledged change, lists no backup
    that does not validate fully, and the next backup sweeps a killed one's temp."""
    import shutil
    import signal
    import subprocess
    import sys

    from posstate.selftest.harness import copy_tree

    root = Path(__file__).resolve().parents[1]
    seed = tmp_path / "seed"
    with PositionStateManager(StateConfig.in_dir(seed, durability="sync", backup_interval=1e9), key=KEY) as m:
        m.save_positions([pos(i) for i in range(20)])
        m.create_backup()
    env = dict(os.environ, PYTHONPATH=str(root))
    probe = tmp_path / "probe"
    copy_tree(seed, probe)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(probe), "0", "before"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.strip())
    assert total > 10
    assert len(os.listdir(probe / "backups")) == 2  # the child's own copy was taken
    for k in range(1, total + 1):
        for when in ("before", "after"):
            d = tmp_path / f"k{k}{when}"
            copy_tree(seed, d)
            run = subprocess.run([sys.executable, "-c", _CHILD, str(d), str(k), when], env=env, capture_output=True)
            assert run.returncode == -signal.SIGKILL, (k, when, run.stderr)
            with PositionStateManager(StateConfig.in_dir(d, durability="sync", backup_interval=1e9), key=KEY) as m:
                got = m.load_positions()
                assert [int(got[pos(i).key].contracts) for i in range(3)] == [50, 51, 52], (k, when)
                listed = m.list_backups()
                assert len(listed) in (1, 2) and all(b.valid and m.validate_backup(b.id).valid for b in listed), (k, when)
                m.create_backup()  # the next backup sweeps a killed one's temp
            assert not [n for n in os.listdir(d / "backups") if n.startswith(".")], (k, when)
            shutil.rmtree(d)


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_a_timed_backups_rotation_starts_its_segment_in_a_prepared_spare(tmp_path: Path, durability: str) -> None:
    """issue 14.2 + 14.3: the rotation a due timed backup asks for (on a journal far below its thresholds, so
    no spare was prepared yet) waits for the spare segment: the bot's change that starts the new segment does
    no file creation and no directory fsync on the bot's thread."""
    m, _cfg = _start(tmp_path, durability)
    try:
        m.set_position(pos(0, 5))  # after a save the journal's own file is created by the first record
        base = m.generation
        watch = Watch(m)
        ops = HarnessOps(thread_prefix="MainThread")
        with fs.use(ops):
            for s in range(1, 20_000):
                m.set_position(pos(s % N, 5 + s // N))
                if watch.created_after(base):
                    break
        assert watch.created_after(base), watch.events
        assert m.wait_for_backups(30)
    finally:
        m.close()
    names = [op.name for op in ops.ops]
    assert "fsync_dir" not in names and "replace" not in names, names[:40]
