"""The manager's lock and the backup folder's lock are never waited for in a cycle.

A thread holding the manager's lock (a transaction, a handler of a locked call) may ask for an operation that
needs the backup folder (a prune, a restore). So no thread may wait for the manager's lock without a bound
while it holds the folder: not restore_from_backup(), attempt_recovery(), repair_state() or a "snapshot"
create_backup() (they take the folder first, then wait for the manager's lock without it), and not an event
handler of a timed backup (its events are emitted once the backup thread has released the folder)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import KEY, in_thread, make, pos

from posstate import PositionStateManager, StateConfig
from posstate.backup import background as _background

WAIT = 30.0  # a bound for a thread that would deadlock, never a measured time


def until(cond: Callable[[], bool]) -> bool:
    """Poll *cond* (a state another thread reaches) for at most WAIT seconds."""
    for _ in range(int(WAIT * 100)):
        if cond():
            return True
        threading.Event().wait(0.01)
    return cond()


class WatchedRLock:
    """An RLock that tells which threads are waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.waiting: set[str] = set()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        name = threading.current_thread().name
        self.waiting.add(name)
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            self.waiting.discard(name)

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def watched(m: PositionStateManager) -> tuple[WatchedRLock, WatchedRLock]:
    """Swap the manager's lock and the backup folder's lock for watched ones (before any thread uses them)."""
    lock, folder = WatchedRLock(), WatchedRLock()
    m._lock = lock  # type: ignore[assignment]
    _background.service(m._files).folder_lock = folder  # type: ignore[assignment]
    return lock, folder


def saved_with_a_timed_backup(tmp_path: Path, **kw: Any) -> PositionStateManager:
    """backup_interval=0 (a timed backup at each snapshot), "sync": A saved, and its timed backup taken."""
    m = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=0, durability="sync", **kw), key=KEY)
    m.set_position(pos("A", 1))
    m.save()
    assert m.wait_for_backups(WAIT)
    return m


def the_backup_thread(m: PositionStateManager) -> tuple[_background.BackupService, threading.Thread]:
    """The manager's backup service and its running thread."""
    svc = _background.service(m._files)
    thread = svc._thread
    assert thread is not None
    return svc, thread


def journaled_after_a_timed_backup(tmp_path: Path) -> PositionStateManager:
    """A saved and backed up, then B journaled, so a restore's settle save writes B and asks the backup thread
    for a backup (which waits for the folder)."""
    m = saved_with_a_timed_backup(tmp_path)
    m.set_position(pos("B", 2))
    return m


def at_the_restores_commit(m: PositionStateManager, then: Callable[[], None]) -> threading.Event:
    """Run *then* in the stateSaved handler of a restore's commit (the second save once the returned event is
    set: the settle save, then the commit; both locks held there)."""
    armed = threading.Event()
    saves: list[int] = []

    def on_saved(e: dict[str, Any]) -> None:
        if armed.is_set() and not e.get("background"):
            saves.append(int(e["generation"]))
            if len(saves) == 2:
                then()

    m.on("stateSaved", on_saved)
    return armed


def open_a_transaction(m: PositionStateManager) -> threading.Event:
    """Another thread holds m.transaction() (the manager's lock) until the returned event is set."""
    inside, end = threading.Event(), threading.Event()

    def txn() -> None:
        with m.transaction():
            inside.set()
            assert end.wait(WAIT)

    in_thread(txn)
    assert inside.wait(WAIT)
    return end


def holder_call(m: PositionStateManager, name: str) -> Any:
    if name == "restore_from_backup":
        return m.restore_from_backup("latest", accept_older=True)
    return getattr(m, name)()


@pytest.mark.parametrize("folder_op", ["restore_from_backup", "attempt_recovery", "repair_state"])
@pytest.mark.parametrize("lock_op", ["prune_old_backups", "restore_from_backup"])
@pytest.mark.parametrize("where", ["transaction", "handler of a locked save"])
def test_a_lock_holder_asking_for_the_folder_does_not_deadlock_with_an_operation_waiting_for_the_lock(
    tmp_path: Path, folder_op: str, lock_op: str, where: str
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.create_backup()
    lock, folder = watched(m)
    inside, go, done = threading.Event(), threading.Event(), threading.Event()
    got: list[Any] = []

    def ask() -> None:  # holds the manager's lock, then asks for an operation that needs the folder
        inside.set()
        assert go.wait(WAIT)
        try:
            got.append(holder_call(m, lock_op))
        except BaseException as exc:
            got.append(exc)
        finally:
            done.set()

    if where == "transaction":

        def in_txn() -> None:
            with m.transaction():
                ask()

        holder, _ = in_thread(in_txn, name="lock-holder")
    else:
        m.on("stateSaved", lambda e: ask() if not e.get("background") and not inside.is_set() else None)
        m.set_position(pos("B", 2))
        holder, _ = in_thread(m.save, name="lock-holder")
    assert inside.wait(WAIT)
    other, result = in_thread(lambda: holder_call(m, folder_op), name="folder-op")
    assert until(lambda: "folder-op" in lock.waiting)  # it waits for the manager's lock
    go.set()
    assert done.wait(WAIT), "the lock holder waited for the folder held by an operation waiting for the lock"
    holder.join(WAIT)
    other.join(WAIT)
    assert not holder.is_alive() and not other.is_alive()
    assert not isinstance(result[0], BaseException) or folder_op != "restore_from_backup", result
    assert not folder._is_owned()
    m.close()


def test_a_snapshot_mode_backup_waiting_for_the_lock_does_not_deadlock_with_a_lock_holder_pruning(
    tmp_path: Path,
) -> None:
    m = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, durability="snapshot"), key=KEY)
    m.set_position(pos("A", 1))
    m.save()
    lock, _ = watched(m)
    inside, go = threading.Event(), threading.Event()
    got: list[Any] = []

    def in_txn() -> None:
        with m.transaction():
            inside.set()
            assert go.wait(WAIT)
            got.append(m.prune_old_backups())

    holder, _ = in_thread(in_txn, name="lock-holder")
    assert inside.wait(WAIT)
    other, result = in_thread(m.create_backup, name="folder-op")
    assert until(lambda: "folder-op" in lock.waiting)
    go.set()
    holder.join(WAIT)
    other.join(WAIT)
    assert not holder.is_alive() and not other.is_alive(), "the snapshot backup and the lock holder deadlocked"
    assert got and not isinstance(result[0], BaseException), (got, result)
    m.close()


def test_a_timed_backups_handler_taking_the_lock_does_not_deadlock_with_a_lock_holder_pruning(tmp_path: Path) -> None:
    m = PositionStateManager(
        StateConfig.in_dir(tmp_path, backup_interval=0, durability="sync", journal_max_records=1000, compaction="thread"),
        key=KEY,
    )
    m.set_position(pos("A", 1))
    assert m.wait_for_backups(WAIT)  # the first load's backup
    lock, folder = watched(m)
    in_handler, handler_go, inside, go = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    got: list[Any] = []

    def on_backup(e: dict[str, Any]) -> None:  # on the backup thread: takes the manager's lock
        if e.get("background") and not in_handler.is_set():
            in_handler.set()
            assert handler_go.wait(WAIT)
            m.set_position(pos("H", 9))

    def in_txn() -> None:
        with m.transaction():
            inside.set()
            assert go.wait(WAIT)
            got.append(m.prune_old_backups())

    m.on("backupCreated", on_backup)
    m.set_position(pos("B", 2))
    m.save()  # backup_interval=0: a timed backup of this snapshot; its handler waits
    assert in_handler.wait(WAIT)
    holder, _ = in_thread(in_txn, name="lock-holder")
    assert inside.wait(WAIT)
    handler_go.set()  # the handler waits for the manager's lock the transaction holds
    assert until(lambda: any(n.startswith("posstate-backup") for n in lock.waiting)), lock.waiting
    go.set()  # the transaction prunes: it needs the folder
    holder.join(WAIT)
    assert not holder.is_alive(), "the lock holder and the timed backup's handler deadlocked"
    assert m.wait_for_backups(WAIT)
    assert got and not folder._is_owned()
    assert m.get_position("H", "long") is not None
    m.close()


def test_a_handler_holding_the_folder_is_told_at_once_that_the_backups_cannot_be_waited_for(tmp_path: Path) -> None:
    m = journaled_after_a_timed_backup(tmp_path)
    idle: list[bool] = []
    # A restore's commit runs its stateSaved handlers holding the folder; its timed backup waits for that folder.
    m.on("stateSaved", lambda e: idle.append(m.wait_for_backups()) if not e.get("background") else None)
    restore, result = in_thread(lambda: m.restore_from_backup("latest", accept_older=True))
    restore.join(WAIT)
    assert not restore.is_alive(), "wait_for_backups() in a handler holding the folder waited for ever"
    assert idle and not any(idle) and not isinstance(result[0], BaseException), (idle, result)
    assert m.wait_for_backups(WAIT)
    m.close()
