"""Seventh attack on session 15's lock order (commit 077b409): the backup thread records `_named` under the gate;
close() past its deadline reads it once it held the gate; `_place`/`write_backup` check cancelled() first."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import pos
from test_lock_order import saved_with_a_timed_backup, the_backup_thread

from posstate import PositionStateManager
from posstate.backup import background as _background
from posstate.backup import snapcopy as _snapcopy
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


def _names(m: PositionStateManager) -> set[str]:
    return {p.name for p in m.config.backup_path.glob("positions_*")}


class _Gate:
    """The service's gate, unchanged, except that the closing thread's (uncontended) acquire is preceded by *before*:
    the closing thread being preempted between its `_cond` block and its gate try (a few bytecodes)."""

    def __init__(self, real: Any, closer: threading.Thread, before: Any) -> None:
        self._real, self._closer, self._before = real, closer, before

    def acquire(self, *a: Any, **kw: Any) -> bool:
        if threading.current_thread() is self._closer:
            self._before()
        return self._real.acquire(*a, **kw)

    def release(self) -> None:
        self._real.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------------------
# 1. close() reads `_ran`/`_named` under `_cond`, then tries the gate, then reads `_named` AGAIN, without `_cond`.
#    `_run_one`'s finally resets `_busy = _ran = _named = False` when the run ends. A timed backup named and
#    taken whose backupCreated handler runs past the deadline: close() sees `_named` (not "done"), goes for the
#    gate; the handler returns meanwhile, the run ends and clears `_named`; close() then reads False and reports
#    "cancelled before it got its name: no backup was added" (+ backupFailed) for a backup that is there.
# --------------------------------------------------------------------------------------------------------------
def test_close_does_not_report_a_named_backup_as_not_added_when_its_run_ends_before_close_reads_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    before = _names(m)
    svc, thread = the_backup_thread(m)
    in_handler, release = threading.Event(), threading.Event()

    def on_created(e: dict[str, Any]) -> None:
        if threading.current_thread() is thread:
            in_handler.set()
            release.wait(WAIT)  # a slow handler (uploading the backup, paging): past close()'s deadline

    m.on("backupCreated", on_created)

    def run_ends() -> None:  # the handler returns and the run ends while close() is between its two reads
        release.set()
        with svc._cond:
            assert svc._cond.wait_for(lambda: not svc._busy, WAIT)

    monkeypatch.setattr(svc, "_gate", _Gate(svc._gate, threading.current_thread(), run_ends))
    m.set_position(pos("B", 2))
    m.save()  # a timed backup (backup_interval=0): named, taken, then its handler
    assert in_handler.wait(WAIT)
    added = _names(m) - before
    assert added, "the backup was named and taken before close()"
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)  # a bound, not a measured time
    try:
        m.close()
    finally:
        release.set()
        thread.join(WAIT)
    assert _names(m) - before == added
    closes = [str(r.get("reason")) for r in reports if r.get("operation") == "close"]
    assert not any("no backup was added" in r for r in closes), (
        f"close() reported 'no backup was added', yet backup {sorted(added)} was named and taken (its handler "
        f"ended while close() tried the gate and the run's end cleared _named): {closes}"
    )


# --------------------------------------------------------------------------------------------------------------
# 2. `_place` checks cancelled() before write_temp, but not under the gate, and the write is not under it
#    either. A write_temp that starts just before close()'s deadline (or is slow: a big state, a slow disk) runs
#    on after close() took the free gate, said "no backup was added" and released the writer lock: a whole copy
#    of the state is written and fsynced in the folder the next bot owns, and removed again, after close().
# --------------------------------------------------------------------------------------------------------------
def test_a_backup_cancelled_while_it_writes_its_temp_leaves_nothing_and_names_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    _svc, thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    before = _names(m)
    entered, closed = threading.Event(), threading.Event()
    after_close: list[str] = []
    real_write_temp = _atomic.write_temp

    def write_temp(target: Any, data: bytes, **kw: Any) -> Any:
        if threading.current_thread() is thread and Path(target).parent == backup_dir:
            entered.set()  # past `_place`'s cancelled() check: the write is on its way (slow disk)
            closed.wait(WAIT)
            tmp = real_write_temp(target, data, **kw)
            if closed.is_set():
                after_close.append(Path(tmp).name)
            return tmp
        return real_write_temp(target, data, **kw)

    monkeypatch.setattr(_atomic, "write_temp", write_temp)
    reasons: list[str] = []
    m.on("backupFailed", lambda e: reasons.append(str(e.get("reason"))))
    m.set_position(pos("B", 2))
    m.save()  # a timed backup: read and checked, then `_place`
    assert entered.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    try:
        m.close()
    finally:
        closed.set()
        thread.join(WAIT)
    # A write already under way when close() gives up (this hook holds it until close() returned: a slow disk)
    # cannot be stopped; what holds is that its temp, its own, is removed by name and never named: the folder
    # the next bot owns ends as close() said ("no backup was added"). A write not yet begun is never started.
    assert any("no backup was added" in r for r in reasons), reasons
    left = sorted(p.name for p in backup_dir.iterdir() if p.name.startswith("."))
    assert not set(after_close) & set(left), f"the cancelled backup left its temp {after_close} behind: {left}"
    assert not [n for n in _names(m) - before if n.startswith("positions_")], "the cancelled backup was named"


# --------------------------------------------------------------------------------------------------------------
# 3. The prune after a timed backup decided each removal with `_still_ours` (cache.abandoned) and unlinked outside
#    any lock: close() past its deadline abandoned the cache, logged "named ... still ran its prune" and released
#    the writer lock, and a prune that passed the check just before removed a backup in the folder the next bot
#    owns. Each removal is now decided and made under the lock abandon() takes (VerifiedCache.ours): a removal
#    under way when close() abandons the cache ends before close() returns. (The hook is in the removal itself:
#    there is no gap between the check and the removal left to stop in.)
# --------------------------------------------------------------------------------------------------------------
def test_a_prune_left_running_by_close_removes_no_backup_after_close_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path, max_backups=1)
    svc, thread = the_backup_thread(m)
    removing, abandoning, closed = threading.Event(), threading.Event(), threading.Event()
    real_abandon = type(svc.cache).abandon

    def abandon(cache: Any, timeout: float) -> None:
        abandoning.set()
        real_abandon(cache, max(timeout, WAIT))  # the removal under way is short: close() waits for it

    monkeypatch.setattr(type(svc.cache), "abandon", abandon)
    removed_after: list[str] = []
    real_unlink = fs.unlink

    def unlink(path: Any, *a: Any, **kw: Any) -> Any:
        name = Path(path).name
        if threading.current_thread() is thread and name.startswith("positions_") and not removing.is_set():
            removing.set()
            assert abandoning.wait(WAIT)  # close() abandons the cache while this removal is under way
        if threading.current_thread() is thread and closed.is_set():
            removed_after.append(name)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(fs, "unlink", unlink)
    before = _names(m)
    m.set_position(pos("B", 2))
    m.save()  # a timed backup, then its prune (max_backups=1): removes the first one
    assert removing.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    try:
        m.close()
    finally:
        closed.set()
        thread.join(WAIT)
    assert not removed_after, (
        f"the background prune removed {removed_after} after close() returned (writer lock released); it had "
        f"{sorted(before)} before"
    )


# --------------------------------------------------------------------------------------------------------------
# 4. A backup named before close()'s deadline whose read-back then fails: close() logs "named ... still ran its
#    check" and returns; the thread then unlinks the named backup and fsyncs the folder the next bot owns (which
#    may already have listed it). Once cancelled, a failed check could leave it for the next prune's quarantine.
# --------------------------------------------------------------------------------------------------------------
def test_a_named_backup_whose_read_back_fails_after_close_is_not_removed_after_close_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    before = _names(m)
    _svc, thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    named, closed = threading.Event(), threading.Event()
    real_probe = _snapcopy.probe
    real_read = fs.read_file

    def probe(path: Any) -> Any:
        if threading.current_thread() is thread:
            named.set()
            closed.wait(WAIT)  # the read-back of a big backup on a slow disk
        return real_probe(path)

    def read_file(path: Any, *a: Any, **kw: Any) -> Any:
        p = Path(path)
        if threading.current_thread() is thread and p.parent == backup_dir and closed.is_set():
            raise OSError(5, "I/O error (the disk returns an error on the read-back)")
        return real_read(path, *a, **kw)

    monkeypatch.setattr(_snapcopy, "probe", probe)
    monkeypatch.setattr(fs, "read_file", read_file)
    m.set_position(pos("B", 2))
    m.save()
    assert named.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    try:
        m.close()
        at_close = _names(m)
    finally:
        closed.set()
        thread.join(WAIT)
    assert at_close - before, "the backup was named when close() returned"
    assert _names(m) == at_close, (
        f"after close() returned the closed manager's thread removed {sorted(at_close - _names(m))} from the folder "
        "the next bot owns"
    )
