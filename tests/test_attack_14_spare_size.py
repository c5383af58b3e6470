"""Issue 14 attack on the spare's size (session 8): a spare of up to 96 B + 4 MiB, written and synced in steps.

A rotation (or a save, a load, close) that comes while the spare's thread is writing its zeros waits for it
(``.next`` has one writer at a time). With a spare of megabytes that wait would be every remaining step: the
caller's thread would stand behind megabytes of synced writes. These tests hold the spare's thread inside its
first step and let it go only once the caller is waiting for it, then count the steps written after that.
Nothing here sleeps or asserts a time: the threads wait on events (with a timeout).
"""

from __future__ import annotations

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
from tests.test_spare_segment import MAX, contracts, make, pos, settle, spare_ready

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
