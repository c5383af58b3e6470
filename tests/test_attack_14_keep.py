"""Issue 14 attack (session 12, the kept compaction worker): what an outside reviewer found in the worker kept
between compactions and the framed pipes to it. Failure paths only; each test failed before its fix."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_compaction_process import _job_for, contracts, make, pos
from test_kept_worker import three_changes

from posstate.journal import compactjob as _job
from posstate.journal.jobpipe import frame
from posstate.manager import workers as _workers
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
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


_IDLE_DRIVER = """
import sys, threading
from posstate.journal import compactjob as cj

MARK = sys.argv.pop(1)
answered = threading.Event()
real_answer = cj.answer


def answer(out):
    ok = real_answer(out)
    answered.set()
    return ok


cj.answer = answer
main = threading.get_ident()


def holds(value):
    if isinstance(value, (bytes, bytearray)):
        return MARK.encode() in value
    if isinstance(value, str):
        return MARK in value
    if isinstance(value, (list, tuple)):
        return any(holds(v) for v in value)
    if isinstance(value, dict):
        return any(holds(k) or holds(v) for k, v in value.items())
    return False


def watch():
    answered.wait(60)
    pause = threading.Event()  # never set: a 10 ms wait between looks
    for _ in range(6000):  # until the main thread waits for the next job
        frame = sys._current_frames()[main]
        if frame.f_code.co_name == "next":
            break
        pause.wait(0.01)
    found = []
    while frame is not None and frame.f_code.co_name != "<module>":  # (this driver's own globals hold MARK)
        for name, value in frame.f_locals.items():
            if holds(value) or holds(getattr(value, "__dict__", None)):
                found.append(f"{frame.f_code.co_name}.{name}")
        frame = frame.f_back
    sys.stderr.write("held: " + ",".join(found) + "\\n")
    sys.stderr.flush()
    import os
    os._exit(0)


threading.Thread(target=watch, daemon=True).start()
sys.exit(cj.main())
"""


def test_the_kept_worker_holds_no_job_bytes_while_it_waits_for_the_next_job(tmp_path: Path) -> None:
    """issue 14 attack (kept worker, secrets): once a job is answered, nothing the kept worker still
    references while it waits (up to WORKER_IDLE) holds that job's key material (before: the job's bytes,
    keys included, stayed bound in its main loop until the next job arrived)."""
    mark = bytes(range(32)).hex()
    spec = _job.CompactJob(
        state_path=str(tmp_path / "none.json"),  # no such file: the job is refused, and the worker waits on
        journal_path=str(tmp_path / "none.json.journal"),
        temp_path=str(tmp_path / "none.json.tmp"),
        expected_checksums=[],
        segment_id="00" * 16,
        last_seq=1,
        generation=2,
        journal={"id": "11" * 16, "seq": 1},
        written_at_ms=0,
        writer={},
        tombstone_floor=None,
        compression_level=None,
        encrypt=True,
        max_document_bytes=1 << 20,
        clock_skew=300.0,
        parent_pid=os.getpid(),
        idle_s=60.0,
    )
    job = frame(orjson.dumps({"job": dataclasses.asdict(spec), "keys": {"key": mark}}))
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _IDLE_DRIVER, mark],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(job)  # and left open: the worker answers, then waits for the next job
        proc.stdin.flush()
        err = proc.stderr.read()  # the driver ends the worker once it has looked
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    assert orjson.loads(out[out.index(b"\n") + 1 :])["ok"] is False  # one answer: refused
    held = err.decode().strip().splitlines()[-1]
    assert held == "held:", held


_SIGPIPE_BOT = """
import signal, sys
from posstate.journal.jobpipe import frame
from posstate.manager.workers import Worker, WorkerFailed

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line programs do
# A job larger than the pipe: the worker's end is closed (it died) before the rest of it is written.
worker = Worker(frame(b"x" * (1 << 20)), module="closes_its_stdin")
try:
    worker.result(60, keep=True)
except WorkerFailed as exc:
    print("WorkerFailed:", exc, flush=True)
worker.discard()
print("alive", flush=True)
"""


def test_a_bot_with_sigpipe_default_survives_a_worker_gone_while_its_job_is_written(tmp_path: Path) -> None:
    """issue 14 attack (worker pipes, EPIPE): a bot that set SIGPIPE back to its default action gets
    WorkerFailed when a worker's end of the pipe closes while its job is being written (before: the write
    raised SIGPIPE on the compaction thread and the signal ended the whole bot)."""
    (tmp_path / "closes_its_stdin.py").write_text("import os, time\nos.close(0)\ntime.sleep(2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    done = subprocess.run([sys.executable, "-c", _SIGPIPE_BOT], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.splitlines() == ["WorkerFailed: exited with code 0 (0 bytes on stderr, not shown)", "alive"]


def test_the_pipe_writers_sigpipe_guard_works_where_sigtimedwait_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (worker pipes, macOS): where the signal module has no ``sigtimedwait`` (macOS), the
    SIGPIPE guard still restores the thread's mask and a worker gone mid-job is WorkerFailed (before: every
    exchange with a worker raised AttributeError, which is no worker failure, so the job was retried through
    a worker for ever and the journal never compacted)."""
    (tmp_path / "closes_its_stdin.py").write_text("import os, time\nos.close(0)\ntime.sleep(2)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(tmp_path)]))
    monkeypatch.delattr(signal, "sigtimedwait", raising=False)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    worker = _workers.Worker(frame(b"x" * (1 << 20)), module="closes_its_stdin")
    try:
        with pytest.raises(_workers.WorkerFailed, match="exited with code 0"):
            worker.result(60, keep=True)
    finally:
        worker.discard()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_the_remembered_snapshot_put_back_behind_the_managers_back_is_refused(tmp_path: Path) -> None:
    """issue 14 attack (kept worker, guard; it passes on s12-keep): a state file that is byte for byte the
    snapshot the kept worker remembers (a backup or `.bak` of it copied back while the manager moved on) is
    refused unless the manager wrote or loaded it: the remembered document never stands in for a file the
    manager does not expect (the expected-checksum check comes before the remembered document)."""
    with make(tmp_path) as m:
        ring = three_changes(m)
        mine = m.path.read_bytes()
        good = _format.checksum_of(mine)
        assert good is not None
        kept = _job.Kept()
        first = _job.compact(_job_for(m, _atomic.temp_name(m.path), [good]), ring, kept)
        remembered = Path(first.temp_path).read_bytes()
        fs.unlink(Path(first.temp_path))
        m.path.write_bytes(remembered)  # put in place behind the manager's back
        with pytest.raises(_job.Refused, match="not the one the manager wrote or loaded"):
            _job.compact(_job_for(m, _atomic.temp_name(m.path), [good]), ring, kept)
        assert _atomic.stale_temps(m.path) == []
        m.path.write_bytes(mine)  # the manager's own file back before close()


def _settled(m: Any) -> None:
    """Test-only: the segment a save started in the spare is renamed (else compact() compacts in process)."""
    j = m._journal
    with j._cond:
        assert j._cond.wait_for(lambda: not j._promote and not j._spare_busy, 60)


def test_an_unexpected_error_while_waiting_for_the_answer_leaves_no_worker_busy_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (kept worker): an error that is no worker failure while the thread waits for the
    answer (here a MemoryError once the job is written) ends the kept worker before its temp is removed:
    no worker goes on with a job nobody waits for (before: it wrote its temp after the manager had removed
    it, a leftover, and its stale answer failed the next compaction with an `error` event)."""
    real = _workers._exchange
    calls: list[int] = []

    def failing(proc: Any, message: bytes, deadline: float, *, close_after: bool) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second job: handed to the kept worker, then the thread fails
            fs.write_all(proc.stdin.fileno(), message)
            raise MemoryError
        return real(proc, message, deadline, close_after=close_after)

    monkeypatch.setattr(_workers, "_exchange", failing)
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        for tag in "ABC":
            for i in range(3):
                m.set_position(pos(f"{tag}{i}", i + 1))
            _settled(m)
            try:
                m.compact(wait=True)
            except MemoryError:
                assert tag == "B"
        m.compact(wait=True)
        want = contracts(m)
        left = _atomic.stale_temps(m.path)
    assert left == []
    assert len(errors) == 1, errors  # the attempt that failed; none for a stale answer
    with make(tmp_path) as m2:
        assert contracts(m2) == want
