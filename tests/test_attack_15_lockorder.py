"""Attack on session 15's lock order (branch s15-lockorder): cycles between the manager's lock and the backup
folder's lock that are still left, and the "given up" verdict of an explicit backup's fold."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import backup_symbols, in_thread, make, pos
from test_lock_order import journaled_after_a_timed_backup, open_a_transaction, until, watched

from posstate import CorruptStateError, PersistenceError
from posstate.backup import snapcopy as _snapcopy

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


def _lock_op(m: Any, name: str) -> Any:
    if name == "restore_from_backup":
        return m.restore_from_backup("latest", accept_older=True)
    return getattr(m, name)()


# --------------------------------------------------------------------------------------------------------------
# 1. close()'s backup of the acknowledged state (closing.final_backup) emits its events on the closing thread
#    WITH the backup folder held: a backupCreated handler that takes the manager's lock (exactly what
#    test_lock_order allows a timed backup's handler to do; the close backup is reported as background: True)
#    waits for a lock holder that waits for the folder.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lock_op", ["restore_from_backup", "attempt_recovery", "repair_state"])
def test_the_close_backups_handler_taking_the_lock_does_not_deadlock_with_a_lock_holder_asking_for_the_folder(
    tmp_path: Path, lock_op: str
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.create_backup()
    m.set_position(pos("B", 2))  # acknowledged, in no backup: close() backs memory up (final_backup)
    lock, folder = watched(m)
    in_handler, go, asked = threading.Event(), threading.Event(), threading.Event()

    def on_created(e: dict[str, Any]) -> None:  # on the closing thread, the folder held
        if e.get("operation") == "close" and not in_handler.is_set():
            in_handler.set()
            assert go.wait(WAIT)
            m.set_position(pos("H", 9))  # the manager's lock

    def on_saved(e: dict[str, Any]) -> None:  # a handler of a locked save(): holds the manager's lock
        if not e.get("background") and in_handler.is_set() and not asked.is_set():
            asked.set()
            with contextlib.suppress(Exception):
                _lock_op(m, lock_op)

    m.on("backupCreated", on_created)
    m.on("stateSaved", on_saved)
    closer, _ = in_thread(m.close, name="closer")
    assert in_handler.wait(WAIT)
    m.set_position(pos("C", 3))
    holder, _ = in_thread(m.save, name="lock-holder")
    assert until(lambda: "lock-holder" in folder.waiting or not holder.is_alive())
    go.set()
    closer.join(WAIT)
    assert not closer.is_alive(), (
        "close()'s backup handler (folder held) waits for the manager's lock, whose holder waits for the folder: "
        f"waiting for the lock {sorted(lock.waiting)}, for the folder {sorted(folder.waiting)}"
    )
    holder.join(WAIT)
    assert not holder.is_alive()


# --------------------------------------------------------------------------------------------------------------
# 4. The "given up" verdict is taken from svc._durable_generation read after the fold. The compaction thread
#    sets job.done, runs its stateSaved handlers and only then notes its snapshot (_after_save): in that window
#    the fold has returned, the compaction's snapshot IS durable, but durable still names the previous one.
#    A keyless attacker who puts the previous genuine state file back (generation == durable) is then told
#    apart as "the snapshot this backup waited for was given up" (an info line), not as a file replaced
#    behind the writer lock; with memory busy the caller is told to call again instead of CorruptStateError.
# --------------------------------------------------------------------------------------------------------------
def _plant_in_the_window(m: Any, monkeypatch: pytest.MonkeyPatch, old: bytes) -> threading.Event:
    noted = threading.Event()
    real_after = m._after_save

    def late(st: Any) -> None:  # the compaction thread notes its snapshot after the backup's copy
        if threading.current_thread() is m._bg_thread:
            noted.wait(WAIT)
        real_after(st)

    m._after_save = late
    real_copy = _snapcopy.copy_state_file

    def planted(*a: Any, **k: Any) -> Any:
        m.path.write_bytes(old)  # the attacker, without the key: the previous genuine state file
        return real_copy(*a, **k)

    monkeypatch.setattr(_snapcopy, "copy_state_file", planted)
    return noted


def test_a_rolled_back_state_file_is_not_reported_as_a_given_up_fold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    old = m.path.read_bytes()  # generation == the durable generation the backup will read
    m.set_position(pos("B", 2))
    noted = _plant_in_the_window(m, monkeypatch, old)
    try:
        with caplog.at_level(logging.INFO, logger="posstate"):
            info = m.create_backup()
    finally:
        noted.set()
    monkeypatch.undo()
    assert backup_symbols(m, info.path) == {"A", "B"}
    # The fold's compaction was NOT given up (it finished and its snapshot is on disk before the plant):
    assert "given up" not in caplog.text, "a planted older state file is reported as a given-up compaction"
    assert "does not verify" in caplog.text  # the warning that points at another writer
    m.close()


def test_a_rolled_back_state_file_with_memory_busy_is_not_reported_as_call_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    old = m.path.read_bytes()
    m.set_position(pos("B", 2))
    noted = _plant_in_the_window(m, monkeypatch, old)
    planted = _snapcopy.copy_state_file

    ends: list[threading.Event] = []

    def busy(*a: Any, **k: Any) -> Any:  # after the fold, memory busy (a transaction), then the old file back
        ends.append(open_a_transaction(m))
        return planted(*a, **k)

    monkeypatch.setattr(_snapcopy, "copy_state_file", busy)
    try:
        with pytest.raises((PersistenceError, CorruptStateError)) as caught:
            m.create_backup()
    finally:
        for end in ends:
            end.set()
        noted.set()
    monkeypatch.undo()
    text = str(caught.value)
    assert isinstance(caught.value, CorruptStateError) and "call create_backup() again" not in text, (
        f"a rolled-back state file is blamed on a failed save: {text}"
    )


# --------------------------------------------------------------------------------------------------------------
# 1b. "No event handler runs while the folder is held" (docs/ARCHITECTURE.md) does not hold for a restore, a
#     recovery, a repair or a "snapshot" create_backup(): their events are emitted inside _folder_then_lock.
#     The restore's commit asks the backup thread for a timed backup (backup_interval=0), which then waits for
#     the folder; a backupRestored handler that waits for the backups (posstate's own wait_for_backups(),
#     the natural "after a restore, wait for its backup") waits for a thread that waits for its own thread.
# --------------------------------------------------------------------------------------------------------------
def test_a_restore_handler_waiting_for_the_backups_does_not_wait_for_a_backup_waiting_for_its_folder(
    tmp_path: Path,
) -> None:
    m = journaled_after_a_timed_backup(tmp_path)
    idle: list[bool] = []
    m.on("backupRestored", lambda e: idle.append(m.wait_for_backups(WAIT)))
    m.restore_from_backup("latest", accept_older=True)
    assert idle == [True], (
        "the restore's handler ran with the backup folder held: the timed backup it waits for waits for that folder"
    )
    m.close()
