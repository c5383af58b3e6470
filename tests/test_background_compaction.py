"""Issue 14.1/14.3: the journal rotates to a linked segment at once and a background thread writes the snapshot.

The background attempt is held at a gate (an event the test sets) where a test needs it running; nothing
here sleeps or asserts a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import PositionStateManager, PosStateError, StateConfig
from posstate.journal import format as jf
from posstate.journal.files import next_path
from posstate.journal.spare import SPARE_THREAD
from posstate.manager.compaction import BackgroundCompaction
from posstate.model.position import Position
from posstate.selftest.harness import MUTATING, Fault, HarnessOps, copy_tree
from posstate.storage import fileops as fs

KEY = bytes(range(32))
BG = "posstate-compact"


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def make(d: Path, **kw: Any) -> PositionStateManager:
    kw.setdefault("journal_max_records", 5)
    # These tests hold, fault and crash the in-process compaction's own steps (the worker process path has
    # its equivalents in tests/test_compaction_process.py).
    kw.setdefault("compaction", "thread")
    return PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, **kw), key=KEY)


class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


@contextlib.contextmanager
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Hold every background attempt until the test releases it."""
    gate = Gate()
    real = BackgroundCompaction._bg_attempt

    def attempt(self: BackgroundCompaction, job: Any) -> Any:
        gate.entered.set()
        assert gate.release.wait(60), "test never released the gate"
        return real(self, job)

    monkeypatch.setattr(BackgroundCompaction, "_bg_attempt", attempt)
    try:
        yield gate
    finally:
        gate.release.set()


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


def test_threshold_rotates_to_a_linked_segment_and_the_snapshot_is_written_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1: passing journal_max_records rotates at once (the state file is untouched by the caller);
    updates go on into the new segment (no second rotation); the background snapshot then retires the old one."""
    cfg = StateConfig.in_dir(tmp_path)
    saved: list[dict[str, Any]] = []
    with held(monkeypatch) as gate, make(tmp_path) as m:
        m.on("stateSaved", saved.append)
        m.save()
        for i in range(5):
            m.set_position(pos(f"S{i}", i + 1))
        before = cfg.state_path.read_bytes()
        m.set_position(pos("S0", 100))  # the threshold is passed: this call rotates
        assert gate.entered.wait(60)
        nxt = next_path(cfg.journal_path)
        head = jf.parse_header(nxt.read_bytes())
        assert head.version == jf.LINKED_VERSION and head.follows(jf.parse_header(cfg.journal_path.read_bytes()))
        for i in range(20):  # past the threshold again while the compaction is pending: same segment
            m.set_position(pos(f"S{i % 5}", 200 + i))
        assert cfg.state_path.read_bytes() == before
        assert jf.parse_header(nxt.read_bytes()).journal_id == head.journal_id
        # A crash now: the old snapshot, the old segment and the new one, replayed in order.
        copy_tree(tmp_path, tmp_path.parent / "image")
        gate.release.set()
        assert m.compact(wait=True)
        assert not nxt.exists()
        assert jf.parse_header(cfg.journal_path.read_bytes()).journal_id == head.journal_id
        want = contracts(m)
    assert any(e.get("background") for e in saved)
    with make(tmp_path) as m:
        assert contracts(m) == want
    with make(tmp_path.parent / "image") as m:
        assert contracts(m) == want
        assert not next_path(StateConfig.in_dir(tmp_path.parent / "image").journal_path).exists()  # folded by the load


def _bg_ops(d: Path) -> list[str]:
    """The mutating operations of one background compaction."""
    probe = HarnessOps(thread_prefix=BG, skip_thread_prefix=SPARE_THREAD)
    with make(d) as m:
        m.save()
        with fs.use(probe):
            for i in range(6):
                m.set_position(pos(f"S{i}", i + 1))
            assert m.compact(wait=True)
    return [op.name for op in probe.ops if op.name in MUTATING]


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_fault_at_each_operation_of_a_background_compaction(tmp_path: Path, persistent: bool) -> None:
    """issue 14.1: a fault at any operation of the background compaction is reported (error event + log),
    retried, never blocks writers and never loses a record."""
    names = _bg_ops(tmp_path / "probe")
    assert {"write", "fsync", "replace", "fsync_dir"} <= set(names)
    for k in range(1, len(names) + 1):
        d = tmp_path / f"k{k}"
        errors: list[dict[str, Any]] = []
        # The compaction's own operations: the spare segment's thread has its own fault tests (test_spare_segment.py).
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
                else:  # the first attempt fails; compact() may find it failed (and retry) or wait for it
                    with contextlib.suppress(OSError, PosStateError):
                        m.compact(wait=True)
                m.set_position(pos("S1", 77))  # writers go on while the compaction is pending
            assert m.compact(wait=True), names[k - 1]  # the disk is back: the retry succeeds
            assert not next_path(m.config.journal_path).exists()
            want = contracts(m)
        assert errors and errors[0]["context"] == "background compaction", names[k - 1]
        with make(d) as m:
            assert contracts(m) == want, names[k - 1]


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_concurrent_writers_during_background_compactions(tmp_path: Path, mode: str) -> None:
    """issue 14.1/14.3: four threads writing through several background compactions: no change lost or
    reordered (each thread's last value wins, in memory and after a reload), compactions emitted stateSaved."""
    saved: list[dict[str, Any]] = []
    with make(tmp_path, durability=mode, journal_max_records=40) as m:
        m.on("stateSaved", saved.append)

        def worker(t: int) -> None:
            for i in range(1, 151):
                m.set_position(pos(f"T{t}", i))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert contracts(m) == {f"T{t}": 150 for t in range(4)}
    assert any(e.get("background") for e in saved)
    with make(tmp_path, durability=mode) as m:
        assert contracts(m) == {f"T{t}": 150 for t in range(4)}


def test_close_while_a_compaction_runs_leaves_the_segments_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 14.1: close() waits a bounded time for a running compaction; past it the segments stay, the log
    says so, nothing is written after close, and the next load replays both segments."""
    with held(monkeypatch) as gate:
        m = make(tmp_path)
        m.save()
        for i in range(8):
            m.set_position(pos(f"S{i % 5}", i + 1))
        assert gate.entered.wait(60)
        thread = m._bg_thread
        assert thread is not None
        m._close_wait = 0.0
        with caplog.at_level(logging.WARNING, logger="posstate"):
            m.close()
        assert "the journal segments stay on disk and the next load replays them" in caplog.text
        gate.release.set()
        thread.join(60)
        assert next_path(m.config.journal_path).exists()
    with make(tmp_path) as m2:
        assert contracts(m2) == {"S0": 6, "S1": 7, "S2": 8, "S3": 4, "S4": 5}


def test_save_supersedes_a_failing_background_compaction(tmp_path: Path) -> None:
    """issue 14.1: save() keeps its meaning while a compaction keeps failing: a durable snapshot of everything
    acknowledged, the pending compaction given up and the new segment folded in."""
    ops = HarnessOps(fault=Fault(at=1, ops=frozenset({"replace"}), persistent=True), thread_prefix=BG)
    with make(tmp_path) as m:
        m.save()
        with fs.use(ops):
            for i in range(8):
                m.set_position(pos(f"S{i % 5}", i + 1))
            with pytest.raises((OSError, PosStateError)):
                m.compact(wait=True)
            m.save()
        assert not next_path(m.config.journal_path).exists()
        want = contracts(m)
    with make(tmp_path) as m:
        assert contracts(m) == want and not m.dirty
