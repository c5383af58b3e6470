"""Issue 14 attack (session 12, the kept compaction worker): what an outside reviewer found in the worker kept
between compactions and the framed pipes to it. Failure paths only; each test failed before its fix."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from test_compaction_process import contracts, make, pos

from posstate.journal import compactjob as _job
from posstate.manager import workers as _workers
from posstate.storage import fileops as fs

ROOT = Path(__file__).resolve().parent.parent


def test_close_past_its_deadline_never_closes_the_pipes_the_compaction_thread_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (kept worker, close): close() past its deadline kills the kept worker while the
    compaction thread still waits for its answer; the pipes are closed by that thread once it is done with
    them, never under it (before: close() closed them at once, and the thread, woken by the kill, read
    from whatever file the bot opened next under the same descriptor numbers)."""
    monkeypatch.setenv(_job.TEST_HOOK, "hang@read")
    woke, closed = threading.Event(), threading.Event()
    real = _workers.selectors.DefaultSelector

    class Gated(real):  # type: ignore[misc, valid-type]
        def select(self, timeout: float | None = None) -> Any:
            events = super().select(timeout)
            if events and woke.is_set():  # the worker was killed: hold the thread until close() returned
                closed.wait(30)
            return events

    monkeypatch.setattr(_workers.selectors, "DefaultSelector", Gated)
    errors: list[dict[str, Any]] = []
    m = make(tmp_path)
    m.on("error", errors.append)
    m.save()
    for i in range(6):
        m.set_position(pos(f"S{i}", i + 1))
    job = m._bg_job
    assert job is not None
    for _ in range(6000):  # the worker has its job and hangs in it
        if job.worker is not None:
            break
        closed.wait(0.01)
    worker, thread = job.worker, m._bg_thread
    assert worker is not None and thread is not None
    m._close_wait = 0.0
    woke.set()
    m.close()
    probe = tmp_path / "probe"
    probe.write_bytes(b"the bot's own file\n" * 100)
    fds = [fs.open_(probe, os.O_RDONLY) for _ in range(3)]  # the lowest free numbers: the pipes' if closed
    try:
        closed.set()
        thread.join(60)
        assert not thread.is_alive()
        assert [os.lseek(fd, 0, os.SEEK_CUR) for fd in fds] == [0, 0, 0]  # nothing read from the bot's file
    finally:
        for fd in fds:
            fs.close(fd)
    assert worker.proc.returncode == -9
    assert all(s is None or s.closed for s in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr))
    assert errors == []
    monkeypatch.delenv(_job.TEST_HOOK)
    with make(tmp_path) as m2:
        assert contracts(m2) == {f"S{i}": i + 1 for i in range(6)}
