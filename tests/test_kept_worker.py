"""Issue 14 (session 12): the compaction worker is kept between compactions and starts the next one from the
document of the snapshot it wrote, when the state file on disk is byte for byte that snapshot (its trailer
checksum, checked against the SHA-256 of its bytes). Failure paths first: a job that fails or refuses leaves
nothing remembered, a file written by anything else is read from disk, a worker that left (idle, killed) is
replaced, a forked child never kills its parent's worker, and the worker of a killed bot exits even while a
forked child holds its pipes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_compaction_process import Spy, _job_for, contracts, four_writers, make, pos, view

from posstate.journal import compactjob as _job
from posstate.journal.jobpipe import IDLE_EXIT
from posstate.manager import procompaction as _proc
from posstate.manager import workers as _workers
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

ROOT = Path(__file__).resolve().parent.parent


class Answers:
    """Test-only: every answer the manager accepted from a worker, and every worker it started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: list[_job.Answer] = []
        self.started: list[_workers.Worker] = []
        real_answer, real_worker = _proc._answer, _proc.Worker
        me = self

        def answer(*a: Any, **kw: Any) -> _job.Answer:
            got = real_answer(*a, **kw)
            me.answers.append(got)
            return got

        class Worker(real_worker):  # type: ignore[misc, valid-type]
            def __init__(self, message: bytes) -> None:
                super().__init__(message)
                me.started.append(self)

        monkeypatch.setattr(_proc, "_answer", answer)
        monkeypatch.setattr(_proc, "Worker", Worker)


def three_changes(m: Any) -> Keyring:
    """Test-only: a saved state, then three journaled changes (S0..S2); returns the manager's keyring."""
    m.save()
    for i in range(3):
        m.set_position(pos(f"S{i}", i + 1))
    ring = m._keyring
    assert ring is not None
    return ring  # type: ignore[no-any-return]


def _compact_once(m: Any, tag: str, n: int = 3) -> None:
    for i in range(n):
        m.set_position(pos(f"{tag}{i}", i + 1))
    # After a save the first record starts a segment in the spare `.next`, which the spare's thread renames
    # over the journal's name; until then no rotation can start and compact() compacts in process (the
    # answers these tests count were then one short, 2 runs in 12).
    j = m._journal
    with j._cond:
        assert j._cond.wait_for(lambda: not j._promote and not j._spare_busy, 60)
    assert m.compact(wait=True)


def _installed(path: Path, answer: _job.Answer) -> None:
    """Test-only: put a worker's temp where the state file is, as the manager's install does."""
    fs.replace(Path(answer.temp_path), path)


def test_a_job_that_fails_after_taking_the_document_leaves_nothing_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (kept worker): the remembered document is taken out before the replay changes it; a job that
    fails after that (here its temp's write) leaves nothing remembered, so the next job reads the file
    (before the take, a half-replayed document would have been used again)."""
    with make(tmp_path) as m:
        ring = three_changes(m)
        snap = _statefile.read(m.path, options=m._read).state.journal  # the sealed segment, at the snapshot's seq
        good = _format.checksum_of(m.path.read_bytes())
        assert good is not None
        kept = _job.Kept()
        job = _job.CompactJob(**{**_job.asdict(_job_for(m, _atomic.temp_name(m.path), [good])), "journal": dict(snap)})
        first = _job.compact(job, ring, kept)
        assert not first.kept
        _installed(m.path, first)
        again = _job.CompactJob(**{**_job.asdict(job), "expected_checksums": [first.checksum]})

        def failing(*a: Any, **kw: Any) -> Any:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as mp:
            mp.setattr(_atomic, "write_temp", failing)
            with pytest.raises(OSError):
                _job.compact(again, ring, kept)
        second = _job.compact(again, ring, kept)
        assert not second.kept  # read from the file: nothing was remembered after the failure
        _installed(m.path, second)
        third = _job.compact(_job.CompactJob(**{**_job.asdict(job), "expected_checksums": [second.checksum]}), ring, kept)
        assert third.kept  # and a job that succeeds remembers again
        memory = m._state.copy()
        loaded = _statefile.parse(Path(third.temp_path).read_bytes(), path=Path(third.temp_path), options=m._read)
        fs.unlink(Path(third.temp_path))
    assert view(loaded.state) == view(memory) and third.positions == 3


def test_a_refused_job_leaves_nothing_remembered_and_another_file_is_read(tmp_path: Path) -> None:
    """issue 14 (kept worker): a job refused after the take (the snapshot names another segment) leaves nothing
    remembered; a state file with another checksum (not the worker's own snapshot) is never matched to it."""
    with make(tmp_path) as m:
        ring = three_changes(m)
        good = _format.checksum_of(m.path.read_bytes())
        assert good is not None
        kept = _job.Kept()
        first = _job.compact(_job_for(m, _atomic.temp_name(m.path), [good]), ring, kept)
        fs.unlink(Path(first.temp_path))  # not installed: the file on disk is still the manager's
        job = _job_for(m, _atomic.temp_name(m.path), [good, first.checksum])
        second = _job.compact(job, ring, kept)
        assert not second.kept  # the file on disk has another checksum: read from disk
        _installed(m.path, second)
        with pytest.raises(_job.Refused, match="does not name the sealed segment"):
            _job.compact(_job.CompactJob(**{**_job.asdict(job), "expected_checksums": [second.checksum]}), ring, kept)
        assert kept.take(job.state_path, second.checksum, encrypted=True) is None


def test_the_next_compaction_starts_from_the_kept_document_and_writes_the_state_at_its_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (kept worker): one worker serves compaction after compaction; from the second on it starts
    from the document it remembered, and each snapshot still decodes to exactly the state in memory at its
    rotation, under four writers; nothing is lost after a reopen."""
    spy, seen = Spy(monkeypatch), Answers(monkeypatch)
    with make(tmp_path, journal_max_records=40) as m:
        m.save()

        four_writers(m, lambda: len(spy.installed) >= 4)
        assert m.compact(wait=True)
        want = contracts(m)
    assert len(spy.installed) >= 4 and spy.in_process == 0
    assert len(seen.started) == 1 and not seen.answers[0].kept and all(a.kept for a in seen.answers[1:])
    for generation, (state, journal) in spy.installed.items():
        assert (state, journal) == spy.at_rotation[generation], generation
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_snapshot_written_in_process_is_read_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (kept worker): after a save() of memory (a snapshot the worker did not write) the next
    compaction reads the file again; the remembered document is never used for another file."""
    seen = Answers(monkeypatch)
    with make(tmp_path) as m:
        m.save()
        _compact_once(m, "A")
        _compact_once(m, "B")
        m.set_position(pos("C0", 9))
        m.save()
        _compact_once(m, "D")
        want = contracts(m)
    assert [a.kept for a in seen.answers] == [False, True, False] and len(seen.started) == 1
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_the_kept_worker_leaves_when_idle_and_a_new_one_takes_the_next_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (kept worker): a worker waiting longer than WORKER_IDLE for its next job exits (status
    IDLE_EXIT) and gives its memory back; the next compaction starts a new one, with no error."""
    monkeypatch.setattr(_proc, "WORKER_IDLE", 0.2)
    seen = Answers(monkeypatch)
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        _compact_once(m, "A")
        assert seen.started[0].proc.wait(60) == IDLE_EXIT
        _compact_once(m, "B")
        want = contracts(m)
    assert errors == [] and len(seen.started) == 2 and [a.kept for a in seen.answers] == [False, False]
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_job_handed_over_as_the_worker_leaves_goes_to_a_fresh_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (kept worker): a job written just as the kept worker left (idle) gets no answer and the status
    IDLE_EXIT: a fresh worker takes it at once, not counted as a failure (no error event, no retry pause)."""
    monkeypatch.setattr(_proc, "WORKER_IDLE", 0.2)
    seen = Answers(monkeypatch)
    real_reuse = _workers.Worker.reuse

    def racing(self: _workers.Worker, message: bytes) -> bool:  # the check saw it alive; it left right after
        self.proc.wait(60)
        self._message = message
        return True

    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        _compact_once(m, "A")
        monkeypatch.setattr(_workers.Worker, "reuse", racing)
        _compact_once(m, "B")
        monkeypatch.setattr(_workers.Worker, "reuse", real_reuse)
        want = contracts(m)
    assert errors == [] and len(seen.started) == 2
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_close_kills_and_reaps_the_kept_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (kept worker): close() ends the kept worker (it holds a decoded copy of the state) and reaps
    it; a worker killed meanwhile (a save giving a job up, the OOM killer) is replaced at the next job."""
    seen = Answers(monkeypatch)
    with make(tmp_path) as m:
        m.save()
        _compact_once(m, "A")
        first = seen.started[0]
        first.proc.kill()  # as the kernel's OOM killer would
        first.proc.wait(60)
        _compact_once(m, "B")
        second = seen.started[1]
        assert second.proc.poll() is None
    assert second.proc.returncode is not None  # reaped by close()
    assert len(seen.started) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_never_kills_its_parents_kept_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (kept worker, forked child): a child the bot forks inherits the worker's handle; dropping it
    there (its garbage collector, its exit) must not kill the parent's worker: the reaper only acts in the
    process that started it."""
    seen = Answers(monkeypatch)
    with make(tmp_path) as m:
        m.save()
        _compact_once(m, "A")
        worker = seen.started[0]
        pid = os.fork()
        if pid == 0:  # the child: what its collector or exit runs for the inherited handle
            try:
                worker._reaper()
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert worker.proc.poll() is None
        _compact_once(m, "B")
        want = contracts(m)
    assert len(seen.started) == 1 and seen.answers[-1].kept
    with make(tmp_path) as m:
        assert contracts(m) == want


_BOT = """
import os, signal, sys
from decimal import Decimal
from pathlib import Path
from posstate import PositionStateManager, StateConfig, Position
from posstate.manager import procompaction
procompaction.WORKER_IDLE = 3600.0  # so that only its manager's death ends the worker
m = PositionStateManager(StateConfig.in_dir(Path(sys.argv[1]), backup_interval=1e9, journal_max_records=5), key=bytes(range(32)))
m.save()
for i in range(3):
    m.set_position(Position(symbol=f"S{i}", side="long", contracts=Decimal(i + 1), entry_price=Decimal(100)))
m.compact(wait=True)
child = os.fork()
if child == 0:  # holds copies of the worker's pipes, so the worker never sees an end of file
    signal.pause()
    os._exit(0)
print(m._kept.proc.pid, child, flush=True)
signal.pause()
"""


def test_the_worker_of_a_killed_bot_exits_while_a_forked_child_holds_its_pipes(tmp_path: Path) -> None:
    """issue 14 (kept worker, SIGKILL + forked child): the bot is killed while its worker waits for the next
    job and a child it forked holds copies of the worker's pipes: the worker notices its parent is gone and
    exits instead of waiting for an end of file for ever, holding the state."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bot = subprocess.Popen([sys.executable, "-c", _BOT, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True)
    child = None
    try:
        assert bot.stdout is not None
        worker, child = (int(x) for x in bot.stdout.readline().split())
        bot.send_signal(signal.SIGKILL)
        bot.wait(60)
        # The worker is the bot's child, now another process's (its reaper's): wait for it to be gone.
        gone = threading.Event()
        for _ in range(6000):
            try:
                state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                gone.set()
                break
            if state == "Z":
                gone.set()
                break
            gone.wait(0.02)
        assert gone.is_set()
    finally:
        if bot.poll() is None:
            bot.kill()
        if bot.stdout is not None:
            bot.stdout.close()
        bot.wait(60)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    with make(tmp_path) as m:
        assert contracts(m) == {"S0": 1, "S1": 2, "S2": 3}


def test_the_kept_document_is_never_used_for_another_state_file(tmp_path: Path) -> None:
    """issue 14 (kept worker): the document is remembered with its state file's path: the same bytes at
    another path are read from disk (one worker serves one manager; this holds if that ever changes)."""
    kept = _job.Kept()
    kept.put(str(tmp_path / "a.json"), "ab" * 32, encrypted=True, doc={"positions": {}})
    assert kept.take(str(tmp_path / "b.json"), "ab" * 32, encrypted=True) is None
    kept.put(str(tmp_path / "a.json"), "ab" * 32, encrypted=False, doc={"positions": {}})
    assert kept.take(str(tmp_path / "a.json"), "ab" * 32, encrypted=True) is None  # never a plaintext one when encrypting
