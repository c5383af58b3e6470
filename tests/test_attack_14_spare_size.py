"""Issue 14 attack on the spare's size (session 8): a spare of up to 96 B + 4 MiB, written and synced in steps.

A rotation (or a save, a load, close) that comes while the spare's thread is writing its zeros waits for it
(``.next`` has one writer at a time). With a spare of megabytes that wait would be every remaining step: the
caller's thread would stand behind megabytes of synced writes. These tests hold the spare's thread inside its
first step and let it go only once the caller is waiting for it, then count the steps written after that.
Nothing here sleeps or asserts a time: the threads wait on events (with a timeout).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from posstate.journal import format as jf
from posstate.journal import spare as spare_mod
from posstate.journal.files import next_path
from posstate.journal.spare import SPARE_THREAD
from posstate.storage import fileops as fs
from tests.test_spare_segment import MAX, contracts, keyed, make, pos, run, settle, spare_ready

STEP = 16 * 1024  # a spare of 128 KiB + 96 B then takes 9 steps
WAIT = 60.0


class _HoldFirstStep(fs.FileOps):
    """The spare's thread stops inside its first ``fdatasync`` until ``go`` is set; counts its zero steps."""

    def __init__(self) -> None:
        super().__init__()
        self.in_step = threading.Event()
        self.go = threading.Event()
        self.steps = 0

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if threading.current_thread().name.startswith(SPARE_THREAD) and bytes(data).count(0) == len(data):
            self.steps += 1
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        if threading.current_thread().name.startswith(SPARE_THREAD) and not self.in_step.is_set():
            self.in_step.set()
            assert self.go.wait(WAIT), "the test never let the spare's thread go on"


class _NoticedCondition(threading.Condition):
    """The journal's condition, noticing when the thread named *who* starts to wait on a false predicate."""

    def __init__(self, who: str) -> None:
        super().__init__(threading.RLock())
        self.who = who
        self.waiting = threading.Event()

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        if threading.current_thread().name == self.who and not predicate():
            self.waiting.set()
        return super().wait_for(predicate, timeout)


@pytest.mark.parametrize(
    ("what", "mode"), [("rotation", "sync"), ("rotation", "group"), ("save", "sync"), ("save", "group"), ("close", "sync")]
)
def test_the_caller_waits_for_at_most_one_step_of_an_in_flight_spare(
    tmp_path: Path, what: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (spare size): a rotation, a save or close that comes while the spare's thread writes its
    zeros asks it to stop: it finishes the step in flight and publishes the shorter spare (synced, the directory
    synced), instead of making the caller's thread wait for every remaining step of up to 4 MiB. The rotation
    still adopts that spare, and nothing is lost."""
    monkeypatch.setattr(spare_mod, "SPARE_STEP", STEP)
    ops = _HoldFirstStep()
    m = make(tmp_path, durability=mode)
    cond = _NoticedCondition("caller")
    m._journal._cond = cond  # (before any thread uses it: nothing has been loaded or written yet)
    with fs.use(ops):
        i = 0
        while m._journal.records < MAX // 2 + 1:  # the spare is wanted: its thread starts and stops in step 1
            m.set_position(pos(f"S{i % 4}", i + 1))
            i += 1
        assert ops.in_step.wait(WAIT), "the spare's preparation never started"
        want = contracts(m)
        done: list[BaseException | None] = []

        def caller() -> None:
            try:
                if what == "rotation":
                    n = i
                    while not m._journal.rotating:
                        m.set_position(pos(f"S{n % 4}", n + 1))
                        n += 1
                elif what == "save":
                    m.save()
                else:
                    m.close()
                done.append(None)
            except BaseException as exc:  # pragma: no cover - reported below
                done.append(exc)

        t = threading.Thread(target=caller, name="caller")
        t.start()
        assert cond.waiting.wait(WAIT), "the caller never waited for the spare"
        ops.go.set()
        t.join(WAIT)
        assert done == [None]
        settle(m)
        assert ops.steps <= 2, f"the spare's thread wrote {ops.steps} steps of zeros while the caller waited"
        if what == "rotation":
            nxt = next_path(m.config.journal_path)
            jf.parse_header(fs.read_file(nxt, jf.HEADER_SIZE))  # a segment started there ...
            assert nxt.stat().st_size == STEP  # ... in the spare cut after its first step (a creation pads 64 KiB)
        if what != "close":
            want = contracts(m)
            assert m.compact(wait=True)
            m.close()
    with make(tmp_path, durability=mode) as m2:
        assert contracts(m2) == want
    assert not spare_ready(m2)


@pytest.mark.parametrize("prealloc", [1, 4096, 64 * 1024 - 1])
def test_a_small_journal_preallocate_bounds_the_spare(tmp_path: Path, prealloc: int) -> None:
    """issue 14 attack (spare size): ``journal_preallocate`` below the first stretch (64 KiB) asks for at most
    that many zeros ahead of the records; the spare holds no more than that either (it held up to 4 MiB), and
    the journal still works through the rotation and a reload."""
    with make(tmp_path, journal_preallocate=prealloc) as m:
        i = 0
        while m._journal.records < MAX // 2 + 1:
            m.set_symbol_metadata(f"S{i % 4}", {"note": "z" * 2000, "i": i})  # about 2 KB a record
            i += 1
        settle(m)
        assert spare_ready(m)
        assert next_path(m.config.journal_path).stat().st_size == jf.HEADER_SIZE + prealloc
        for n in range(2 * MAX):
            m.set_position(pos(f"P{n % 4}", n + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    with make(tmp_path, journal_preallocate=prealloc) as m:
        assert contracts(m) == want


class _CountReads(fs.FileOps):
    def __init__(self) -> None:
        super().__init__()
        self.read = 0

    def read_file(self, path: Any, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        data = super().read_file(path, limit, max_size=max_size)
        self.read += len(data)
        return data


def test_deciding_that_a_segment_is_no_spare_reads_its_header_only(tmp_path: Path) -> None:
    """issue 14 attack (spare size): BLANK_MAX grew from 96 B + 64 KiB to 96 B + 4 MiB, and a segment started in
    a spare is now up to that size: deciding that a ``.next`` (or a journal) with a header is not blank (the
    caller's thread at a segment's creation, recovery, repair, restore, the spare's thread) reads its header,
    not up to 4 MiB; a blank file and one with a byte set far in are still told apart."""
    from posstate.journal.files import BLANK_MAX, blank_file

    with make(tmp_path) as m:
        i = 0
        while not m._journal.rotating:  # a segment starts in the spare: .next holds a header and records
            m.set_position(pos(f"S{i % 4}", i + 1))
            i += 1
            if m._journal.records == MAX // 2 + 1:
                settle(m)
        nxt = next_path(m.config.journal_path)
        size = nxt.stat().st_size
        assert size > 64 * 1024
        ops = _CountReads()
        with fs.use(ops):
            assert not blank_file(nxt)
        assert ops.read <= jf.HEADER_SIZE, (ops.read, size)
        assert m.compact(wait=True)
    far = tmp_path / "far"
    far.write_bytes(bytes(BLANK_MAX - 1) + b"\x01")
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(BLANK_MAX))
    assert not blank_file(far) and blank_file(blank)


class _SpareWrites(fs.FileOps):
    """Counts the bytes the spare's thread writes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if threading.current_thread().name.startswith(SPARE_THREAD):
            self.bytes += len(data)
        return super().pwrite(fd, data, offset)


def _until_spare(m: Any, meta: dict[str, Any], i: int, records: int) -> int:
    while m._journal.records < records // 2 + 1:
        m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
        i += 1
    settle(m)
    return i


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_a_save_does_not_cost_a_spare_of_megabytes(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 attack (spare size): the first record after a save adopts the spare, and the spare's thread at
    once prepares the next one (for the next save's first record; the rotation is half a threshold away). Sized
    from that one record, it was up to 4 MiB of synced zeros per save (1.8 MiB at bench_tail's records: 29x
    the 64 KiB before), for a bot that saves often. That spare is now the first stretch, and it grows to the
    next segment's expected size only at half a threshold, in place: the rotation still adopts a spare that
    holds the next segment's records."""
    monkeypatch.setattr(spare_mod, "SPARE_STEP", STEP)
    records = 400
    meta = {"note": "y" * 700}  # about 1 KB a record: the estimate is far above the first stretch
    with make(tmp_path, journal_max_records=records, durability=mode) as m:
        i = _until_spare(m, meta, 0, records)
        assert spare_ready(m) and _size(m) > jf.HEADER_SIZE + 256 * 1024
        ops = _SpareWrites()
        saves = 5
        with fs.use(ops):
            for _ in range(saves):
                m.save()
                for _ in range(3):
                    m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
                    i += 1
                settle(m)
        assert ops.bytes <= saves * (jf.HEADER_SIZE + 64 * 1024), ops.bytes
        assert spare_ready(m) and _size(m) == jf.HEADER_SIZE + 64 * 1024
        i = _until_spare(m, meta, i, records)  # half a threshold: the spare grows to the expected size
        per = (m._journal.size - jf.HEADER_SIZE) / m._journal.records
        grown = _size(m)
        assert grown >= jf.HEADER_SIZE + per * records
        held = m._journal._spare_fd
        while not m._journal.rotating:
            m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
            i += 1
        assert m._journal._fd == held and _size(m) == grown  # the rotation adopted the grown spare
        assert m.compact(wait=True)
        want = {s: m.get_symbol_metadata(s) for s in (f"S{k}" for k in range(8))}
    with make(tmp_path, journal_max_records=records, durability=mode) as m:
        assert {s: m.get_symbol_metadata(s) for s in (f"S{k}" for k in range(8))} == want


def _size(m: Any) -> int:
    return next_path(m.config.journal_path).stat().st_size


def _after_save_small_spare(m: Any, meta: dict[str, Any], records: int) -> int:
    """A spare, a save, the first record after it: the spare now held is the first stretch."""
    i = _until_spare(m, meta, 0, records)
    m.save()
    m.set_symbol_metadata("S0", {**meta, "i": i})
    settle(m)
    assert spare_ready(m) and _size(m) == jf.HEADER_SIZE + 64 * 1024
    return i + 1


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_a_fault_while_the_spare_grows_is_harmless(
    tmp_path: Path, k: int, persistent: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (spare size): ENOSPC at the k-th write or sync of the spare's growth in place (once, or
    from then on): every update succeeds, the failure is reported, the rotation adopts the spare (whatever
    length of zeros it reached) or creates the segment, validate passes and a reload holds every change."""
    from posstate.selftest.harness import MUTATING_AND_READS, Fault, HarnessOps

    monkeypatch.setattr(spare_mod, "SPARE_STEP", STEP)
    records = 100
    meta = {"note": "y" * 2000}  # about 2 KB a record: the spare grows from 64 KiB to 256 KiB in 16 KiB steps
    errors: list[dict[str, Any]] = []
    with make(tmp_path, journal_max_records=records) as m:
        m.on("error", errors.append)
        i = _after_save_small_spare(m, meta, records)
        fault = Fault(at=k, errno=errno.ENOSPC, persistent=persistent, ops=MUTATING_AND_READS)
        ops = HarnessOps(fault=fault, thread_prefix=SPARE_THREAD)
        with fs.use(ops):
            i = _until_spare(m, meta, i, records)
            for n in range(i, i + records):  # through a rotation
                m.set_symbol_metadata(f"S{n % 8}", {**meta, "i": n})
            settle(m)
        assert [op.faulted for op in ops.ops if op.faulted], ops.ops
        assert [e["context"] for e in errors][:1] == ["journal segment preparation"]
        assert m.compact(wait=True)
        want = {s: m.get_symbol_metadata(s) for s in (f"S{c}" for c in range(8))}
    val = run([*keyed(tmp_path), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr
    with make(tmp_path, journal_max_records=records) as m:
        assert {s: m.get_symbol_metadata(s) for s in (f"S{c}" for c in range(8))} == want


def test_the_replica_shipper_does_not_read_a_blank_spare_whole(tmp_path: Path) -> None:
    """issue 14 attack (spare size): each shipping pass reads the journal files (``replica/local.py``); a blank
    spare of up to 96 B + 4 MiB (64 KiB before) was read whole two or three times a pass just to find no
    header in it. Its 96 header bytes are read instead; a segment there is still read and shipped."""
    from posstate.journal.files import BLANK_MAX
    from posstate.replica import local as replica_local

    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        cfg = m.config
    nxt = next_path(cfg.journal_path)
    nxt.write_bytes(bytes(BLANK_MAX))

    class _NextReads(_CountReads):
        def read_file(self, path: Any, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
            data = fs.FileOps.read_file(self, path, limit, max_size=max_size)
            if Path(path) == nxt:
                self.read += len(data)
            return data

    ops = _NextReads()
    with fs.use(ops):
        local = replica_local.read_local(cfg.state_path, cfg.journal_path)
    assert local.records and local.following is None
    assert ops.read <= 3 * jf.HEADER_SIZE, ops.read


def test_the_revision_floor_reads_a_blank_spares_header_only(tmp_path: Path) -> None:
    """issue 14 attack (spare size): the revision floor (``backup/seen.py``, recovery) looks at ``.next`` and at
    the journal files kept in quarantine; a blank spare of up to 96 B + 4 MiB was read whole to find that its
    header does not parse. Its 96 header bytes are read instead."""
    from posstate.backup.seen import journal_max_rev
    from posstate.journal.files import BLANK_MAX
    from posstate.storage.statefile import ReadOptions

    spare = tmp_path / "positions.json.journal.next"
    spare.write_bytes(bytes(BLANK_MAX))
    ops = _CountReads()
    with fs.use(ops):
        assert journal_max_rev(spare, ReadOptions(keyring=None)) == 0
    assert ops.read <= jf.HEADER_SIZE, ops.read


def test_record_times_read_a_blank_spares_header_only(tmp_path: Path) -> None:
    """issue 14 attack (spare size): the stale-backup guard and recovery's threshold read every record's time
    from the journal files, ``.next`` included (``journal/files.py`` ``record_times``); a blank spare of up to
    96 B + 4 MiB was read whole. Its 96 header bytes are read instead; the journal's records still count."""
    from posstate.journal.files import BLANK_MAX, record_times

    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        cfg = m.config
    nxt = next_path(cfg.journal_path)
    nxt.write_bytes(bytes(BLANK_MAX))
    reads: list[tuple[str, int]] = []

    class _Reads(fs.FileOps):
        def read_file(self, path: Any, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
            data = super().read_file(path, limit, max_size=max_size)
            reads.append((Path(path).name, len(data)))
            return data

    with fs.use(_Reads()):
        times = record_times(cfg.journal_path, cfg.legacy_journal_path)
    assert times
    assert sum(n for name, n in reads if name == nxt.name) <= jf.HEADER_SIZE, reads
