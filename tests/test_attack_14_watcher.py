"""Issue 14 attack (session 13): the one watcher thread of the process that reaps kept workers which left while
they waited (posstate/manager/idlewatch.py). It must survive whatever one worker's reaping raises, and a
watcher that cannot be started must never cost the compaction whose answer was already read."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_compaction_process import contracts, make
from test_kept_worker import Answers
from test_worker_harden import _compact, _until

from posstate.manager import idlewatch


class _Fake:
    """Test-only: a watched worker whose left_idle records the call (and raises when told to)."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.called = threading.Event()

    def left_idle(self, token: int) -> None:
        self.called.set()
        if self.fail:
            raise RuntimeError("unexpected")


def _exited() -> subprocess.Popen[bytes]:
    """A process whose stdout is at its end of file as soon as it exits (readable for the watcher)."""
    return subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)


def _release(procs: list[Any]) -> None:
    """No longer watched, reaped, their stdout closed."""
    for p in procs:
        idlewatch.forget(p)
        p.wait(30)
        assert p.stdout is not None
        p.stdout.close()


def test_the_watcher_goes_on_after_one_workers_reaping_raises(caplog: pytest.LogCaptureFixture) -> None:
    """issue 14 attack (session 13, point 2): an exception out of one worker's reaping ended the watcher thread
    (a traceback on stderr) and left it registered as running: no worker of the process was reaped again
    until it exited. It is logged, and the next worker to leave is reaped."""
    first, second = _Fake(fail=True), _Fake(fail=False)
    procs = [_exited(), _exited()]
    try:
        idlewatch.watch(first, procs[0], 0)
        assert first.called.wait(30)
        idlewatch.watch(second, procs[1], 0)
        assert second.called.wait(30)  # before: never (the thread had died)
    finally:
        _release(procs)
    assert any("idle worker" in r.getMessage() for r in caplog.records)


def test_a_watcher_thread_that_cannot_start_never_fails_the_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 attack (session 13, point 2): a watcher thread that cannot be started (RuntimeError: can't start
    new thread, under a thread or memory limit) raised out of the worker's result() after its answer was read:
    the compaction failed, and the watcher stayed marked as started for the life of the process. The answer is
    used, and the next worker to wait starts the watcher."""
    real = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "posstate-idle-workers":
            raise RuntimeError("can't start new thread")
        real(self)

    Answers(monkeypatch)
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        monkeypatch.setattr(threading.Thread, "start", start)
        assert _compact(m, "A")  # before: False (the compaction failed with the RuntimeError)
        monkeypatch.setattr(threading.Thread, "start", real)
        assert _compact(m, "B")
        assert idlewatch.watched() == 1 and idlewatch._thread is not None and idlewatch._thread.is_alive()
        want = contracts(m)
    assert errors == []
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_watcher_whose_poll_fails_is_started_again(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """issue 14 attack (session 13, point 2): the watcher's poll() failing (ENOMEM) ended the thread with a
    traceback and left it marked as running for the life of the process. It is logged, and the next worker
    to wait starts a new watcher that reaps it."""
    import errno
    import select

    real = select.poll
    failed = threading.Event()

    class _Poll:
        def __init__(self) -> None:
            self.inner = real()

        def register(self, fd: int, mask: int) -> None:
            self.inner.register(fd, mask)

        def poll(self) -> list[tuple[int, int]]:
            if not failed.is_set():
                failed.set()
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            return self.inner.poll()

    class _Select:
        POLLIN = select.POLLIN
        poll = _Poll

    monkeypatch.setattr(idlewatch, "select", _Select)
    first, second = _Fake(fail=False), _Fake(fail=False)
    procs = [_exited(), _exited()]
    try:
        idlewatch.watch(first, procs[0], 0)
        assert failed.wait(30)
        old = idlewatch._thread
        if old is not None:
            old.join(30)
        idlewatch.forget(procs[0])
        idlewatch.watch(second, procs[1], 0)
        assert second.called.wait(30)  # before: never (a dead thread stayed registered)
    finally:
        _release(procs)
    assert any("watcher stopped (OSError, errno 12)" in r.getMessage() for r in caplog.records)


def test_a_kept_worker_stopped_just_after_its_check_is_killed_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (session 13, point 4): a kept worker stopped (SIGSTOP) just after reuse() found it
    running was handed the job and waited on for the whole WORKER_TIMEOUT (600 s), the journal growing. While
    a job waits for its answer the worker's state is read again: stopped at two reads in a row, it is killed
    and the job goes to a fresh worker (no error)."""
    import signal

    from posstate.manager import workers as _workers

    seen = Answers(monkeypatch)
    real = _workers.stopped
    hit: list[int] = []

    def stopped(pid: int) -> bool:
        was = real(pid)
        if not hit:  # the check of reuse(): it found the worker running, then it is stopped
            hit.append(pid)
            os.kill(pid, signal.SIGSTOP)
        return was

    errors: list[dict[str, Any]] = []
    m = make(tmp_path)
    try:
        m.on("error", errors.append)
        m.save()
        assert _compact(m, "A")
        monkeypatch.setattr(_workers, "stopped", stopped)
        assert _compact(m, "B", timeout=60)  # before: False (the stopped worker held the job for 600 s)
        assert hit == [seen.started[0].proc.pid] and seen.started[0].proc.returncode == -signal.SIGKILL
        want = contracts(m)
    finally:
        for w in seen.started:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
        m._close_wait = 0.0
        m.close()
    assert errors == []  # replaced like a worker that left idle: not a failure
    with make(tmp_path) as m:
        assert contracts(m) == want


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_child_forked_while_the_watcher_polls_reaps_its_own_idle_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (session 13, point 2): a child forked (no exec) while the parent's watcher waits in its
    poll has no watcher and none of the parent's workers; a kept worker of a manager it opens itself is still
    reaped by a watcher of its own when it leaves idle, and the parent's worker is untouched."""
    from posstate.journal.jobpipe import IDLE_EXIT
    from posstate.manager import procompaction as _proc

    seen = Answers(monkeypatch)
    with make(tmp_path / "parent") as m:
        m.save()
        assert _compact(m, "A")
        assert idlewatch.watched() == 1 and idlewatch._thread is not None
        parent_worker = seen.started[0]
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                _proc.WORKER_IDLE = 0.2
                assert idlewatch.watched() == 0 and idlewatch._thread is None
                with make(tmp_path / "child") as c:
                    c.save()
                    assert _compact(c, "C")
                    mine = seen.started[-1]
                    assert mine is not parent_worker
                    assert _until(lambda: mine.proc.returncode is not None, 60)
                    assert mine.proc.returncode == IDLE_EXIT and mine.proc.stdout is not None
                    assert _until(lambda: mine.proc.stdout.closed, 60)  # type: ignore[union-attr]
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parent_worker.proc.poll() is None and idlewatch.watched() == 1
