"""Issue 15.6: asyncio writers never fsync on the event loop, and a cancelled caller never leaves a change
half applied. Real event loops; a timer that keeps ticking proves the loop runs while a sync is in progress."""

from __future__ import annotations

import asyncio
import errno
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, SchemaValidationError, StateConfig, TransactionError
from posstate.storage import fileops as fs


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


class _GatedSync(fs.FileOps):
    """The first fsync/fdatasync after arm() waits until released (then runs, or fails with EIO)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = False
        self.fail = fail
        self.thread: int | None = None
        self.timed_out = False

    def _gate(self) -> None:
        # Only the change under test: a background backup thread (this test's or a leftover) passes freely.
        if self.armed and threading.current_thread().name != "posstate-backup":
            self.armed = False
            self.thread = threading.get_ident()
            self.entered.set()
            if not self.release.wait(10):
                self.timed_out = True  # the loop never ran to release us: it was blocked by this very sync
            if self.fail:
                raise OSError(errno.EIO, "injected EIO")

    def fsync(self, fd: int) -> None:
        self._gate()
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._gate()
        super().fdatasync(fd)


def make(tmp_path: Path, key: bytes, **kw: Any) -> PositionStateManager:
    return PositionStateManager(StateConfig.in_dir(tmp_path / "state", **kw), key=key)


async def _ticks_during_sync(gate: _GatedSync, work: Any) -> tuple[int, Any]:
    """Start *work*; once its sync is blocked, let a loop timer tick three times, then release the sync."""
    ticks = 0
    ticked = asyncio.Event()
    loop = asyncio.get_running_loop()

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks >= 3:
            ticked.set()
        else:
            loop.call_later(0.001, tick)

    task = asyncio.ensure_future(work)
    entered = await loop.run_in_executor(None, gate.entered.wait, 10)
    assert entered, "the change never reached its sync"
    loop.call_soon(tick)
    await asyncio.wait_for(ticked.wait(), 10)
    gate.release.set()
    return ticks, await task


@pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
def test_aset_position_never_syncs_on_the_loop(tmp_path: Path, key: bytes, durability: str) -> None:
    """issue 15.6: while aset_position's record is being synced, the event loop keeps running (a timer ticks)."""
    with make(tmp_path, key, durability=durability) as m:
        m.set_position(pos("A", 1))
        if durability == "snapshot":
            m.save()
        gate = _GatedSync()

        async def main() -> int:
            loop_thread = threading.get_ident()
            gate.armed = True
            if durability == "snapshot":  # set_position only changes memory; the save syncs
                m.set_position(pos("A", 2))
            work = m.aset_position(pos("A", 2)) if durability != "snapshot" else m.asave()
            ticks, _ = await _ticks_during_sync(gate, work)
            assert gate.thread != loop_thread
            return ticks

        with fs.use(gate):
            ticks = asyncio.run(main())
        assert ticks >= 3 and not gate.timed_out
        assert m.get_position("A", "long") == pos("A", 2)
    with make(tmp_path, key, durability=durability) as m2:
        assert m2.get_position("A", "long") == pos("A", 2)


def test_every_async_writer_runs_off_the_loop(tmp_path: Path, key: bytes) -> None:
    """issue 15.6: adelete_position, aset/adelete_symbol_metadata and atransaction sync in a worker thread."""
    with make(tmp_path, key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("B", 1))
        m.set_symbol_metadata("A", {"n": 1})

        async def tx_work() -> None:
            async with m.atransaction() as tx:
                tx.set_position(pos("C", 3))
                tx.delete_position("B", "long")
                tx.set_symbol_metadata("C", {"n": 3})

        calls = [
            lambda: m.adelete_position("A", "long"),
            lambda: m.aset_symbol_metadata("B", {"n": 2}),
            lambda: m.adelete_symbol_metadata("A"),
            tx_work,
        ]
        for call in calls:
            gate = _GatedSync()

            async def main(call: Any = call, gate: _GatedSync = gate) -> int:
                gate.armed = True
                ticks, _ = await _ticks_during_sync(gate, call())
                assert gate.thread != threading.get_ident()
                return ticks

            with fs.use(gate):
                assert asyncio.run(main()) >= 3 and not gate.timed_out
        assert set(m.get_positions()) == {("C", "long")}
        assert m.get_all_symbol_metadata() == {"B": {"n": 2}, "C": {"n": 3}}
    with make(tmp_path, key) as m2:
        assert set(m2.get_positions()) == {("C", "long")}


@pytest.mark.parametrize("fail", [False, True], ids=["sync-succeeds", "sync-fails"])
def test_cancelled_caller_sees_a_whole_change(tmp_path: Path, key: bytes, fail: bool) -> None:
    """issue 15.6: cancelling a caller awaiting aset_position mid-sync: CancelledError reaches it only once the
    change is whole (applied and durable) or wholly not applied (its sync failed); never half applied."""
    with make(tmp_path, key) as m:
        m.set_position(pos("A", 1))
        gate = _GatedSync(fail=fail)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            gate.armed = True
            task = asyncio.ensure_future(m.aset_position(pos("A", 2)))
            assert await loop.run_in_executor(None, gate.entered.wait, 10)
            task.cancel()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert not task.done()  # still waiting for the thread: the change is under way
            gate.release.set()
            with pytest.raises(asyncio.CancelledError):
                await task

        with fs.use(gate):
            asyncio.run(main())
        expected = pos("A", 1) if fail else pos("A", 2)
        assert m.get_position("A", "long") == expected
    with make(tmp_path, key) as m2:
        assert m2.get_position("A", "long") == expected


def test_atransaction_cancelled_or_raising_inside_applies_nothing(tmp_path: Path, key: bytes) -> None:
    """issue 15.6: a block of atransaction() that raises or is cancelled at an await applies none of its changes."""
    with make(tmp_path, key) as m:
        m.set_position(pos("A", 1))

        async def raising() -> None:
            async with m.atransaction() as tx:
                tx.set_position(pos("A", 9))
                tx.delete_position("A", "long")
                raise RuntimeError("abort")

        async def cancelled() -> None:
            inside = asyncio.Event()

            async def block() -> None:
                async with m.atransaction() as tx:
                    tx.set_position(pos("B", 9))
                    inside.set()
                    await asyncio.Event().wait()  # cancelled here

            task = asyncio.ensure_future(block())
            await inside.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        with pytest.raises(RuntimeError):
            asyncio.run(raising())
        asyncio.run(cancelled())
        assert m.get_positions() == {("A", "long"): pos("A", 1)}
        gen = m.generation

        async def bad_stage() -> None:
            async with m.atransaction() as tx:
                tx.set_position("A")  # type: ignore[arg-type]

        with pytest.raises(SchemaValidationError):
            asyncio.run(bad_stage())
        assert m.generation == gen


def test_atransaction_is_one_journal_record(tmp_path: Path, key: bytes) -> None:
    """issue 15.6: the changes of one atransaction() block are one record, replayed together after a restart."""
    with make(tmp_path, key) as m:
        m.set_position(pos("A", 1))
        before = m._journal.records

        async def main() -> None:
            async with m.atransaction() as tx:
                for i in range(5):
                    tx.set_position(pos(f"S{i}", i + 1))

        asyncio.run(main())
        assert m._journal.records == before + 1
    with make(tmp_path, key) as m2:
        assert len(m2.get_positions()) == 6


def test_async_writers_inside_a_sync_transaction_are_refused(tmp_path: Path, key: bytes) -> None:
    """issue 15.6: an async writer awaited inside transaction() of its own thread is refused, never deadlocked."""
    with make(tmp_path, key) as m:

        async def main() -> list[str]:
            refused = []
            with m.transaction():
                for name, call in {
                    "aset_position": lambda: m.aset_position(pos("A", 1)),
                    "adelete_position": lambda: m.adelete_position("A", "long"),
                    "aset_symbol_metadata": lambda: m.aset_symbol_metadata("A", {}),
                    "adelete_symbol_metadata": lambda: m.adelete_symbol_metadata("A"),
                }.items():
                    try:
                        await asyncio.wait_for(call(), 5)
                    except TransactionError:
                        refused.append(name)
            return refused

        assert len(asyncio.run(main())) == 4


def test_cancelled_asave_waits_for_the_whole_save(tmp_path: Path, key: bytes) -> None:
    """issue 15.6: asave() (snapshot mode) cancelled mid-fsync: CancelledError only once the save is whole."""
    with make(tmp_path, key, durability="snapshot") as m:
        m.set_position(pos("A", 1))
        m.save()
        m.set_position(pos("A", 2))
        gate = _GatedSync()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            gate.armed = True
            task = asyncio.ensure_future(m.asave())
            assert await loop.run_in_executor(None, gate.entered.wait, 10)
            task.cancel()
            await asyncio.sleep(0)
            assert not task.done()
            gate.release.set()
            with pytest.raises(asyncio.CancelledError):
                await task

        with fs.use(gate):
            asyncio.run(main())
        assert not m.dirty
    with make(tmp_path, key, durability="snapshot") as m2:
        assert m2.get_position("A", "long") == pos("A", 2)
