"""Issue 14.3 for the explicit calls: create_backup() and prune_old_backups() in the journal modes hold the
manager's lock only to check it is open; the O(state) part (fold, copy and verify, full checks of backups)
runs without it, and close() waits for them through the operation gate (posstate/manager/opgate.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import ManagerClosedError, PersistenceError, Position, PositionStateManager, StateConfig
from posstate.backup import prune as _prune
from posstate.backup import snapcopy as _snapcopy
from posstate.core.errors import TransactionError
from posstate.selftest.harness import Fault, HarnessOps
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

KEY = bytes(range(32))
WAIT = 60.0  # a bound for a thread that would deadlock, never a measured time


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def make(d: Path, **kw: Any) -> PositionStateManager:
    kw.setdefault("durability", "sync")
    kw.setdefault("journal_max_records", 1000)
    kw.setdefault("compaction", "thread")
    return PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, **kw), key=KEY)


def backup_symbols(m: PositionStateManager, path: Path) -> set[str]:
    return {k[0] for k in _statefile.read(path, options=m._read, what="backup").state.positions}


class Held:
    """Wraps a module function: the call on the operation's thread stops inside it until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        original: Callable[..., Any] = getattr(module, name)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.release.wait(WAIT)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, held)


def in_thread(fn: Callable[[], Any], name: str | None = None) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True, name=name)
    t.start()
    return t, out


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[..., PositionStateManager]]:
    made: list[PositionStateManager] = []

    def opener(**kw: Any) -> PositionStateManager:
        m = make(tmp_path, **kw)
        made.append(m)
        return m

    yield opener
    for m in made:
        m.close()


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_a_writer_changes_the_state_while_an_explicit_backup_copies_it(
    opened: Callable[..., PositionStateManager], monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    m = opened(durability=durability)
    m.set_position(pos("A", 1))
    held = Held(monkeypatch, _snapcopy, "copy_state_file")
    backup, result = in_thread(m.create_backup)
    assert held.entered.wait(WAIT)
    writer, done = in_thread(lambda: m.set_position(pos("B", 2)))
    writer.join(WAIT)
    assert not writer.is_alive() and not isinstance(done[0], BaseException)  # it did not wait for the copy
    held.release.set()
    backup.join(WAIT)
    (info,) = result
    assert "A" in backup_symbols(m, info.path)  # every change acknowledged before the call


@pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
def test_a_writer_changes_the_state_while_an_explicit_prune_checks_backups(
    opened: Callable[..., PositionStateManager], monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    m = opened(durability=durability)
    m.set_position(pos("A", 1))
    m.save()
    m.create_backup()
    held = Held(monkeypatch, _prune, "check_all")
    prune, result = in_thread(m.prune_old_backups)
    assert held.entered.wait(WAIT)
    writer, done = in_thread(lambda: m.set_position(pos("B", 2)))
    writer.join(WAIT)
    assert not writer.is_alive() and not isinstance(done[0], BaseException)
    held.release.set()
    prune.join(WAIT)
    assert not isinstance(result[0], BaseException)


def test_close_waits_for_an_explicit_backup_running_on_another_thread_and_refuses_new_ones(
    opened: Callable[..., PositionStateManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = opened()
    m.set_position(pos("A", 1))
    held = Held(monkeypatch, _snapcopy, "copy_state_file")
    order: list[str] = []
    backup, result = in_thread(lambda: (m.create_backup(), order.append("backup"))[0])
    assert held.entered.wait(WAIT)
    closer, _ = in_thread(lambda: (m.close(), order.append("close")))
    gate = m._ops
    for _ in range(int(WAIT * 100)):  # until close() waits at the gate (or, wrongly, has returned)
        if gate.waiting or not closer.is_alive():
            break
        threading.Event().wait(0.01)
    assert gate.waiting and closer.is_alive() and order == []
    with pytest.raises(ManagerClosedError):
        m.prune_old_backups()  # refused once close() began
    with pytest.raises(ManagerClosedError):
        m.create_backup()
    held.release.set()
    backup.join(WAIT)
    closer.join(WAIT)
    assert order == ["backup", "close"]  # the writer lock was released only after the backup was named
    assert result[0].path.exists()


def test_the_backup_holds_changes_made_after_a_pending_compaction_rotated(
    opened: Callable[..., PositionStateManager],
) -> None:
    m = opened(journal_max_records=5)
    failed = threading.Event()
    m.on("error", lambda e: failed.set())
    real = m._write_main
    calls = {"n": 0}

    def once(*a: Any, **k: Any) -> None:
        if threading.current_thread().name.startswith("posstate-compact"):
            calls["n"] += 1
        if calls["n"] == 1:
            calls["n"] += 1
            raise OSError(5, "injected: the compaction's write fails once")
        real(*a, **k)

    m._write_main = once  # type: ignore[method-assign]
    for i in range(6):
        m.set_position(pos(f"S{i}", i + 1))  # the fifth record rotates: a background compaction, which fails
    assert failed.wait(WAIT)
    m.set_position(pos("LATE", 9))  # after the pending compaction's rotation, before the backup
    info = m.create_backup()
    assert {"S0", "S5", "LATE"} <= backup_symbols(m, info.path)


def test_a_compaction_that_keeps_failing_fails_the_explicit_backup_and_writers_go_on(
    opened: Callable[..., PositionStateManager],
) -> None:
    m = opened()
    m.set_position(pos("A", 1))
    failures: list[dict[str, Any]] = []
    m.on("backupFailed", failures.append)
    assert m.wait_for_backups(WAIT)  # the first save's backup
    before = sorted(m.config.backup_path.glob("positions_*.json"))
    with fs.use(HarnessOps(fault=Fault(at=1, ops=frozenset({"replace"}), persistent=True), thread_prefix="posstate-compact")):
        with pytest.raises(PersistenceError) as caught:
            m.create_backup()
        m.set_position(pos("B", 2))  # the journal holds it; nothing is lost
    assert "is retried" in str(caught.value) or "save again" in str(caught.value)
    assert failures and sorted(m.config.backup_path.glob("positions_*.json")) == before
    assert set(m.get_positions()) == {("A", "long"), ("B", "long")}
    assert backup_symbols(m, m.create_backup().path) == {"A", "B"}  # the disk is back


def test_an_older_state_file_put_there_behind_the_lock_is_not_backed_up(
    opened: Callable[..., PositionStateManager], caplog: pytest.LogCaptureFixture
) -> None:
    m = opened()
    m.set_position(pos("A", 1))
    m.save()
    old = m.path.read_bytes()
    m.set_position(pos("B", 2))
    m.save()
    m.path.write_bytes(old)  # a genuine older copy: it decrypts and validates
    info = m.create_backup()
    assert backup_symbols(m, info.path) == {"A", "B"}  # the acknowledged state in memory, not the older file
    assert "does not verify" in caplog.text


def test_inside_a_transaction_the_explicit_backup_is_refused(opened: Callable[..., PositionStateManager]) -> None:
    m = opened()
    m.set_position(pos("A", 1))
    with pytest.raises(TransactionError), m.transaction():
        m.create_backup()


def test_from_a_handler_of_a_locked_save_the_backup_is_taken_under_that_lock(
    opened: Callable[..., PositionStateManager],
) -> None:
    m = opened()
    m.set_position(pos("A", 1))
    taken: list[Any] = []
    m.on("stateSaved", lambda e: taken.append(m.create_backup()) if not taken else None)
    m.set_position(pos("B", 2))
    m.save()
    assert taken and backup_symbols(m, taken[0].path) == {"A", "B"}


def test_from_a_handler_of_a_background_compaction_the_backup_still_holds_every_change(
    opened: Callable[..., PositionStateManager],
) -> None:
    m = opened(journal_max_records=3)
    taken: list[Any] = []
    done = threading.Event()

    def on_saved(e: dict[str, Any]) -> None:
        if e.get("background") and not taken:
            try:
                taken.append(m.create_backup())
            finally:
                done.set()

    m.on("stateSaved", on_saved)
    for i in range(4):
        m.set_position(pos(f"S{i}", i + 1))
    assert done.wait(WAIT)
    assert {"S0", "S1", "S2"} <= backup_symbols(m, taken[0].path)


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_restoring_a_timed_backup_of_a_background_compaction_is_not_taken_for_a_wrong_clock(
    tmp_path: Path, durability: str
) -> None:
    """Memory's written_at dates the last save or load only: a background compaction's snapshot is newer, and
    a change journaled since moves memory's generation on. Pairing the two made a timed backup of that
    snapshot look older than a save of a higher generation dated before it (StaleBackupError, clock wrong)."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=0, durability=durability, compaction="thread")
    with PositionStateManager(cfg, key=KEY) as m:
        m.set_position(pos("A", 1))
        assert m.compact(wait=True)  # in the background: its snapshot, dated now, gets a timed backup
        assert m.wait_for_backups(WAIT)
        newest = m.list_backups()[0]
        m.set_position(pos("B", 2))
        m.restore_from_backup(newest.id)
        assert {k[0] for k in m.get_positions()} == {"A"}
