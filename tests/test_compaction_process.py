"""Issue 14 (cause 2 of the tail): the background compaction's O(state) work runs in a worker process, a pure
function of the snapshot on disk and the sealed segment (posstate/journal/compactjob.py), and the manager
installs the temp it wrote (posstate/manager/procompaction.py). Real worker processes throughout; a step of
the worker is hit through its test-only hook (``POSSTATE_TEST_COMPACT_WORKER``). Nothing here sleeps to wait
for another thread or asserts a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import ConfigError, PositionStateManager, PosStateError, StateConfig
from posstate.journal import compactjob as _job
from posstate.journal.files import next_path
from posstate.journal.spare import SPARE_THREAD
from posstate.manager import procompaction as _proc
from posstate.manager.compaction import BackgroundCompaction
from posstate.model import document as _document
from posstate.model import merge as _merge
from posstate.model.document import StateData
from posstate.model.position import Position
from posstate.selftest.harness import MUTATING, Fault, HarnessOps
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
BG = "posstate-compact"
ROOT = Path(__file__).resolve().parent.parent


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def make(d: Path, *, key: bytes | None = KEY, passphrase: str | None = None, **kw: Any) -> PositionStateManager:
    kw.setdefault("journal_max_records", 5)
    kw.setdefault("compaction", "process")
    return PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, **kw), key=key, passphrase=passphrase)


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


def temps(m: PositionStateManager) -> list[Path]:
    return _atomic.stale_temps(m.path)


def view(st: StateData) -> dict[str, Any]:
    """What a snapshot holds of a state, without what the compaction stamps (generation, writer, time)."""
    return {
        "positions": dict(st.positions),
        "position_revs": dict(st.position_revs),
        "metadata": {k: dict(v) for k, v in st.metadata.items()},
        "metadata_revs": dict(st.metadata_revs),
        "position_tombstones": dict(st.position_tombstones),
        "metadata_tombstones": dict(st.metadata_tombstones),
        "bot_metadata": st.bot_metadata,
        "bot_metadata_rev": st.bot_metadata_rev,
        "account": st.account,
    }


class Spy:
    """Test-only: the state in memory at each rotation (under the manager's lock, where the rotation runs) and
    the snapshot each worker attempt installed (read back right after the install, on the compaction thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.at_rotation: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.installed: dict[int, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self.in_process = 0
        rotate, attempt, in_view = (
            BackgroundCompaction._rotate_journal,
            _proc.ProcessCompaction._proc_attempt,
            BackgroundCompaction._bg_view,
        )
        spy = self

        def _rotate(self: BackgroundCompaction) -> None:
            before = self._bg_job
            rotate(self)
            job = self._bg_job
            if job is not None and job is not before:
                spy.at_rotation[job.generation] = (view(self._state), dict(job.journal))

        def _attempt(self: BackgroundCompaction, job: Any, *a: Any) -> Any:
            done = attempt(self, job, *a)
            if done is not None:
                loaded = _statefile.read(self._path, options=self._read)
                spy.installed[loaded.state.generation] = (view(loaded.state), loaded.state.journal)
            return done

        def _view(self: BackgroundCompaction, *a: Any) -> Any:
            spy.in_process += 1
            return in_view(self, *a)

        monkeypatch.setattr(BackgroundCompaction, "_rotate_journal", _rotate)
        monkeypatch.setattr(_proc.ProcessCompaction, "_proc_attempt", _attempt)
        monkeypatch.setattr(BackgroundCompaction, "_bg_view", _view)


def four_writers(m: PositionStateManager, enough: Callable[[], bool]) -> None:
    """Test-only: four threads set, delete and tag positions, at least 200 changes each, then on until
    *enough()* (or 20,000 changes each)."""

    def writer(t: int) -> None:
        i = 0
        while i < 200 or (not enough() and i < 20000):
            i += 1
            m.set_position(pos(f"T{t}-{i % 7}", i))
            if i % 5 == 0:
                m.delete_position(f"T{t}-{(i + 3) % 7}", "long")
            if i % 9 == 0:
                m.set_symbol_metadata(f"T{t}-{i % 7}", {"i": i})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


class Spawned:
    """Test-only: every worker the manager starts (and the job message it was handed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.workers: list[_proc.Worker] = []
        self.messages: list[bytes] = []
        self.started = threading.Event()
        real = _proc.Worker
        spawned = self

        class Worker(real):  # type: ignore[misc, valid-type]
            def __init__(self, message: bytes) -> None:
                spawned.messages.append(message)
                super().__init__(message)
                spawned.workers.append(self)
                spawned.started.set()

        monkeypatch.setattr(_proc, "Worker", Worker)


def test_config_names_the_compaction_and_refuses_anything_else(tmp_path: Path) -> None:
    """issue 14 (cause 2): compaction="process" is the default; "thread" keeps it in the bot's process."""
    assert StateConfig.in_dir(tmp_path).compaction == "process"
    assert StateConfig.from_mapping({"compaction": "thread"}).compaction == "thread"
    with pytest.raises(ConfigError, match="compaction must be 'process' or 'thread'"):
        StateConfig.in_dir(tmp_path, compaction="fork")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_worker_snapshot_is_the_state_at_the_rotation_under_concurrent_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """issue 14 (cause 2): four threads set, delete and tag positions through several worker compactions:
    each snapshot a worker wrote decodes to exactly the state in memory at its rotation (captured under the
    lock), and nothing is lost or reordered after a reopen."""
    spy = Spy(monkeypatch)
    saved: list[dict[str, Any]] = []
    with make(tmp_path, durability=mode, journal_max_records=40) as m:
        m.on("stateSaved", saved.append)
        m.save()

        four_writers(m, lambda: len(spy.installed) >= 3)  # through at least three worker compactions
        assert m.compact(wait=True)
        want = contracts(m)
        want_meta = m.get_all_symbol_metadata()
    assert len(spy.installed) >= 3 and spy.in_process == 0, (len(spy.installed), spy.in_process)
    for generation, (state, journal) in spy.installed.items():
        memory, meta = spy.at_rotation[generation]
        assert journal == meta
        assert state == memory, generation
    assert [e for e in saved if e.get("background")]
    with make(tmp_path, durability=mode) as m:
        assert contracts(m) == want and m.get_all_symbol_metadata() == want_meta


def test_keys_reach_the_worker_on_its_stdin_only_and_its_environment_is_minimal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (cause 2): the worker is a fresh interpreter (never a fork), started with the manager's
    Python; the key is in neither its argv nor its environment (POSSTATE_KEY is not passed on), only in the
    job written to its stdin pipe."""
    spawned = Spawned(monkeypatch)
    monkeypatch.setenv("POSSTATE_KEY", "c2VjcmV0LWtleS1ub3QtZm9yLXRoZS13b3JrZXI=")
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("the manager forked"))
    with make(tmp_path) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        assert m.compact(wait=True)
    assert spawned.workers
    w = spawned.workers[0]
    args = [str(a) for a in w.proc.args]  # type: ignore[union-attr]
    assert args[0] == sys.executable and args[-1] == "posstate.journal.compactjob" and "-P" in args
    env = _proc._env()
    assert set(env) <= {"PYTHONPATH", *_proc._ENV_KEPT} and "POSSTATE_KEY" not in env
    for text in [*args, *env.values()]:
        assert KEY.hex() not in text
    assert KEY.hex().encode() in spawned.messages[0]  # over the pipe


def test_a_passphrase_worker_gets_derived_keys_never_the_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (cause 2): with a passphrase the worker gets the key derived for the file's salt (no second
    scrypt, and the passphrase never leaves the process); its snapshot loads with the passphrase."""
    spawned = Spawned(monkeypatch)
    spy = Spy(monkeypatch)
    with make(tmp_path, key=None, passphrase="correct horse battery") as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    assert spy.installed and spy.in_process == 0
    assert b"correct horse battery" not in spawned.messages[0]
    with make(tmp_path, key=None, passphrase="correct horse battery") as m:
        assert contracts(m) == want


@pytest.mark.parametrize("step", ["start", "read", "encoded", "written", "verified"])
def test_sigkill_of_the_worker_at_each_step_is_a_failure_that_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """issue 14 (cause 2): a worker killed (SIGKILL) at any of its steps fails the attempt: reported as an
    ``error`` event, its temp removed, the state file untouched; the retry compacts and no record is lost."""
    failed_attempt_then_retry(tmp_path, monkeypatch, f"kill@{step}", "code -9")


def failed_attempt_then_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str, match: str) -> None:
    """One attempt fails in the worker (TEST_HOOK *hook*, the error matching *match*): an ``error`` event, no
    temp, the state file untouched, writers going on; the next attempt compacts and no record is lost."""
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        before = m.path.read_bytes()
        monkeypatch.setenv(_job.TEST_HOOK, hook)
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        with pytest.raises(PosStateError, match=match):
            m.compact(wait=True)
        assert m.path.read_bytes() == before and temps(m) == []
        m.set_position(pos("S1", 77))  # writers go on while the compaction is pending
        monkeypatch.delenv(_job.TEST_HOOK)
        assert m.compact(wait=True)
        assert not next_path(m.config.journal_path).exists() and temps(m) == []
        want = contracts(m)
    assert errors and errors[0]["context"] == "background compaction" and "worker" in errors[0]["error"]
    with make(tmp_path) as m:
        assert contracts(m) == want


@pytest.mark.parametrize(
    ("hook", "match"),
    [
        pytest.param("garbage@verified", "not JSON", id="garbage"),
        pytest.param("hang@read", "no answer within", id="timeout"),
    ],
)
def test_a_worker_that_answers_garbage_or_hangs_fails_the_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str, match: str
) -> None:
    """issue 14 (cause 2): garbage on the worker's stdout, or no answer before the timeout (the worker is
    killed), is an attempt failure, never trusted; its temp is removed and the retry succeeds."""
    monkeypatch.setattr(_proc, "WORKER_TIMEOUT", 0.5)
    with make(tmp_path) as m:
        m.save()
        monkeypatch.setenv(_job.TEST_HOOK, hook)
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        with pytest.raises(PosStateError, match=match):
            m.compact(wait=True)
        assert temps(m) == []
        monkeypatch.delenv(_job.TEST_HOOK)
        monkeypatch.setattr(_proc, "WORKER_TIMEOUT", 600.0)
        assert m.compact(wait=True)
        want = contracts(m)
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_worker_that_refuses_makes_the_attempt_compact_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 14 (cause 2): when the files are not what the rotation describes (here: the job names a later
    last record than the sealed segment holds) the worker refuses and the attempt compacts in process."""
    spy = Spy(monkeypatch)
    real = _proc.ProcessCompaction._proc_job

    def wrong(self: Any, generation: int, journal: dict[str, Any], sealed: str, temp: Path) -> _job.CompactJob:
        return real(self, generation, {**journal, "seq": int(journal["seq"]) + 1}, sealed, temp)

    monkeypatch.setattr(_proc.ProcessCompaction, "_proc_job", wrong)
    with caplog.at_level(logging.INFO, logger="posstate"), make(tmp_path) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    assert "compaction worker refused" in caplog.text and spy.in_process == 1 and not spy.installed
    with make(tmp_path) as m:
        assert contracts(m) == want


@pytest.mark.parametrize("how", ["flipped-byte", "other-valid-file"])
def test_a_temp_changed_between_the_answer_and_the_install_is_never_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """issue 14 (cause 2): the manager installs the worker's temp only if its trailer checksum, SHA-256, size
    and header are what the worker answered: a temp changed or replaced meanwhile fails the attempt."""
    real = _proc.ProcessCompaction._proc_install
    tampering = threading.Event()
    tampering.set()

    def tamper(self: Any, temp: Path, answer: Any) -> None:
        if tampering.is_set():
            if how == "flipped-byte":
                data = bytearray(temp.read_bytes())
                data[len(data) // 2] ^= 0xFF
                temp.write_bytes(bytes(data))
            else:
                temp.write_bytes(self._path.read_bytes())  # a valid file, but not the one answered
        real(self, temp, answer)

    monkeypatch.setattr(_proc.ProcessCompaction, "_proc_install", tamper)
    with make(tmp_path) as m:
        m.save()
        before = m.path.read_bytes()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        with pytest.raises(PosStateError, match="not the file it answered"):
            m.compact(wait=True)
        assert m.path.read_bytes() == before and temps(m) == []
        tampering.clear()
        assert m.compact(wait=True)
        want = contracts(m)
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_state_file_replaced_before_the_install_is_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (cause 2): a state file replaced after the worker answered (another writer bypassing the lock)
    is detected by the install's check of the file in place: the attempt fails, the file stays as planted."""
    real = _proc.ProcessCompaction._proc_install
    errors: list[dict[str, Any]] = []

    def plant(self: Any, temp: Path, answer: Any) -> None:
        fs.replace(self.config.bak_path, self._path)  # an intact file, but not the one this manager wrote
        real(self, temp, answer)

    monkeypatch.setattr(_proc.ProcessCompaction, "_proc_install", plant)
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        m.set_position(pos("A", 1))
        m.save()  # the .bak is the previous generation
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        planted = m.config.bak_path.read_bytes()
        with pytest.raises(PosStateError, match=r"another writer|changed"):
            m.compact(wait=True)
        assert m.path.read_bytes() == planted and temps(m) == []
        monkeypatch.setattr(_proc.ProcessCompaction, "_proc_install", real)
    assert errors


def _job_for(m: PositionStateManager, tmp: Path, expected: list[str]) -> _job.CompactJob:
    journal = {"id": "00" * 16, "seq": m._journal.last_seq}
    sealed = m._journal.journal_id
    assert sealed is not None
    job = m._proc_job(m.generation + 1, journal, sealed, tmp)
    # Run here, in the test's process: its "manager" is this process's parent (the worker's orphan check).
    return _job.CompactJob(**{**_job.asdict(job), "expected_checksums": expected, "parent_pid": os.getppid()})


def test_the_worker_refuses_a_snapshot_that_does_not_authenticate(tmp_path: Path) -> None:
    """issue 14 (cause 2): the worker decodes the snapshot with the key (AES-GCM) before using it: a file
    under another key, or a plaintext one, is refused even when its checksum is the one it was told."""
    other = tmp_path / "other"
    with make(other, key=OTHER) as o:
        o.set_position(pos("X", 9))
        o.save()
    plain_dir = tmp_path / "plain"
    with PositionStateManager(StateConfig.in_dir(plain_dir, encryption=False, backup_interval=1e9)) as p:
        p.set_position(pos("X", 9))
        p.save()
    d = tmp_path / "d"
    with make(d) as m:
        m.save()
        for i in range(3):
            m.set_position(pos(f"S{i}", i + 1))
        ring = m._keyring
        assert ring is not None
        good = _format.checksum_of(m.path.read_bytes())
        assert good is not None
        answer = _job.compact(_job_for(m, _atomic.temp_name(m.path), [good]), ring)
        assert answer.positions == 3
        fs.unlink(Path(answer.temp_path))
        for planted in (StateConfig.in_dir(other).state_path, StateConfig.in_dir(plain_dir).state_path):
            data = planted.read_bytes()
            m.path.write_bytes(data)
            found = _format.checksum_of(data)
            assert found is not None
            with pytest.raises(_job.Refused, match="does not load"):
                _job.compact(_job_for(m, _atomic.temp_name(m.path), [found]), ring)
        assert temps(m) == []


@pytest.mark.parametrize("how", ["save", "load", "close"])
def test_a_save_load_or_close_that_gives_the_job_up_kills_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """issue 14 (cause 2): a worker still running when a save of memory, a load or close() gives the job up
    is killed (SIGKILL) at once and its temp removed; the save's snapshot (or the segments) hold everything."""
    spawned = Spawned(monkeypatch)
    monkeypatch.setenv(_job.TEST_HOOK, "hang@written")
    m = make(tmp_path)
    m.save()
    for i in range(6):
        m.set_position(pos(f"S{i}", i + 1))
    assert spawned.started.wait(60)
    want = contracts(m)
    thread = m._bg_thread
    if how == "save":
        m.save()
    elif how == "load":
        m.load_positions()
    else:
        m._close_wait = 0.0
    worker = spawned.workers[0]
    m.close()
    assert worker.proc.wait(60) == -9
    if thread is not None:
        thread.join(60)
    assert temps(m) == []
    monkeypatch.delenv(_job.TEST_HOOK)
    with make(tmp_path) as m2:
        assert contracts(m2) == want


_CRASH_SCRIPT = """
import os, signal, sys, time
from decimal import Decimal
from pathlib import Path
from posstate import PositionStateManager, StateConfig
from posstate.model.position import Position
from posstate.storage import atomic

d = Path(sys.argv[1])
cfg = StateConfig.in_dir(d, backup_interval=1e9, journal_max_records=5, compaction="process")
m = PositionStateManager(cfg, key=bytes(range(32)))
m.save()
for i in range(12):
    m.set_position(Position(symbol=f"S{i % 5}", side="long", contracts=Decimal(i + 1), entry_price=Decimal("100")))
    print("ack", i + 1, flush=True)
for _ in range(6000):  # the worker writes its temp, then waits for this process to be gone
    if atomic.stale_temps(cfg.state_path):
        break
    time.sleep(0.01)
print("temp", len(atomic.stale_temps(cfg.state_path)), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_of_the_manager_while_its_worker_runs(tmp_path: Path) -> None:
    """issue 14 (cause 2): the manager's process is SIGKILLed while its worker holds a written temp: the
    worker sees it is orphaned and removes its temp; the next open replays both segments, nothing lost."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), _job.TEST_HOOK: "orphan@written"}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "temp 1" in proc.stdout
    cfg = StateConfig.in_dir(tmp_path)
    deadline = 6000
    while _atomic.stale_temps(cfg.state_path) and deadline:  # the orphaned worker removes its temp
        deadline -= 1
        threading.Event().wait(0.01)
    assert _atomic.stale_temps(cfg.state_path) == []
    with make(tmp_path) as m:
        assert contracts(m) == {"S0": 11, "S1": 12, "S2": 8, "S3": 9, "S4": 10}


def _bg_ops(d: Path) -> list[str]:
    """The mutating operations of the manager's own steps in one worker compaction."""
    probe = HarnessOps(thread_prefix=BG, skip_thread_prefix=SPARE_THREAD)
    with make(d) as m:
        m.save()
        with fs.use(probe):
            for i in range(6):
                m.set_position(pos(f"S{i}", i + 1))
            assert m.compact(wait=True)
    return [op.name for op in probe.ops if op.name in MUTATING]


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_fault_at_each_install_step_of_a_worker_compaction(tmp_path: Path, persistent: bool) -> None:
    """issue 14 (cause 2): ENOSPC at any of the manager's steps installing the worker's snapshot (.bak link,
    rename, directory fsync, the segment's rename) is reported, retried, never blocks writers and never
    loses a record; no temp is left behind."""
    names = _bg_ops(tmp_path / "probe")
    assert {"link", "replace", "fsync_dir"} <= set(names) and "write" not in names  # the worker wrote the file
    for k in range(1, len(names) + 1):
        d = tmp_path / f"k{k}"
        errors: list[dict[str, Any]] = []
        ops = HarnessOps(
            fault=Fault(at=k, ops=MUTATING, persistent=persistent), thread_prefix=BG, skip_thread_prefix=SPARE_THREAD
        )
        with make(d) as m:
            m.on("error", errors.append)
            m.save()
            with fs.use(ops):
                for i in range(6):
                    m.set_position(pos(f"S{i}", i + 1))
                if persistent:
                    with pytest.raises((OSError, PosStateError)):
                        m.compact(wait=True)
                else:
                    with contextlib.suppress(OSError, PosStateError):
                        m.compact(wait=True)
                m.set_position(pos("S1", 77))
            assert m.compact(wait=True), names[k - 1]
            assert not next_path(m.config.journal_path).exists()
            # A disk failing every operation fails the cleanup too: then the next open's sweep removes the temp.
            assert persistent or temps(m) == [], names[k - 1]
            want = contracts(m)
        assert errors and errors[0]["context"] == "background compaction", names[k - 1]
        with make(d) as m:
            assert contracts(m) == want and temps(m) == [], names[k - 1]


def test_each_worker_snapshot_has_a_fresh_nonce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.3 / 14 (cause 2): every snapshot a worker writes is sealed under a fresh random nonce (a new
    interpreter's os.urandom, never a forked copy of the manager's state), distinct from every other."""
    spy = Spy(monkeypatch)
    nonces: list[bytes] = []
    with make(tmp_path) as m:
        m.save()
        nonces.append(_format.parse_header(m.path.read_bytes()).nonce)
        for round_ in range(8):
            for i in range(6):
                m.set_position(pos(f"S{i}", round_))  # the same content each round but the values
            assert m.compact(wait=True)
            nonces.append(_format.parse_header(m.path.read_bytes()).nonce)
    # At least one worker snapshot per round (a threshold's compaction may finish before the round's compact()).
    assert len(spy.installed) >= 8 and spy.in_process == 0
    assert len(set(nonces)) == len(nonces) and all(len(n) == 12 for n in nonces)


@pytest.mark.parametrize("how", ["no-executable", "spawn-fails"])
def test_without_a_worker_process_the_compaction_runs_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """issue 14 (cause 2): with no Python executable to start (embedded, frozen) or a start that fails
    (ENOENT, EAGAIN), compaction="process" compacts on the thread instead: never a failure for that alone."""
    spy = Spy(monkeypatch)
    if how == "no-executable":
        monkeypatch.setattr(sys, "executable", "")
    else:

        def refuse(message: bytes) -> Any:
            raise FileNotFoundError(2, "No such file or directory")

        monkeypatch.setattr(_proc, "Worker", refuse)
    with make(tmp_path) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    assert spy.in_process == 1 and not spy.installed
    with make(tmp_path) as m:
        assert contracts(m) == want


def _tombstone_floor(m: PositionStateManager, floor: int | None) -> None:
    m._files.tombstone_floor = floor


def test_the_worker_replays_on_the_authenticated_document_without_rebuilding_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (worker CPU): the worker replays the sealed segment on the snapshot's parsed document (no
    schema validation nor Positions for it, no full re-parse of its read-back), and the snapshot it writes
    is exactly the state in memory, every kind of change and the tombstone floor included."""
    with make(tmp_path, journal_max_records=1000) as m:
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        m.set_symbol_metadata("S1", {"a": 1})
        m.set_symbol_metadata("S2", {"b": 2})
        m.delete_position("S0", "long")
        m.save()
        floor = m.generation  # S0's tombstone is at or below it and is dropped; S3's and S1's are kept
        m.set_position(pos("S1", 11))
        m.set_position(pos("N1", 5))
        m.delete_position("S2", "long")
        m.delete_position("S3", "long")
        m.delete_symbol_metadata("S1")
        m.set_symbol_metadata("S4", {"c": [1, "x"]})
        m.set_bot_metadata({"risk": "low"})
        m.set_position(pos("S2", 22))  # its tombstone goes again
        _tombstone_floor(m, floor)
        good = _format.checksum_of(m.path.read_bytes())
        assert good is not None
        job = _job_for(m, _atomic.temp_name(m.path), [good])
        memory = m._state.copy()

        def refused(*a: Any, **k: Any) -> Any:
            raise AssertionError("the worker validated a document again")

        with monkeypatch.context() as mp:
            mp.setattr(_statefile, "parse", refused)
            mp.setattr(_statefile, "read", refused)
            mp.setattr(_document, "decode_document", refused)
            answer = _job.compact(job, m._keyring)
        loaded = _statefile.parse(Path(answer.temp_path).read_bytes(), path=Path(answer.temp_path), options=m._read)
        fs.unlink(Path(answer.temp_path))
    _merge.drop_old_tombstones(memory, floor=floor)
    assert loaded.state.generation == job.generation and loaded.state.journal == job.journal
    assert answer.positions == len(memory.positions) and loaded.checksum == answer.checksum
    assert view(loaded.state) == view(memory)
    assert list(loaded.state.positions) == list(memory.positions)  # the same order as an in-process save
    assert ("S3", "long") in loaded.state.position_tombstones and ("S0", "long") not in loaded.state.position_tombstones


def test_the_worker_refuses_an_unknown_or_tampered_snapshot_even_with_a_valid_trailer(tmp_path: Path) -> None:
    """issue 14 (worker CPU): the snapshot is trusted without re-validation only as the bytes the manager
    wrote: a checksum it was not told is refused, and a ciphertext changed under a recomputed trailer
    (its checksum told to the worker) fails AES-GCM and is refused."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        m.save()
        m.set_position(pos("B", 2))
        data = m.path.read_bytes()
        with pytest.raises(_job.Refused, match="not the one the manager wrote"):
            _job.compact(_job_for(m, _atomic.temp_name(m.path), ["0" * 64]), m._keyring)
        body = bytearray(data[: -_format.TRAILER_SIZE])
        body[len(body) // 2] ^= 0x01
        m.path.write_bytes(bytes(body) + _format.trailer_for(bytes(body)))
        digest = _format.checksum_of(m.path.read_bytes())
        assert digest is not None
        with pytest.raises(_job.Refused, match="does not load"):
            _job.compact(_job_for(m, _atomic.temp_name(m.path), [digest]), m._keyring)
        m.path.write_bytes(data)
        assert temps(m) == []


def test_a_temp_changed_after_the_worker_wrote_it_is_caught_by_its_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (worker CPU): the worker's read-back (the same bytes, and they decode, as an in-process save
    checks its file) still catches a temp whose byte changed after the write: the attempt fails, reported
    and retried, the temp removed and the state file untouched."""
    errors: list[dict[str, Any]] = []
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        before = m.path.read_bytes()
        for i in range(3):
            m.set_position(pos(f"S{i}", i + 1))
        monkeypatch.setenv(_job.TEST_HOOK, "flip@written")
        with pytest.raises(OSError, match="read back differs"):
            _job.compact(_job_for(m, _atomic.temp_name(m.path), sorted(c for c in m._expected_on_disk if c)), m._keyring)
        assert temps(m) == []
        with pytest.raises(PosStateError, match="read back differs"):
            m.compact(wait=True)
        assert m.path.read_bytes() == before and temps(m) == []
        monkeypatch.delenv(_job.TEST_HOOK)
        assert m.compact(wait=True)
        want = contracts(m)
    assert errors and "worker" in errors[0]["error"]
    with make(tmp_path) as m:
        assert contracts(m) == want
