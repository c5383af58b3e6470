"""Sixth attack on session 15's lock order (commit 1cbb1dc): close() marks the backup cancelled before it tries
the gate; `_ran` tells a taken backup from one cancelled before its name; each temp removal under the gate."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import pos
from test_lock_order import saved_with_a_timed_backup, the_backup_thread

from posstate import PositionStateManager
from posstate.backup import background as _background
from posstate.backup import snapcopy as _snapcopy
from posstate.backup import viacompaction as _via
from posstate.storage import fileops as fs

WAIT = 20.0  # a bound for a thread that would deadlock, never a measured time


def _names(m: PositionStateManager) -> set[str]:
    return {p.name for p in m.config.backup_path.glob("positions_*")}


# --------------------------------------------------------------------------------------------------------------
# 1. The gate covers the link only. Once `_place` linked the name and released the gate, the backup thread
#    still fsyncs the folder, probes and reads the backup back and inspects it (seconds on a big state or a slow
#    disk) before `_took` sets `_ran`. close() past its deadline in that window: `_cancelled` set, `_ran` False,
#    the gate free at once -> "cancelled before it got its name: no backup was added" (+ backupFailed). The
#    thread then finishes, `_took` emits backupCreated: the backup IS there, named before close() began its
#    cancellation. Acquiring the gate no longer proves anything about the name (cancelled is set before it).
# --------------------------------------------------------------------------------------------------------------
def test_close_past_its_deadline_does_not_report_a_backup_named_before_its_read_back_as_not_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    before = _names(m)
    _svc, thread = the_backup_thread(m)
    named, release = threading.Event(), threading.Event()
    real_probe = _snapcopy.probe

    def probe(path: Any) -> Any:
        if threading.current_thread() is thread:
            named.set()  # linked: the name is in the folder; the read-back is slow (big state, slow disk)
            release.wait(WAIT)
        return real_probe(path)

    monkeypatch.setattr(_snapcopy, "probe", probe)
    m.set_position(pos("B", 2))
    m.save()  # a timed backup (backup_interval=0)
    assert named.wait(WAIT)
    assert _names(m) - before, "the backup has its name before close() is called"
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)  # a bound, not a measured time
    try:
        m.close()
    finally:
        release.set()
        thread.join(WAIT)
    added = _names(m) - before
    closes = [str(r.get("reason")) for r in reports if r.get("operation") == "close"]
    assert not (added and any("no backup was added" in r for r in closes)), (
        f"close() reported 'no backup was added', yet backup {sorted(added)} was named before close() began "
        f"(only its read-back was still running) and stays: {closes}"
    )


# --------------------------------------------------------------------------------------------------------------
# 2. The same window on the memory fallback (viacompaction.from_memory -> backups.write_backup ->
#    _write_verified): write_new_file names the backup under the gate, then the read-back and the sliced parse
#    of the whole state (O(state), with pauses: the longest step) run with `_ran` still False.
# --------------------------------------------------------------------------------------------------------------
def test_close_past_its_deadline_does_not_report_a_memory_fallback_backup_being_verified_as_not_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    before = _names(m)
    svc, thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    named, release = threading.Event(), threading.Event()
    real_read = fs.read_file

    def read_file(path: Any, *a: Any, **kw: Any) -> Any:
        p = Path(path)
        if threading.current_thread() is thread and p.parent == backup_dir and p.name.startswith("positions_"):
            named.set()  # write_new_file linked it; now the read-back and the sliced check (slow)
            release.wait(WAIT)
        return real_read(path, *a, **kw)

    monkeypatch.setattr(fs, "read_file", read_file)
    # The compactions a timed backup waits for keep failing: memory is backed up instead (the fallback).
    monkeypatch.setattr(_via, "decide", lambda svc: "memory")
    m.set_position(pos("B", 2))  # journaled: memory ahead of the durable snapshot
    assert svc.request()
    assert named.wait(WAIT)
    assert _names(m) - before
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    try:
        m.close()
    finally:
        release.set()
        thread.join(WAIT)
    added = _names(m) - before
    closes = [str(r.get("reason")) for r in reports if r.get("operation") == "close"]
    assert not (added and any("no backup was added" in r for r in closes)), (
        f"close() reported 'no backup was added', yet the fallback backup {sorted(added)} was named under the gate "
        f"before close() began and stays: {closes}"
    )


# --------------------------------------------------------------------------------------------------------------
# 3. `_run_one` sets `_ran = True` after `_once()` returns whatever it did -- a failed backup, a cancelled one,
#    a skipped one -- and only then do the deferred events go out. A timed backup that FAILED (backupFailed on
#    the backup thread) whose handler (alerting, say) runs past CLOSE_TIMEOUT makes close() log "a background
#    backup's prune or event handlers still ran ... (its backup was taken)": no backup was taken.
# --------------------------------------------------------------------------------------------------------------
def test_close_past_its_deadline_does_not_report_a_failed_timed_backup_as_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = saved_with_a_timed_backup(tmp_path)
    _svc, thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    real_link = fs.link

    def link(src: Any, dst: Any) -> None:
        if threading.current_thread() is thread and Path(dst).parent == backup_dir:
            raise OSError(5, "I/O error (a failing disk)")
        real_link(src, dst)

    monkeypatch.setattr(fs, "link", link)
    failed, release = threading.Event(), threading.Event()

    def on_failed(e: dict[str, Any]) -> None:
        if threading.current_thread() is thread:
            failed.set()
            release.wait(WAIT)  # the application pages someone: longer than close()'s deadline

    m.on("backupFailed", on_failed)
    created_on_thread: list[dict[str, Any]] = []
    m.on("backupCreated", lambda e: created_on_thread.append(e) if threading.current_thread() is thread else None)
    m.set_position(pos("B", 2))
    m.save()  # a timed backup: its link fails, backupFailed goes out on the backup thread
    assert failed.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    caplog.set_level(logging.WARNING, logger="posstate")
    try:
        m.close()
    finally:
        release.set()
        thread.join(WAIT)
    assert not created_on_thread  # the timed backup was not taken (the close backup, on this thread, may be)
    said = [r.getMessage() for r in caplog.records if "close:" in r.getMessage()]
    assert not any("its backup was taken" in s for s in said), (
        f"close() said the timed backup was taken, but it failed (its link raised) and no backup was added: {said}"
    )


# --------------------------------------------------------------------------------------------------------------
# 4. cancelled() is looked at only under the gate, at the sweeps and at the link. A backup cancelled while it
#    reads and checks the state file (close() past its deadline: "no backup was added", the writer lock
#    released) goes on after close() returned: ensure_dir, then `_place`'s write_temp writes and fsyncs a whole
#    copy of the state into the folder the next bot now owns, and only then finds itself cancelled at the link
#    and removes it. Nothing but its own temp, but an O(state) write into another process's folder after
#    close() returned (on a stuck or full disk, the next bot's disk); one cancelled() check before write_temp
#    (and before ensure_dir) avoids it.
# --------------------------------------------------------------------------------------------------------------
def test_a_backup_cancelled_while_it_reads_the_state_file_writes_nothing_in_the_folder_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from posstate.storage import atomic as _atomic
    from posstate.storage import statefile as _statefile

    m = saved_with_a_timed_backup(tmp_path)
    _svc, thread = the_backup_thread(m)
    backup_dir = m.config.backup_path
    reading, closed = threading.Event(), threading.Event()
    written_after_close: list[str] = []
    real_read_bytes, real_write_temp = _statefile.read_bytes, _atomic.write_temp

    def read_bytes(path: Any, *a: Any, **kw: Any) -> Any:
        if threading.current_thread() is thread and not reading.is_set():
            reading.set()  # the copy reads the state file (slow: a big state, a slow disk)
            closed.wait(WAIT)
        return real_read_bytes(path, *a, **kw)

    def write_temp(target: Path, data: bytes, **kw: Any) -> Path:
        if threading.current_thread() is thread and closed.is_set() and Path(target).parent == backup_dir:
            written_after_close.append(Path(target).name)
        return real_write_temp(target, data, **kw)

    monkeypatch.setattr(_statefile, "read_bytes", read_bytes)
    monkeypatch.setattr(_atomic, "write_temp", write_temp)
    m.set_position(pos("B", 2))
    m.save()
    assert reading.wait(WAIT)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    reports: list[dict[str, Any]] = []
    m.on("backupFailed", reports.append)
    try:
        m.close()
    finally:
        closed.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    closes = [str(r.get("reason")) for r in reports if r.get("operation") == "close"]
    assert any("no backup was added" in r for r in closes)
    assert not written_after_close, (
        f"close() returned ('{closes[-1]}') and released the writer lock, then the cancelled backup wrote a temp "
        f"copy of the whole state ({written_after_close}) into the folder before it looked at cancelled()"
    )
