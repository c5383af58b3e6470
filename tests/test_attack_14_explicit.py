"""Attacks on issue 14.3's explicit create_backup()/prune_old_backups() outside the manager's lock: deadlocks
with event handlers and close(), a snapshot written under the lock in group mode, an older state file planted
before the compaction's snapshot was noted, a prune after close() released the writer lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import KEY, Held, backup_symbols, in_thread, make, pos
from test_lock_order import WatchedRLock, until

from posstate import ManagerClosedError, PersistenceError, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import prune as _prune
from posstate.backup import snapcopy as _snapcopy
from posstate.core.errors import OutcomeUnknownError, TransactionError
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

WAIT = 30.0  # a bound for a thread that would deadlock, never a measured time


class HoldOn:
    """Wraps a method of *obj*'s class: its first call on the thread named *thread* stops until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, obj: Any, name: str, thread: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        original: Callable[..., Any] = getattr(type(obj), name)

        def held(this: Any, *args: Any, **kwargs: Any) -> Any:
            if this is obj and threading.current_thread().name == thread:
                self.calls += 1
                if self.calls == 1:
                    self.entered.set()
                    assert self.release.wait(WAIT)
            return original(this, *args, **kwargs)

        monkeypatch.setattr(type(obj), name, held)


@pytest.mark.parametrize("handler_call", ["create_backup", "close"])
def test_a_handler_on_the_compaction_thread_does_not_deadlock_with_a_backup_waiting_for_a_compaction(
    tmp_path: Path, handler_call: str
) -> None:
    m = make(tmp_path)
    m._close_wait = WAIT * 4  # type: ignore[misc]  # close() must not wait for a compaction only its own thread runs
    m.set_position(pos("A", 1))
    in_handler, go, handler_done = threading.Event(), threading.Event(), threading.Event()
    got: list[Any] = []

    def on_saved(e: dict[str, Any]) -> None:
        if e.get("background") and not in_handler.is_set():
            in_handler.set()
            assert go.wait(WAIT)
            try:
                got.append(getattr(m, handler_call)())
            except BaseException as exc:
                got.append(exc)
            finally:
                handler_done.set()

    m.on("stateSaved", on_saved)
    m.compact(wait=False)  # its stateSaved handler, on the compaction thread, waits for go
    assert in_handler.wait(WAIT)
    m.set_position(pos("B", 2))  # after that rotation: the explicit backup needs a compaction of its own
    backup, result = in_thread(m.create_backup)
    assert until(lambda: m._bg_job is not None or not backup.is_alive())  # it waits for that compaction
    go.set()
    assert handler_done.wait(WAIT)
    backup.join(WAIT)
    assert not backup.is_alive(), "the explicit backup and the compaction thread's handler deadlocked"
    if handler_call == "create_backup":
        assert backup_symbols(m, got[0].path) >= {"A"}
        assert backup_symbols(m, result[0].path) == {"A", "B"}
        m.close()
    else:
        assert m.closed and got == [None]
        assert isinstance(result[0], ManagerClosedError) or backup_symbols(m, result[0].path) == {"A", "B"}


def test_close_from_a_handler_of_a_locked_save_does_not_deadlock_with_an_explicit_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    hold = HoldOn(monkeypatch, m._journal, "drain", thread="explicit-backup")
    backup, result = in_thread(m.create_backup, name="explicit-backup")
    assert hold.entered.wait(WAIT)  # folding the journal before its backup
    m.on("stateSaved", lambda e: m.close() if not e.get("background") else None)
    m.set_position(pos("B", 2))
    closer, _ = in_thread(m.save)  # its stateSaved handler closes, the manager's lock held
    assert until(lambda: m._ops.waiting > 0 or not closer.is_alive())
    hold.release.set()
    closer.join(WAIT)
    backup.join(WAIT)
    assert not closer.is_alive() and not backup.is_alive(), "close() under the lock and the backup deadlocked"
    assert m.closed
    assert isinstance(result[0], ManagerClosedError) or backup_symbols(m, result[0].path) >= {"A"}


@pytest.mark.parametrize("where", ["handler of a locked save", "transaction"])
def test_a_lock_holder_asking_for_a_backup_does_not_deadlock_with_an_explicit_backup_folding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    hold = HoldOn(monkeypatch, m._journal, "drain", thread="explicit-backup")
    backup, result = in_thread(m.create_backup, name="explicit-backup")
    assert hold.entered.wait(WAIT)
    asked = threading.Event()
    got: list[Any] = []

    def ask() -> None:
        asked.set()
        try:
            got.append(m.create_backup())
        except BaseException as exc:
            got.append(exc)

    if where == "transaction":

        def in_txn() -> None:
            with m.transaction():
                ask()

        other, _ = in_thread(in_txn)
    else:
        m.on("stateSaved", lambda e: ask() if not e.get("background") and not asked.is_set() else None)
        m.set_position(pos("B", 2))
        other, _ = in_thread(m.save)
    assert asked.wait(WAIT)
    hold.release.set()
    other.join(WAIT)
    backup.join(WAIT)
    assert not other.is_alive() and not backup.is_alive(), "the lock holder and the explicit backup deadlocked"
    if where == "transaction":
        assert isinstance(got[0], TransactionError)
    else:
        assert backup_symbols(m, got[0].path) == {"A", "B"}
    assert "A" in backup_symbols(m, result[0].path)
    m.close()


def test_group_mode_explicit_backup_writes_no_snapshot_under_the_managers_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make(tmp_path, durability="group")
    m.set_position(pos("A", 1))
    under_lock: list[str] = []
    real_commit = m._commit

    def spy(st: Any, entries: Any) -> int:
        if m._lock._is_owned():  # type: ignore[attr-defined]
            under_lock.append(threading.current_thread().name)
        return real_commit(st, entries)

    m._commit = spy  # type: ignore[method-assign]
    writer_syncing, writer_go = threading.Event(), threading.Event()
    real_sync = fs.fdatasync

    def sync(fd: int) -> None:
        if threading.current_thread().name == "writer":
            writer_syncing.set()
            assert writer_go.wait(WAIT)
        real_sync(fd)

    monkeypatch.setattr(fs, "fdatasync", sync)
    journal = m._journal
    real_drain = type(journal).drain
    drains = {"n": 0}
    second = threading.Event()
    writers: list[threading.Thread] = []

    def drain(this: Any) -> None:
        if this is journal and threading.current_thread().name == "explicit-backup":
            drains["n"] += 1
            if drains["n"] >= 2:
                second.set()
            real_drain(this)
            if drains["n"] == 1:  # a writer appends now, and its group sync is under way
                writers.append(in_thread(lambda: m.set_position(pos("W", 3)), name="writer")[0])
                assert writer_syncing.wait(WAIT)
            return
        real_drain(this)

    monkeypatch.setattr(type(journal), "drain", drain)
    backup, result = in_thread(m.create_backup, name="explicit-backup")
    assert until(lambda: bool(under_lock) or second.is_set() or not backup.is_alive())
    writer_go.set()
    backup.join(WAIT)
    writers[0].join(WAIT)
    assert not backup.is_alive() and not isinstance(result[0], BaseException), result
    assert "explicit-backup" not in under_lock, "the explicit backup wrote a snapshot holding the manager's lock"
    assert "A" in backup_symbols(m, result[0].path)
    m.close()


@pytest.mark.parametrize("compaction", ["thread", "process"])
def test_an_older_state_file_planted_before_the_compactions_snapshot_is_noted_is_not_backed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compaction: str
) -> None:
    m = make(tmp_path, compaction=compaction)
    m.set_position(pos("A", 1))
    m.save()
    old = m.path.read_bytes()  # a genuine older copy: it decrypts and validates
    m.set_position(pos("B", 2))  # acknowledged before the backup is asked for
    noted = threading.Event()
    real_after = m._after_save

    def late(st: Any) -> None:  # the compaction thread notes its snapshot only after the backup's copy
        if threading.current_thread() is m._bg_thread:
            noted.wait(WAIT)
        real_after(st)

    m._after_save = late  # type: ignore[method-assign]
    real_copy = _snapcopy.copy_state_file

    def planted(*a: Any, **k: Any) -> Any:
        m.path.write_bytes(old)  # an attacker without the key, in the unlocked window
        return real_copy(*a, **k)

    monkeypatch.setattr(_snapcopy, "copy_state_file", planted)
    try:
        info = m.create_backup()
    finally:
        noted.set()
    monkeypatch.setattr(_snapcopy, "copy_state_file", real_copy)
    assert backup_symbols(m, info.path) == {"A", "B"}, "the backup misses a change acknowledged before the call"
    m.close()


@pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
def test_close_from_a_backup_created_handler_prunes_nothing_after_the_writer_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    m = make(tmp_path, durability=durability)
    m.set_position(pos("A", 1))
    m.save()
    assert m.wait_for_backups(WAIT)
    closed_at_prune: list[bool] = []
    real = _prune.prune_backups

    def spy(files: Any, **kw: Any) -> Any:
        closed_at_prune.append(m.closed)
        return real(files, **kw)

    monkeypatch.setattr(_prune, "prune_backups", spy)
    m.on("backupCreated", lambda e: m.close() if not e.get("background") else None)
    info = m.create_backup()
    assert m.closed and info.path.exists()
    assert True not in closed_at_prune, "a prune ran after close() released the writer lock"


def test_a_snapshot_whose_outcome_is_unknown_is_not_backed_up_by_an_explicit_backup_running_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    hold = Held(monkeypatch, _snapcopy, "copy_state_file")
    entered, release = hold.entered, hold.release
    backup, result = in_thread(m.create_backup, name="explicit-backup")
    assert entered.wait(WAIT)  # the journal folded, the state file not read yet
    real_commit = _atomic.commit

    def renamed_then_failed(tmp: Path, target: Path) -> None:
        if threading.current_thread().name != "saver":
            real_commit(tmp, target)
            return
        fs.replace(tmp, target)
        raise _atomic.WriteFailed("fsync_dir", OSError(5, "injected: the directory fsync fails"), renamed=True)

    monkeypatch.setattr(_atomic, "commit", renamed_then_failed)
    saver, saved = in_thread(lambda: m.save_positions([pos("X", 7)]), name="saver")
    saver.join(WAIT)
    assert isinstance(saved[0], PersistenceError) and saved[0].outcome_unknown  # the bot was told: unknown
    release.set()
    backup.join(WAIT)
    assert not backup.is_alive()
    if not isinstance(result[0], OutcomeUnknownError):  # refused, as a call after the failure is
        assert backup_symbols(m, result[0].path) == {"A"}, "the backup holds a change whose outcome is unknown"
    m.close()


def test_close_under_the_lock_waits_for_a_backup_past_the_gate_and_the_backup_names_nothing_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    hold = Held(monkeypatch, _snapcopy, "copy_state_file")
    entered, release = hold.entered, hold.release
    backup, result = in_thread(m.create_backup, name="explicit-backup")
    assert entered.wait(WAIT)  # past the gate, the backup folder held
    named: list[dict[str, Any]] = []
    m.on("backupCreated", lambda e: named.append(e) if e.get("operation") != "close" else None)
    m.on("stateSaved", lambda e: m.close() if not e.get("background") else None)
    m.set_position(pos("B", 2))
    closer, _ = in_thread(m.save)  # its stateSaved handler closes, the manager's lock held
    assert until(lambda: m._ops.waiting > 0 or not closer.is_alive())
    assert closer.is_alive()  # close() waits for the backup past the gate
    release.set()
    backup.join(WAIT)
    closer.join(WAIT)
    assert not closer.is_alive() and not backup.is_alive()
    assert m.closed
    if isinstance(result[0], BaseException):  # it could not confirm its copy under the lock close() held
        assert isinstance(result[0], ManagerClosedError) and named == []
    else:
        assert "A" in backup_symbols(m, result[0].path)


def test_a_backup_from_a_background_backups_handler_does_not_wait_for_a_compaction_holding_the_folder(
    tmp_path: Path,
) -> None:
    m = PositionStateManager(
        StateConfig.in_dir(tmp_path, backup_interval=0, durability="sync", journal_max_records=1000, compaction="thread"),
        key=KEY,
    )
    folder = WatchedRLock()
    _background.service(m._files).folder_lock = folder  # type: ignore[assignment]
    m.set_position(pos("A", 1))
    assert m.wait_for_backups(WAIT)  # the first load's backup
    h1_in, h1_go, h2_in = threading.Event(), threading.Event(), threading.Event()
    got: dict[str, Any] = {}

    def call(name: str) -> None:
        try:
            got[name] = m.create_backup()
        except BaseException as exc:
            got[name] = exc

    def on_backup(e: dict[str, Any]) -> None:  # on the backup thread (the folder held before session 15)
        if e.get("background") and not h1_in.is_set():
            h1_in.set()
            assert h1_go.wait(WAIT)
            call("backup thread")

    def on_saved(e: dict[str, Any]) -> None:  # on the compaction thread
        if e.get("background") and not h2_in.is_set():
            h2_in.set()
            call("compaction thread")

    m.on("backupCreated", on_backup)
    m.save()  # backup_interval=0: a background backup of this snapshot; its handler waits
    assert h1_in.wait(WAIT)
    m.on("stateSaved", on_saved)
    m.set_position(pos("B", 2))
    m.compact(wait=False)  # its stateSaved handler asks for a backup: it waits for the folder
    assert h2_in.wait(WAIT)
    # Since session 15 the backup thread's handlers run once it released the folder (tests/test_lock_order.py):
    # the compaction thread's backup is taken while that handler still waits.
    assert until(lambda: "compaction thread" in got or any(n.startswith("posstate-compact") for n in folder.waiting))
    assert "compaction thread" in got, folder.waiting
    m.set_position(pos("C", 3))  # after that rotation: a backup asked for now needs a compaction of its own
    h1_go.set()
    assert until(lambda: len(got) == 2)
    assert len(got) == 2, "the backup thread's handler and the compaction thread's handler deadlocked"
    assert backup_symbols(m, got["backup thread"].path) == {"A", "B", "C"}
    assert {"A", "B"} <= backup_symbols(m, got["compaction thread"].path)
    m.close()
