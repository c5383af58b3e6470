"""Fourth attack on session 15's lock order (commit b56cfed): a cancelled backup thread touches nothing in the folder;
close() from a folder holder reports a backup it dropped; _finish_pending with no job; a restore counts its
generation as backed up before its commit."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import KEY, backup_symbols, pos
from test_lock_order import saved_with_a_timed_backup, the_backup_thread

from posstate import PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.storage import atomic as _atomic

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


# --------------------------------------------------------------------------------------------------------------
# 1. The fix checks `_cancelled` only at the top of _once(). close() past its deadline (a backup write stuck on
#    the disk: the documented case) sets `_cancelled` while the thread is already inside copy_state_file(), and
#    returns: the writer lock is released. The thread, once its write returns, gets Cancelled at _place's name
#    step, and then copy_state_file's `finally: _backups.sweep_temps(backup_dir)` unlinks EVERY
#    `.positions_*.tmp` in the folder ("the caller holds the writer lock": it does not any more). A next bot's
#    backup temp goes with it: its create_backup() fails. close() said "cancelled before it got its name: no
#    backup was added; its temp file, if any, is removed by the next backup" -- nothing about removing others'.
# --------------------------------------------------------------------------------------------------------------
def test_a_backup_cancelled_past_closes_deadline_does_not_sweep_a_next_bots_backup_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    _svc, old_thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    entered, go = threading.Event(), threading.Event()
    me = threading.current_thread()
    m2_holder: list[PositionStateManager] = []
    real_write_temp = _atomic.write_temp

    def write_temp(target: Path, data: bytes, **kw: Any) -> Path:
        here = threading.current_thread()
        if here is old_thread and target.parent == backup_dir:  # the old backup's temp: a write stuck on the disk
            entered.set()
            assert go.wait(WAIT)
        tmp = real_write_temp(target, data, **kw)
        if here is me and m2_holder and target.parent == backup_dir and not go.is_set():
            go.set()  # the next bot's backup temp is on disk: the closed manager's write returns
            old_thread.join(WAIT)
        return tmp

    monkeypatch.setattr(_atomic, "write_temp", write_temp)
    m.set_position(pos("B", 2))
    m.save()  # a timed backup (backup_interval=0): its write of the temp is stuck
    assert entered.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)  # close()'s deadline (a bound, not a measured time)
    m.close()
    assert m.closed and old_thread.is_alive()  # past the deadline: cancelled before its name, left running

    m2 = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, durability="sync"), key=KEY)
    m2_holder.append(m2)
    try:
        m2.set_position(pos("C", 3))
        try:
            info = m2.create_backup()
        except Exception as exc:
            pytest.fail(
                "the closed manager's cancelled backup thread swept the next bot's backup temp (copy_state_file's "
                f"final sweep_temps after Cancelled, once close() had released the writer lock): {exc!r}"
            )
        assert "C" in backup_symbols(m2, info.path)
    finally:
        go.set()
        old_thread.join(WAIT)
        m2.close()


# --------------------------------------------------------------------------------------------------------------
# 2. stop() from a folder holder (close() from a restore's stateSaved handler) reports `backupFailed` "the timed
#    backup asked for was not taken" whenever `svc._busy`. But `_busy` stays True until the thread's deferred
#    events (backupCreated, emitted once the folder is released) have run: a timed backup that was taken, named
#    and pruned, whose backupCreated handler is still running (here: it reads the positions, so it waits for the
#    manager's lock the restore holds), is reported as not taken.
# --------------------------------------------------------------------------------------------------------------
def test_close_from_a_restore_handler_does_not_report_a_taken_timed_backup_as_not_taken(tmp_path: Path) -> None:
    from test_lock_order import until, watched

    m = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=0, durability="sync"), key=KEY)
    lock, _ = watched(m)
    m.set_position(pos("A", 1))
    m.save()
    assert m.wait_for_backups(WAIT)
    first = m.list_backups()[0]
    svc = _background.service(m._files)
    armed, created, restore_inside = threading.Event(), threading.Event(), threading.Event()
    taken: list[str] = []

    def on_created(e: dict[str, Any]) -> None:
        if not armed.is_set() or not e.get("background"):
            return
        taken.append(str(e["backup_id"]))
        created.set()
        assert restore_inside.wait(WAIT)
        with contextlib.suppress(Exception):  # closed meanwhile
            m.get_positions()  # waits for the manager's lock the restore holds

    m.on("backupCreated", on_created)
    armed.set()
    m.set_position(pos("B", 2))
    m.save()  # a timed backup: taken; its backupCreated handler runs on the backup thread (still busy)
    assert created.wait(WAIT)
    failures: list[dict[str, Any]] = []
    m.on("backupFailed", failures.append)

    def on_saved(e: dict[str, Any]) -> None:
        if e.get("background") or e.get("positions") != 1 or restore_inside.is_set():
            return
        restore_inside.set()  # the restore's commit: both locks held
        assert until(lambda: "posstate-backup" in lock.waiting)
        m.close()

    m.on("stateSaved", on_saved)
    m.restore_from_backup(first.id, accept_older=True)
    assert m.closed
    thread = svc._thread
    if thread is not None:
        thread.join(WAIT)
    names = {p.name for p in m.config.backup_path.glob("positions_*")}
    assert any(t in n for t in taken for n in names)  # the timed backup was taken and is there
    closes = [f for f in failures if f.get("operation") == "close"]
    assert not closes, (
        f"close() reported the timed backup {taken} as not taken, but it was taken and named before the restore "
        f"took the folder (only its backupCreated handler was still running): {closes}"
    )
