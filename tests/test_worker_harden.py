"""Issue 14 (session 13): the worker processes, hardened. A worker's memory is not readable by another process
of the same user (``PR_SET_DUMPABLE`` 0, Linux), a kept worker that left idle is reaped and its pipes closed
without waiting for the next compaction, a kept worker stopped while it waits is replaced rather than handed a
job it would never answer, and a prune's checks of thousands of backups fit the answer's limit. Real worker
processes throughout; nothing here sleeps to wait for another thread or asserts a time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backup_links import linked_backups
from test_compaction_process import contracts, make, pos
from test_kept_worker import Answers

ROOT = Path(__file__).resolve().parent.parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")

#: Run in a child: it gives up CAP_SYS_PTRACE (for good: bounding, permitted and effective sets; nothing to
#: give up when not root), starts a worker, waits until the worker's main() began (it ignores SIGINT after its
#: first steps: posstate/journal/jobpipe.py prepare_process), then tries to open the worker's memory as any
#: other process of the same user would.
_READER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if os.geteuid() == 0:
    assert libc.prctl(24, 19, 0, 0, 0) == 0  # PR_CAPBSET_DROP CAP_SYS_PTRACE: the worker is started without it
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    assert libc.capget(hdr, data) == 0
    data[0] &= ~(1 << 19)
    data[1] &= ~(1 << 19)
    assert libc.capset(hdr, data) == 0
from posstate.manager.workers import Worker
w = Worker(b"", module=sys.argv[1])
status = f"/proc/{w.proc.pid}/status"
try:
    while True:
        assert w.proc.poll() is None, "the worker exited"
        with open(status) as f:
            ignored = int(next(x for x in f.read().splitlines() if x.startswith("SigIgn:")).split()[1], 16)
        if ignored & (1 << (signal.SIGINT - 1)):
            break
        os.sched_yield()
    try:
        os.close(os.open(f"/proc/{w.proc.pid}/mem", os.O_RDONLY))
        print("readable")
    except PermissionError:
        print("denied")
finally:
    w.discard()
"""


@linux_only
@pytest.mark.parametrize("module", ["posstate.journal.compactjob", "posstate.backup.checkjob"], ids=["compaction", "check"])
def test_another_process_of_the_same_user_cannot_read_a_workers_memory(module: str) -> None:
    """issue 14 (session 13, point 1): a worker holds the key (a kept one, freed copies of it for as long as it
    lives): it makes itself not dumpable before it reads its job, so /proc/<pid>/mem is closed to every process
    of the same user without CAP_SYS_PTRACE (and no core file is written, whatever handles cores)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _READER, module], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "denied"


def _proc_state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2 :][:1].decode()


def _compact(m: Any, tag: str, *, timeout: float = 120.0) -> bool:
    """Three changes, then a compaction waited for at most *timeout* seconds (True: done)."""
    for i in range(3):
        m.set_position(pos(f"{tag}{i}", i + 1))
    j = m._journal  # after a save, no rotation until the spare is promoted (test_kept_worker._compact_once)
    with j._cond:
        assert j._cond.wait_for(lambda: not j._promote and not j._spare_busy, 60)
    return bool(m.compact(wait=True, timeout=timeout))


@linux_only
def test_a_kept_worker_stopped_while_it_waits_is_replaced_not_handed_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (session 13, point 4): a kept worker stopped while it waits (SIGSTOP, a debugger) would answer
    only once resumed, and its compaction would wait WORKER_TIMEOUT (600 s) before it is retried: its state is
    read before the job is handed over (/proc/<pid>/stat), and a stopped one is killed, reaped and replaced."""
    seen = Answers(monkeypatch)
    errors: list[dict[str, Any]] = []
    m = make(tmp_path)
    first = None
    try:
        m.on("error", errors.append)
        m.save()
        assert _compact(m, "A")
        first = seen.started[0]
        os.kill(first.proc.pid, signal.SIGSTOP)
        while _proc_state(first.proc.pid) != "T":
            os.sched_yield()
        assert _compact(m, "B", timeout=60)  # before: False (the stopped worker had the job)
        assert len(seen.started) == 2 and first.proc.returncode == -signal.SIGKILL  # killed and reaped
        want = contracts(m)
    finally:
        if first is not None and first.proc.poll() is None:
            os.kill(first.proc.pid, signal.SIGCONT)
        m._close_wait = 0.0
        m.close()
    assert errors == []
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_prune_checks_thousands_of_backups_in_workers_within_the_answer_limit(tmp_path: Path) -> None:
    """issue 14 (session 13, point 3): a check worker's answer is read only up to MAX_MESSAGE (1 MiB); one
    job for every backup a bot never verified made it too large from about 3,500 backups (and the worker
    checked only its first 4,096 files), so every prune after a restart failed. The files go in jobs of
    CHECK_CHUNK, each answer bounded: 4,500 backups (hard links of one small backup) all get a worker's
    verdict, none is checked in the bot's process."""
    from posstate.backup import verified as _verified
    from posstate.manager import procheck as _procheck

    n = 4500
    folder, options = linked_backups(tmp_path, n)
    checks = _procheck.WorkerChecks()
    cache = _verified.VerifiedCache(remote=checks)
    infos = _verified.check_all(folder, options=options, cache=cache)
    assert len(infos) == n and all(i.valid for i in infos)
    assert cache.worker_checks == n and cache.full_checks == n  # every verdict came from a worker
    assert checks.jobs == -(-n // _procheck.CHECK_CHUNK)


def test_a_check_jobs_worst_answer_and_its_paths_fit_the_message_limit(tmp_path: Path) -> None:
    """issue 14 (session 13, point 3): the bound CHECK_CHUNK relies on: CHECK_CHUNK verdicts of the longest
    backup name and the largest probe fit MAX_MESSAGE; and long paths cut a job before its paths reach half
    of it."""
    import orjson

    from posstate.backup.verified import Probe
    from posstate.journal.jobpipe import MAX_MESSAGE, frame
    from posstate.manager import procheck as _procheck
    from posstate.storage import container as _format

    big = 2**63 - 1
    worst = {"name": "positions_20260101_000000_999999.json", "valid": True}
    worst["probe"] = ["ff" * _format.TRAILER_SIZE, big, big, big, big]
    answer = frame(orjson.dumps({"ok": True, "verdicts": [worst] * _procheck.CHECK_CHUNK}))
    assert len(answer) <= MAX_MESSAGE
    seen = Probe(trailer=b"\0" * _format.TRAILER_SIZE, size=1, mtime_ns=1, ctime_ns=1, inode=1)
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    files = [(f"positions_20260101_000000_{i}.json", deep / f"positions_20260101_000000_{i}.json", seen) for i in range(2, 3002)]
    parts = _procheck.chunks(files)
    assert [x for p in parts for x in p] == files
    for part in parts:
        assert len(part) <= _procheck.CHECK_CHUNK
        assert len(orjson.dumps([str(p) for _, p, _ in part])) <= MAX_MESSAGE // 2
    assert len(parts) > -(-len(files) // _procheck.CHECK_CHUNK)  # cut by the paths' bytes, not only by count


def test_a_kept_worker_that_left_idle_is_reaped_and_its_pipes_closed_before_the_next_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (session 13, point 2): a kept worker that exits after WORKER_IDLE is reaped, and its three
    pipes closed in the bot, by the one watcher thread of the process (posstate/manager/idlewatch.py), not
    at the next compaction or close() (before: a zombie, with three descriptors open, for as long as the bot
    made no compaction); the next compaction starts a new worker with no error."""
    from posstate.journal.jobpipe import IDLE_EXIT
    from posstate.manager import procompaction as _proc

    monkeypatch.setattr(_proc, "WORKER_IDLE", 0.2)
    seen = Answers(monkeypatch)
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        assert _compact(m, "A")
        first = seen.started[0]
        assert _until(lambda: first.proc.returncode is not None, 60)  # reaped by someone else than this test
        assert first.proc.returncode == IDLE_EXIT
        streams = (first.proc.stdin, first.proc.stdout, first.proc.stderr)
        assert _until(lambda: all(s is not None and s.closed for s in streams), 60)
        assert _compact(m, "B")
        want = contracts(m)
    assert errors == [] and len(seen.started) == 2
    from posstate.manager import idlewatch

    assert _until(lambda: idlewatch._thread is None, 60)  # closed: nothing to watch, and the thread ended
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_the_watchers_event_for_a_worker_handed_a_job_since_is_ignored() -> None:
    """issue 14 (session 13, point 2): the watcher's event names the job the worker answered last; once the
    next job is handed over (reuse) an event seen before is stale and never reaps the worker under the job
    (its pipes stay open for the thread that reads its answer)."""
    from posstate.manager import workers as _workers

    w = _workers.Worker(b"")
    try:
        stale = w._token
        assert w.reuse(b"")
        w.left_idle(stale)
        assert w.proc.poll() is None and not w.killed
        assert w.proc.stdout is not None and not w.proc.stdout.closed
    finally:
        w.discard()
    assert w.proc.returncode is not None and w.proc.stdout.closed


def _until(cond: Any, timeout: float) -> bool:
    """Test-only: *cond()* became true within *timeout* seconds (checked every 10 ms; no time is asserted)."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True
