"""Fifth attack on session 15's lock order (commit 6fd1841): the temp sweep decided under the gate close()
cancels under; close() from a folder holder reporting only a backup it dropped."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import KEY, backup_symbols, pos
from test_lock_order import saved_with_a_timed_backup, the_backup_thread

from posstate import PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time
#: A bound for a hook ordering two threads in a way a fixed stop() forbids (it then runs out, and the test goes on).
HOOK_WAIT = 5.0


# --------------------------------------------------------------------------------------------------------------
# 1. The sweep now holds the gate for the whole listdir + unlink loop. A backup thread whose sweep is stuck on
#    one unlink (a leftover temp on a stuck disk; or just a long sweep of many planted temps) holds the gate past
#    close()'s deadline + grace: close() reports "could not be cancelled (a file operation is stuck): it may
#    still add a backup" and returns WITHOUT setting `_cancelled`. The thread is then not cancelled at all: once
#    the unlink returns it reads, names a backup (documented) and runs copy_state_file's final sweep_uncancelled
#    (cancelled() is False) in a folder a next bot owns: it unlinks that bot's backup temp in progress, and the
#    next bot's create_backup() fails. The same hole the fourth attack closed, through the "could not be
#    cancelled" branch; ARCHITECTURE.md's "a backup cancelled at close()'s deadline sweeps no temp file" and
#    SECURITY.md's "once cancelled it touches nothing there but its own temp" do not cover it.
# --------------------------------------------------------------------------------------------------------------
def test_a_backup_close_could_not_cancel_in_a_stuck_sweep_does_not_sweep_a_next_bots_backup_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    _svc, old_thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    planted = backup_dir / ".positions_leftover.tmp"  # a temp a killed backup left (or one of many planted)
    planted.write_bytes(b"x")
    in_sweep, go, next_temp = threading.Event(), threading.Event(), threading.Event()
    me = threading.current_thread()
    m2_holder: list[PositionStateManager] = []
    real_unlink, real_fsync_dir, real_write_temp = fs.unlink, fs.fsync_dir, _atomic.write_temp

    def unlink(path: Any) -> None:
        if threading.current_thread() is old_thread and Path(path).name == planted.name:
            in_sweep.set()  # the sweep's unlink is stuck on the disk, the gate held
            assert go.wait(WAIT)
        real_unlink(path)

    def fsync_dir(path: Any) -> None:
        if threading.current_thread() is old_thread and Path(path) == backup_dir and go.is_set():
            next_temp.wait(WAIT)  # the named backup's folder fsync: a next bot is writing its backup meanwhile
        real_fsync_dir(path)

    def write_temp(target: Path, data: bytes, **kw: Any) -> Path:
        tmp = real_write_temp(target, data, **kw)
        if threading.current_thread() is me and m2_holder and target.parent == backup_dir and not next_temp.is_set():
            next_temp.set()  # the next bot's backup temp is on disk: the closed manager's thread goes on
            old_thread.join(WAIT)
        return tmp

    monkeypatch.setattr(fs, "unlink", unlink)
    monkeypatch.setattr(fs, "fsync_dir", fsync_dir)
    monkeypatch.setattr(_atomic, "write_temp", write_temp)
    m.set_position(pos("B", 2))
    m.save()  # a timed backup (backup_interval=0): its first sweep is stuck on the leftover temp
    assert in_sweep.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)  # close()'s deadline (a bound, not a measured time)
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    m.close()
    assert m.closed and old_thread.is_alive()
    go.set()  # the stuck unlink returns after close() released the writer lock

    m2 = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, durability="sync"), key=KEY)
    m2_holder.append(m2)
    try:
        m2.set_position(pos("C", 3))
        try:
            info = m2.create_backup()
        except Exception as exc:
            pytest.fail(
                "close() could not take the gate (the sweep held it through a stuck unlink) and so never cancelled "
                "the backup thread: after the writer lock was released it swept the next bot's backup temp "
                f"(close() said {[r.get('reason') for r in reports if r.get('operation') == 'close']}): {exc!r}"
            )
        assert "C" in backup_symbols(m2, info.path)
    finally:
        go.set()
        next_temp.set()
        old_thread.join(WAIT)
        m2.close()


# --------------------------------------------------------------------------------------------------------------
# 2. `_ran` was added for close() from a folder holder only. close() from an ordinary thread past its deadline
#    still says "a background backup was still running ... and was cancelled before it got its name: no backup
#    was added" (and emits backupFailed) whenever the thread is alive: a timed backup that was taken, named and
#    pruned, whose backupCreated handler (an upload of the new backup, say) runs past CLOSE_TIMEOUT, is reported
#    as never added -- the same false report the fourth attack found, by the other branch of stop().
# --------------------------------------------------------------------------------------------------------------
def test_close_past_its_deadline_does_not_report_a_taken_timed_backup_as_not_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    _svc, thread = the_backup_thread(m)
    armed, created, release = threading.Event(), threading.Event(), threading.Event()
    taken: list[str] = []

    def on_created(e: dict[str, Any]) -> None:
        if not armed.is_set() or not e.get("background"):
            return
        taken.append(str(e["backup_id"]))
        created.set()
        release.wait(WAIT)  # the application uploads the new backup: longer than close()'s deadline

    m.on("backupCreated", on_created)
    armed.set()
    m.set_position(pos("B", 2))
    m.save()  # a timed backup: taken and named; its handler runs on the backup thread
    assert created.wait(WAIT)
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)  # a bound, not a measured time
    try:
        m.close()
    finally:
        release.set()
        thread.join(WAIT)
    names = {p.name for p in m.config.backup_path.glob("positions_*")}
    assert any(t in n for t in taken for n in names)  # the timed backup was taken and is there
    closes = [r.get("reason") for r in reports if r.get("operation") == "close"]
    assert not any("no backup was added" in str(r) for r in closes), (
        f"close() reported the timed backup {taken} as cancelled before its name ('no backup was added'), but it "
        f"was named before close() began; only its backupCreated handler was still running: {closes}"
    )


# --------------------------------------------------------------------------------------------------------------
# 3. stop() from a folder holder reads `_wanted`, `_busy` and `_ran` without the condition lock. `_next()` (under
#    the condition) lowers `_wanted` and then raises `_busy`: a close() that reads between those two stores (a
#    GIL switch; here forced by hooks that only order the reads and writes the code does) sees nothing wanted and
#    nothing busy and reports nothing, while the thread, which had checked `_cancelled` just before close() set
#    it, takes the request, waits for the folder, finds `_cancelled` and drops the timed backup asked for: a
#    backup dropped and not reported, which the fix promised to report. Reading the three under `svc._cond` closes it.
# --------------------------------------------------------------------------------------------------------------
def test_close_from_a_restore_handler_reports_a_timed_backup_taken_up_while_it_reads_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    first = m.list_backups()[0]
    svc, backup_thread = the_backup_thread(m)
    me = threading.current_thread()
    armed, created = threading.Event(), threading.Event()
    closing_set, in_next, cancelled_set, wanted_lowered, busy_read = (threading.Event() for _ in range(5))

    def hooked(name: str) -> property:
        def get(self: Any) -> Any:
            value = self.__dict__[name]
            here = threading.current_thread()
            if armed.is_set() and self is svc:
                if name == "_cancelled" and here is backup_thread and closing_set.is_set() and not in_next.is_set():
                    in_next.set()  # _next read it (False) just before close() set it
                    cancelled_set.wait(HOOK_WAIT)
                elif name == "_wanted" and here is me and cancelled_set.is_set():
                    wanted_lowered.wait(HOOK_WAIT)
                    value = self.__dict__[name]
                elif name == "_busy" and here is me and cancelled_set.is_set():
                    busy_read.set()
            return value

        def put(self: Any, value: Any) -> None:
            here = threading.current_thread()
            if armed.is_set() and self is svc:
                if name == "_cancelled" and value and here is me:
                    in_next.wait(HOOK_WAIT)
                if name == "_busy" and value is True and here is backup_thread and wanted_lowered.is_set():
                    busy_read.wait(HOOK_WAIT)  # _next's next store, after close() read the flags
                self.__dict__[name] = value
                if name == "_closing" and value:
                    closing_set.set()
                elif name == "_cancelled" and value:
                    cancelled_set.set()
                elif name == "_wanted" and value is False and here is backup_thread and cancelled_set.is_set():
                    wanted_lowered.set()
                return
            self.__dict__[name] = value

        return property(get, put)

    for name in ("_wanted", "_busy", "_cancelled", "_closing"):
        monkeypatch.setattr(_background.BackupService, name, hooked(name), raising=False)

    def on_created(e: dict[str, Any]) -> None:
        if armed.is_set() and e.get("background") and not created.is_set():
            created.set()
            closing_set.wait(WAIT)  # this backup's handler ends as close() begins; a request is waiting

    m.on("backupCreated", on_created)
    armed.set()
    m.set_position(pos("B", 2))
    m.save()  # a timed backup: taken; its handler runs on the backup thread
    assert created.wait(WAIT)
    m.set_position(pos("C", 3))
    m.save()  # asks for the next timed backup while the thread is busy in that handler
    taken_before = svc.taken
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    done = threading.Event()

    def on_saved(e: dict[str, Any]) -> None:
        if e.get("background") or done.is_set() or e.get("positions") != 1:
            return
        done.set()  # the restore's commit: the folder held
        m.close()

    m.on("stateSaved", on_saved)
    m.restore_from_backup(first.id, accept_older=True)
    assert m.closed and done.is_set()
    backup_thread.join(WAIT)
    assert not backup_thread.is_alive()
    closes = [r.get("reason") for r in reports if r.get("operation") == "close"]
    assert svc.taken > taken_before or closes, (
        "the timed backup asked for before close() was taken up by the thread while close() read the flags "
        "without the condition lock, then dropped (cancelled) and never reported"
    )
