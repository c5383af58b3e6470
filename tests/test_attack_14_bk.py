"""Issue 14.2 attack (session 7): the timed backup that asks for a background compaction and copies its
snapshot, attacked with busy group writers, a bot holding the manager's lock, and a planted state file."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import acked as _acked
from posstate.backup import background as _background
from posstate.backup import viacompaction as _via
from posstate.manager import files as _mfiles
from posstate.manager.files import ManagerFiles
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _open(tmp_path: Path, durability: str, **kw: Any) -> tuple[PositionStateManager, StateConfig]:
    kw.setdefault("backup_interval", 1e9)
    kw.setdefault("journal_max_records", 1_000_000)  # no threshold compaction
    kw.setdefault("compaction", "thread")  # these attacks hold or count the in-process encode
    cfg = StateConfig.in_dir(tmp_path, durability=durability, **kw)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(50)])
    assert m.wait_for_backups(30)
    return m, cfg


class SlowSync(fs.FileOps):
    """A disk whose fdatasync takes a few milliseconds (a real disk's latency; tmpfs has none), so group
    writers always append while a sync is in flight."""

    def fdatasync(self, fd: int) -> None:
        threading.Event().wait(0.002)
        super().fdatasync(fd)


class Writers:
    """Threads calling set_position until stopped (each writes its own keys)."""

    def __init__(self, m: PositionStateManager, n: int, limit: int = 2_000) -> None:
        self.stop = threading.Event()
        self.limit = limit
        self.count = 0
        self._m = m
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(n)]
        self.written = threading.Event()

    def _run(self, t: int) -> None:
        c = 2
        while not self.stop.is_set() and c < self.limit:
            self._m.set_position(pos(t, c))
            c += 1
            self.count += 1
            if self.count > 50:
                self.written.set()

    def __enter__(self) -> Writers:
        for th in self.threads:
            th.start()
        assert self.written.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(60)


def test_drain_returns_while_group_writers_keep_writing(tmp_path: Path) -> None:
    """issue 14.2 attack: Journal.drain() (the timed backup's ask syncs waiting records with it) makes the
    records written before the call durable and returns; it used to chase every record written after it too,
    so with busy group writers it never returned and no timed backup was taken while the bot was busy."""
    m, _cfg = _open(tmp_path, "group")
    try:
        with fs.use(SlowSync()), Writers(m, 4) as w:
            done = threading.Event()
            before: list[int] = []

            def drain() -> None:
                before.append(m._journal._written_seq)
                m._journal.drain()
                assert m._journal._durable_seq >= before[0]
                before.append(w.count)
                done.set()

            th = threading.Thread(target=drain)
            th.start()
            # The writers stop when drain returned, or after 2,000 changes each (the old livelock).
            assert done.wait(60)
            # Records written before the call need one or two syncs (a few changes each); the old drain
            # returned only when it happened to see no record waiting: thousands of changes later, or never.
            assert before[1] < 500, f"drain() returned only after {before[1]} of the writers' 8,000 changes"
        th.join(60)
    finally:
        m.close()


class Events:
    """backupCreated / backupFailed events, waited for with a condition."""

    def __init__(self, m: PositionStateManager) -> None:
        self.seen: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        m.on("backupCreated", self._add)
        m.on("backupFailed", self._add)

    def _add(self, e: dict[str, Any]) -> None:
        with self._cond:
            self.seen.append(e)
            self._cond.notify_all()

    def wait(self, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.seen), timeout)


def _due_now(m: PositionStateManager) -> None:
    """A timed backup falls due now and the backup thread's timer looks at once (backup_interval passed)."""
    svc = _background.service(m._files)
    with svc._cond:
        m._files.last_backup_at = float("-inf")
        svc._timer_at = float("-inf")
        svc._cond.notify_all()


def _memory_backups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads that took a backup of memory (the fallback; the close backup runs on close()'s thread)."""
    threads: list[str] = []
    real = _acked.from_memory

    def from_memory(*a: Any, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(_acked, "from_memory", from_memory)
    return threads


def test_busy_group_writers_rotate_for_a_timed_backup_instead_of_the_memory_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack: with group writers always busy, the backup thread's own rotation finds records waiting
    for their sync at every ask (82 refusals in a row measured with 4 writers and a 5 ms fdatasync); the ask now
    leaves the rotation to the writers' next change (O(1), under the lock they hold anyway), so the backup is the
    copy of a compaction's snapshot and the O(state) backup of memory never runs in normal operation."""
    monkeypatch.setattr(_via, "REFUSED_LIMIT", 5)
    m, _cfg = _open(tmp_path, "group", backup_interval=60.0)
    memory = _memory_backups(monkeypatch)
    real_rotate = m._journal.rotate

    def rotate(generation: int) -> Any:
        if threading.current_thread().name == "posstate-backup":
            return None  # records of a writer always wait for their sync when the backup thread asks
        return real_rotate(generation)

    monkeypatch.setattr(m._journal, "rotate", rotate)
    events = Events(m)
    try:
        with Writers(m, 2, limit=10**9):
            _due_now(m)
            assert events.wait(), "no timed backup while the writers ran"
        assert m.wait_for_backups(30)
    finally:
        m.close()
    first = events.seen[0]
    assert first["event"] == "backupCreated" and first.get("background") and "acknowledged" not in first, events.seen
    assert "posstate-backup" not in memory


def test_a_bot_holding_the_manager_lock_never_waits_for_the_backup_threads_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack: the timed backup's ask ran under the backup folder's lock and waited (up to 2 s) for the
    manager's lock; a bot holding that lock (a transaction, an event handler of a save) that then called
    prune_old_backups() or create_backup() (folder lock first) waited for it. The ask no longer waits for the
    manager's lock: a busy manager rotates at its next change."""
    monkeypatch.setattr(_mfiles, "_LOCK_WAIT", 120.0)  # the old wait, long enough to tell from a deadlock-free ask
    m, _cfg = _open(tmp_path, "sync", backup_interval=60.0)
    m.set_position(pos(1, 7))  # memory ahead of the durable snapshot: a due timed backup asks for a compaction
    asked = threading.Event()
    real_ask = ManagerFiles.request_compaction

    def ask(files: ManagerFiles) -> Any:
        asked.set()
        return real_ask(files)

    monkeypatch.setattr(ManagerFiles, "request_compaction", ask)
    done = threading.Event()
    failed: list[BaseException] = []

    def bot() -> None:
        try:
            with m.transaction():
                m.set_position(pos(2, 7))
                _due_now(m)
                assert asked.wait(60)  # the backup thread holds the folder lock and asks
                m.prune_old_backups(dry_run=True)  # the folder lock, then the manager's (held here)
                done.set()
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    th = threading.Thread(target=bot)
    th.start()
    try:
        ok = done.wait(30)
    finally:
        th.join(180)
        m.close()
    assert not failed, failed
    assert ok, "the bot waited for the backup thread's ask while holding the manager's lock"


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_a_timed_backup_never_copies_an_older_state_file_planted_after_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14.2 attack: an attacker without the key puts an older genuine state file (a copy kept from
    earlier, or an old backup) in place of the snapshot a compaction made durable; the timed backup copied it
    (it decrypts and validates) as the newest backup, so `backups restore latest` would bring the old state
    back. It is refused now (backupFailed naming the state file) and no backup of it is listed."""
    m, cfg = _open(tmp_path, durability)
    events = Events(m)
    try:
        old = cfg.state_path.read_bytes()
        old_generation = m.generation
        m.set_position(pos(1, 9))
        assert m.compact(wait=True)
        assert m.wait_for_backups(30)
        durable = _background.service(m._files)._durable_generation
        assert durable > old_generation
        before = {b.id for b in m.list_backups()}
        cfg.state_path.write_bytes(old)  # planted behind the writer lock
        _due_now(m)
        assert _background.service(m._files).request()
        assert events.wait()
        assert m.wait_for_backups(30)
        added = [b for b in m.list_backups() if b.id not in before]
    finally:
        m.close()
    assert [b.generation for b in added if b.generation == old_generation] == [], added
    failed = [e for e in events.seen if e["event"] == "backupFailed"]
    assert failed and str(cfg.state_path) in failed[0]["reason"], events.seen


def test_a_compaction_that_never_finishes_leaves_the_timed_backup_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack: the compaction a timed backup waits for hangs (a stuck disk under the state file, or
    a long job ahead of it for the background turn): before, no backup was taken and nothing said so, for ever
    (the backup of memory used to be taken regardless). Now the overdue backup is reported (backupFailed,
    operation "compaction") once max(backup_interval, STUCK_AFTER) has passed, and again each interval after."""
    monkeypatch.setattr(_via, "STUCK_AFTER", 0.2, raising=False)
    m, _cfg = _open(tmp_path, "sync", backup_interval=0.05)
    reached, release = threading.Event(), threading.Event()
    real_encode = _statefile.encode

    def encode(*a: Any, **kw: Any) -> Any:
        if threading.current_thread().name.startswith("posstate-compact"):
            reached.set()
            assert release.wait(120)
        return real_encode(*a, **kw)

    monkeypatch.setattr(_statefile, "encode", encode)
    events = Events(m)
    try:
        m.set_position(pos(1, 9))
        _due_now(m)
        assert reached.wait(60)  # the compaction the backup asked for hangs
        assert events.wait(30), "an overdue timed backup was never reported"
        failed = [e for e in events.seen if e["event"] == "backupFailed"]
        assert failed and failed[0]["operation"] == "compaction" and "not finished" in failed[0]["reason"], events.seen
        assert [e for e in events.seen if e["event"] == "backupCreated"] == []
    finally:
        release.set()
        m.close()


def test_backup_interval_zero_never_asks_for_a_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.2 attack: backup_interval=0 means a backup at every snapshot and no timer; a request folded into
    a backup that already copied the newest snapshot (memory ahead by then) made the thread ask for a
    compaction nobody needed, which could chain one compaction after another while the bot writes."""
    m, _cfg = _open(tmp_path, "sync", backup_interval=0.0)
    rotations: list[str] = []
    real_rotate = m._rotate_journal

    def rotate() -> None:
        rotations.append(threading.current_thread().name)
        real_rotate()

    monkeypatch.setattr(m, "_rotate_journal", rotate)
    try:
        m.set_position(pos(1, 9))  # memory ahead of the snapshot the last backup copied
        assert _background.service(m._files).request()  # e.g. a request folded into the running backup
        assert m.wait_for_backups(30)
        m.set_position(pos(2, 9))
        assert rotations == []
    finally:
        m.close()


def test_a_clock_stepped_back_never_passes_an_old_snapshot_off_as_fresh(tmp_path: Path) -> None:
    """issue 14.2 attack: a snapshot noted before the clock was stepped back looked "made durable after the
    backup fell due" (its time was later than the newest backup's, clamped to the new time), so the timed
    backup copied it instead of asking for a compaction: it lacked every change since. Now a snapshot noted
    in the future of the clock is not taken as fresh: the backup holds the changes made after the step."""
    m, _cfg = _open(tmp_path, "sync", backup_interval=100.0)
    svc = _background.service(m._files)
    now = [svc.clock()]
    svc.clock = lambda: now[0]
    events = Events(m)
    try:
        m._files.last_backup_at = now[0]
        m.set_position(pos(1, 9))
        assert m.compact(wait=True)  # durable at "now"; no backup due
        snapshot = svc._durable_generation
        now[0] -= 10_000.0  # the clock is stepped back
        m.set_position(pos(2, 9))  # acknowledged after the step
        assert not _background.due(m._files, now[0])  # the newest backup's time is clamped to the new clock
        with m._lock:  # the spare segment ready now: the ask is not refused for it (its retry needs the clock)
            m._journal.want_spare()
        assert m._journal.wait_spare(30) and m._journal.spare_ready
        now[0] += 101.0  # backup_interval passes on the new clock
        with svc._cond:
            svc._timer_at = float("-inf")
            svc._cond.notify_all()
        assert events.wait()
        assert m.wait_for_backups(30)
    finally:
        m.close()
    created = [e for e in events.seen if e["event"] == "backupCreated"]
    assert created and created[0]["generation"] > snapshot, events.seen


def test_compact_wait_from_a_background_stateSaved_handler_does_not_wait_for_itself(tmp_path: Path) -> None:
    """issue 14 attack: a stateSaved handler of a background compaction runs on the compaction's thread; if it
    called compact(wait=True) (no timeout), it waited for a snapshot that only its own thread could write: that
    thread hung for ever, and with it every later compaction and the timed backups waiting for one. It returns
    False now (started, not durable yet); the compaction it started runs once the handler returns."""
    m, _cfg = _open(tmp_path, "sync")
    got: list[object] = []
    done = threading.Event()

    def handler(e: dict[str, Any]) -> None:
        if e.get("background") and not got:
            m.set_position(pos(3, 11))  # something to compact again
            got.append(m.compact(wait=True))
            done.set()

    m.on("stateSaved", handler)
    try:
        m.set_position(pos(1, 9))
        assert m.compact(wait=False)
        assert done.wait(30), "compact(wait=True) from the compaction's own thread waited for itself"
        assert got == [False]
        assert m.compact(wait=True, timeout=30)  # the compaction the handler started ran
    finally:
        m.close()


def test_wait_for_backups_from_a_background_backup_handler_does_not_wait_for_itself(tmp_path: Path) -> None:
    """issue 14 attack: a backupCreated handler of a timed backup runs on the backup thread; wait_for_backups()
    (no timeout) there waited for that very thread to be idle: it hung for ever, and no timed backup was taken
    again. It returns False at once now (a backup is running: the caller's own)."""
    m, _cfg = _open(tmp_path, "sync", backup_interval=0.0)
    got: list[bool] = []
    done = threading.Event()

    def handler(e: dict[str, Any]) -> None:
        if e.get("background") and not got:
            got.append(m.wait_for_backups())
            done.set()

    m.on("backupCreated", handler)
    try:
        m.set_position(pos(1, 9))
        assert m.compact(wait=True)  # its snapshot is backed up at once (backup_interval 0)
        assert done.wait(30), "wait_for_backups() on the backup thread waited for itself"
        assert got == [False]
        assert m.wait_for_backups(30)
    finally:
        m.close()


def test_a_rotation_wanted_while_one_is_pending_starts_no_second_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack: a timed backup's ask that sets rotation_wanted just as a threshold's rotation starts
    (the ask found none pending a moment before) left the flag set while that compaction ran: every sync-mode
    change took the slow path, and once it finished the next change started a second, needless compaction.
    A pending rotation satisfies the wish now (its snapshot is newer than the one the backup waits past)."""
    m, _cfg = _open(tmp_path, "sync")
    reached, release = threading.Event(), threading.Event()
    real_encode = _statefile.encode

    def encode(*a: Any, **kw: Any) -> Any:
        if threading.current_thread().name.startswith("posstate-compact"):
            reached.set()
            assert release.wait(60)
        return real_encode(*a, **kw)

    monkeypatch.setattr(_statefile, "encode", encode)
    rotations: list[int] = []
    real_rotate = m._rotate_journal

    def rotate() -> None:
        rotations.append(1)
        real_rotate()

    monkeypatch.setattr(m, "_rotate_journal", rotate)
    try:
        m.set_position(pos(1, 9))
        assert m.compact(wait=False)
        assert reached.wait(60)
        job = m._bg_job
        assert job is not None
        m._journal.rotation_wanted = True  # the ask's flag lands while that rotation is pending
        m.set_position(pos(2, 9))
        release.set()
        assert job.done.wait(60)
        m.set_position(pos(3, 9))
        assert len(rotations) == 1, rotations
    finally:
        release.set()
        m.close()
