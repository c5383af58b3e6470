"""Third attack on session 15's lock order (commit 6c801b5): close() from a handler holding the folder no longer
joins the backup thread, the compaction notes its snapshot under _bg_cond, the spare's error event after its flag."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import KEY, backup_symbols, in_thread, make, pos
from test_lock_order import the_backup_thread

from posstate import PositionStateManager, StateConfig
from posstate.backup import snapcopy as _snapcopy
from posstate.storage import atomic as _atomic

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


# --------------------------------------------------------------------------------------------------------------
# 1. close() from a restore's stateSaved handler (it holds the folder) now sets svc._cancelled and returns without
#    joining the backup thread. `_cancelled` guards only the *name* (_place's link under the gate). The backup
#    thread, blocked on the folder, takes it once the restore returns — after close() released the writer lock —
#    and runs _once(): copy_state_file() starts with _backups.sweep_temps(backup_dir), which unlinks EVERY
#    `.positions_*.tmp` in the folder ("the caller holds the writer lock": it does not any more), then writes its
#    own temp there. A next bot that opened the directory meanwhile has its backup's temp removed under it: its
#    create_backup() fails (link: ENOENT). SECURITY.md: "no backup is named and no backup removed in a directory
#    a next bot may already own"; ARCHITECTURE.md: the thread "can name nothing without the folder".
# --------------------------------------------------------------------------------------------------------------
def test_close_from_a_restore_handler_leaves_no_backup_thread_touching_the_folder_a_next_bot_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_lock_order import at_the_restores_commit, journaled_after_a_timed_backup, until, watched

    m = journaled_after_a_timed_backup(tmp_path)
    _, folder = watched(m)
    _svc, old_thread = the_backup_thread(m)
    go = threading.Event()
    real_copy = _snapcopy.copy_state_file

    def held_copy(*a: Any, **k: Any) -> Any:  # the old backup thread, once it got the folder, waits for the cue
        if threading.current_thread() is old_thread:
            assert go.wait(WAIT)
        return real_copy(*a, **k)

    monkeypatch.setattr(_snapcopy, "copy_state_file", held_copy)

    def close() -> None:  # the restore's commit; the settle save's backup waits for the folder
        assert until(lambda: "posstate-backup" in folder.waiting)
        m.close()

    at_the_restores_commit(m, close).set()
    m.restore_from_backup("latest", accept_older=True)
    assert m.closed  # close() returned: the writer lock is released, the directory is free

    m2 = PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, durability="sync"), key=KEY)
    try:
        m2.set_position(pos("C", 3))
        real_write_temp = _atomic.write_temp
        me = threading.current_thread()

        def write_temp(target: Path, data: bytes, **kw: Any) -> Path:
            tmp = real_write_temp(target, data, **kw)
            if threading.current_thread() is me and target.parent == m2.config.backup_path and not go.is_set():
                go.set()  # the next bot's backup temp is on disk: the closed manager's backup thread goes on
                old_thread.join(WAIT)
            return tmp

        monkeypatch.setattr(_atomic, "write_temp", write_temp)
        try:
            info = m2.create_backup()
        except Exception as exc:
            pytest.fail(
                "the closed manager's backup thread swept the next bot's backup temp (it ran after close() "
                f"returned and the writer lock was released): {exc!r}"
            )
        assert "C" in backup_symbols(m2, info.path)
    finally:
        go.set()
        m2.close()


# --------------------------------------------------------------------------------------------------------------
# 2. The same fix left out for the compaction thread. close() -> _finish_compaction() -> _finish_pending() joins
#    the compaction thread while it still runs its after-save part (stateSaved handlers, the after-save hook):
#    `thread.join(deadline)`. close() from a restore's stateSaved handler holds the folder; a handler of the
#    background compaction's stateSaved that asked for the folder before close() began (prune_old_backups():
#    past the gate's check, waiting for the folder, not yet counted by the gate) waits for that very thread.
#    close() waits out its whole deadline (30 s) for nothing, then logs that "a background compaction was still
#    writing ... the journal segments stay on disk" — the compaction had finished; the snapshot is durable.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("asked_op", ["prune_old_backups", "restore_from_backup"])
def test_close_from_a_restore_handler_does_not_wait_out_a_compaction_handler_waiting_for_its_locks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, asked_op: str
) -> None:
    import logging

    from test_lock_order import until, watched

    m = make(tmp_path)
    m._close_wait = 3.0  # type: ignore[misc]  # a bound for the wait below, not a measured time
    lock, folder = watched(m)
    m.set_position(pos("A", 1))
    m.save()
    m.create_backup()
    m.set_position(pos("B", 2))
    in_bg_handler, restore_inside = threading.Event(), threading.Event()
    asked: list[Any] = []
    saves: list[int] = []

    def on_saved(e: dict[str, Any]) -> None:
        if e.get("background"):
            if in_bg_handler.is_set():
                return
            in_bg_handler.set()  # on the compaction thread, after its snapshot is durable
            assert restore_inside.wait(WAIT)
            try:
                if asked_op == "prune_old_backups":  # waits for the manager's lock the restore holds
                    asked.append(m.prune_old_backups())
                else:  # waits for the folder the restore holds
                    asked.append(m.restore_from_backup("latest", accept_older=True))
            except Exception as exc:
                asked.append(exc)
            return
        if not in_bg_handler.is_set():
            return
        saves.append(int(e["generation"]))
        if len(saves) == 2:  # the restore's commit: both locks held
            restore_inside.set()
            assert until(lambda: any(n.startswith("posstate-compact") for n in folder.waiting | lock.waiting))
            m.close()

    m.on("stateSaved", on_saved)
    m.compact(wait=False)
    assert in_bg_handler.wait(WAIT)
    with caplog.at_level(logging.WARNING, logger="posstate"):
        restorer, _ = in_thread(lambda: m.restore_from_backup("latest", accept_older=True), name="restorer")
        restorer.join(WAIT)
    assert not restorer.is_alive()
    assert m.closed
    assert "still writing" not in caplog.text, (
        "close() from a handler holding the folder joined the compaction thread, whose stateSaved handler waits "
        "for that folder or the manager's lock: it waited out its deadline and reported a compaction still writing "
        f"({caplog.text!r})"
    )


# --------------------------------------------------------------------------------------------------------------
# 3. docs/RECOVERY.md, "The backup at close()": "a restore counts as held by the backup it restored" (ops.restore
#    raises backed_generation after its commit "so 'latest' stays the backup just restored or the pre-restore
#    one"). close() from the restore's stateSaved handler — the case session 15 made legal (it no longer waits
#    for the backup thread) — runs before that line: the close backup copies the restored state once more and
#    becomes "latest".
# --------------------------------------------------------------------------------------------------------------
def test_close_from_a_restore_handler_adds_no_close_backup_of_the_restored_state(tmp_path: Path) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    first = m.create_backup()
    m.set_position(pos("B", 2))
    m.save()
    before = {b.id for b in m.list_backups()}
    inside = threading.Event()
    saves: list[int] = []

    def on_saved(e: dict[str, Any]) -> None:
        if not inside.is_set() or e.get("background"):
            return
        saves.append(int(e["generation"]))
        if e.get("positions") == 1:  # the restore's commit (the backup holds A only): both locks held
            m.close()

    m.on("stateSaved", on_saved)
    inside.set()
    result = m.restore_from_backup(first.id, accept_older=True)
    assert m.closed
    m2 = make(tmp_path)
    try:
        added = {b.id for b in m2.list_backups()} - before
        expected = {result.pre_restore_backup} if result.pre_restore_backup is not None else set()
        assert added <= expected, f"close() from the restore's handler backed up the restored state again: {added}"
    finally:
        m2.close()
