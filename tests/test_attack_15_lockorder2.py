"""Second attack on session 15's lock order (commit 95b30e5): the compaction's snapshot noted durable before its
waiters wake, events deferred past the folder, wait_for_backups()/close() from a handler holding the folder."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import backup_symbols, in_thread, make, pos

from posstate.backup import background as _background
from posstate.backup import snapcopy as _snapcopy

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


# --------------------------------------------------------------------------------------------------------------
# 1. (d) The compaction thread notes its snapshot durable before job.done.set(), but it publishes the end of the
#    job (self._bg_job = None, _bg_busy = False, notify_all) under _bg_cond BEFORE that, and _await_job() has a
#    second way out that never looks at job.done: a waiter that found the attempt in flight waits on _bg_cond
#    while _bg_busy, and returns True as soon as `self._bg_job is not job`. That is the ordinary path of an
#    explicit create_backup() whose fold finds the compaction already writing. In the window between the
#    notify and _note_durable, the fold returns, _create_now reads the stale durable generation, and an old
#    genuine state file planted there is still reported as "the snapshot this backup waited for was given up".
# --------------------------------------------------------------------------------------------------------------
class _SpyCond(threading.Condition):
    """The manager's _bg_cond, telling when the backup's caller waits on it (the attempt in flight)."""

    def __init__(self, caller: int, waiting: threading.Event) -> None:
        super().__init__()
        self._caller, self._waiting = caller, waiting

    def wait(self, timeout: float | None = None) -> bool:
        if threading.get_ident() == self._caller:
            self._waiting.set()
        return super().wait(timeout)


def test_a_fold_woken_by_the_end_of_the_attempt_in_flight_does_not_read_a_stale_durable_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.create_backup()  # the newest backup is now: no timed backup interferes (backup_interval=1e9)
    m.save()
    old = m.path.read_bytes()  # a genuine state file of the durable generation the backup will read
    m.set_position(pos("B", 2))

    waiting, entered, copied = threading.Event(), threading.Event(), threading.Event()
    m._bg_cond = _SpyCond(threading.get_ident(), waiting)  # before the compaction thread exists
    assert m._bg_thread is None
    real_attempt, real_await, real_note = m._bg_attempt, m._await_job, m._note_durable

    def attempt(job: Any) -> Any:  # the attempt is in flight when the fold starts waiting for it
        entered.set()
        assert waiting.wait(WAIT)
        return real_attempt(job)

    def await_job(job: Any, deadline: float | None = None) -> bool:
        assert entered.wait(WAIT)  # _bg_busy is True now: the fold waits on _bg_cond, not on job.done
        return real_await(job, deadline)

    def note(generation: int) -> None:
        if m._bg_job is None:  # the job's end is already published: its waiter may have gone on
            copied.wait(WAIT)
        real_note(generation)

    m._bg_attempt, m._await_job, m._note_durable = attempt, await_job, note  # type: ignore[method-assign]
    real_copy = _snapcopy.copy_state_file

    def planted(*a: Any, **k: Any) -> Any:
        m.path.write_bytes(old)  # the attacker, without the key: the previous genuine state file
        try:
            return real_copy(*a, **k)
        finally:
            copied.set()

    monkeypatch.setattr(_snapcopy, "copy_state_file", planted)
    try:
        with caplog.at_level(logging.INFO, logger="posstate"):
            info = m.create_backup()
    finally:
        copied.set()
        waiting.set()
        entered.set()
    monkeypatch.undo()
    assert backup_symbols(m, info.path) == {"A", "B"}
    assert "given up" not in caplog.text, (
        "the compaction finished (its snapshot was on disk before the plant), yet the planted older file is reported "
        "as a given-up fold: _await_job returned on `_bg_job is not job` before _note_durable ran"
    )
    assert "does not verify" in caplog.text
    m.close()


# --------------------------------------------------------------------------------------------------------------
# 2. (c)'s sister: close() from a handler that holds the folder. wait_for_backups() there now returns False at
#    once, but close() -> BackupService.close() -> closing.stop() still joins the backup thread, which is blocked
#    on the very folder this thread holds (a restore's stateSaved handler: the restore's settle save asked for a
#    timed backup). close() waits the whole CLOSE_TIMEOUT (30 s) for nothing, then reports a backup "still
#    running ... cancelled" that never ran: a stuck disk is what that report tells the operator.
# --------------------------------------------------------------------------------------------------------------
def test_close_from_a_restore_handler_does_not_wait_out_a_backup_waiting_for_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_lock_order import at_the_restores_commit, journaled_after_a_timed_backup, until, watched

    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 3.0)  # a bound for the wait below, not a measured time
    m = journaled_after_a_timed_backup(tmp_path)
    _, folder = watched(m)
    failed: list[str] = []
    m.on("backupFailed", lambda e: failed.append(str(e.get("reason"))))

    def close() -> None:  # the restore's commit (both locks held); the settle save's backup waits for the folder
        assert until(lambda: "posstate-backup" in folder.waiting)
        m.close()

    at_the_restores_commit(m, close).set()
    m.restore_from_backup("latest", accept_older=True)
    assert m.closed
    stuck = [r for r in failed if "still running" in r]
    assert not stuck, f"close() from a handler holding the folder waited for a backup waiting for that folder: {stuck}"


# --------------------------------------------------------------------------------------------------------------
# 3. A folder holder still waits without a bound for a thread that needs the folder: the journal's spare thread.
#    A restore (the folder and the manager's lock held) settles the journal with a save, whose install waits,
#    with no bound, until the spare segment's thread has no step in flight (journal/spare.py _spare_wait_locked).
#    When preparing the spare fails, that thread emits an "error" event (the manager's own handlers) while its
#    step is still in flight (_spare_busy is cleared in the `finally` after the emit). A handler of that error
#    that asks for the backup folder (restore_from_backup(), prune_old_backups(), create_backup()...) waits for
#    the restore, which waits for it. Nothing in docs/ARCHITECTURE.md's "Two locks, one order" covers it.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("asked_op", ["prune_old_backups", "restore_from_backup"])
def test_a_restore_settling_the_journal_does_not_deadlock_with_a_spare_threads_error_handler_asking_for_the_folder(
    tmp_path: Path, asked_op: str
) -> None:
    from test_lock_order import watched

    m = make(tmp_path, journal_max_records=20)
    _, folder = watched(m)
    m.set_position(pos("A", 1))
    m.save()
    m.create_backup()
    journal = m._journal
    in_handler, restorer_waits = threading.Event(), threading.Event()
    asked: list[Any] = []

    def failing(early: bool = False) -> None:
        raise OSError(28, "No space left on device")

    journal._make_spare = failing  # preparing the spare segment fails (a full disk)
    real_wait = journal._spare_wait_locked

    def spare_wait() -> None:  # the restore's settle save waits for the spare's step in flight
        if threading.current_thread().name == "restorer" and journal._spare_busy:
            restorer_waits.set()
        real_wait()

    journal._spare_wait_locked = spare_wait

    def on_error(e: dict[str, Any]) -> None:  # on the spare's thread, its step still in flight
        if e.get("context") != "journal segment preparation" or in_handler.is_set():
            return
        in_handler.set()
        assert restorer_waits.wait(WAIT)
        try:
            if asked_op == "prune_old_backups":  # a full disk: free some room (the natural reaction)
                asked.append(m.prune_old_backups())
            else:
                asked.append(m.restore_from_backup("latest", accept_older=True))
        except Exception as exc:
            asked.append(exc)

    m.on("error", on_error)
    for i in range(12):  # past half the threshold: the spare's thread starts (and fails)
        m.set_position(pos(f"S{i}", i + 1))
        if in_handler.is_set():
            break
    assert in_handler.wait(WAIT)
    restorer, _ = in_thread(lambda: m.restore_from_backup("latest", accept_older=True), name="restorer")
    restorer.join(WAIT)
    alive = restorer.is_alive()
    spare_threads = [t.name for t in threading.enumerate() if "spare" in t.name]
    assert not alive, (
        "the restore holds the backup folder and waits for the spare segment's thread, whose error handler waits "
        f"for that folder (waiting for the folder: {sorted(folder.waiting)}; spare threads {spare_threads})"
    )
    m.close()
