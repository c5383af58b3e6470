"""Concurrency: one writer per directory across processes; threads in one process never lose an update."""

from __future__ import annotations

import os
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from posstate import Position, PositionStateManager, StateConfig, StateLockedError, generate_key
from posstate.selftest.crashchild import digest, run_contenders

ATTEMPTS = int(os.environ.get("POSSTATE_RELIABILITY_ATTEMPTS", "150"))  # 1,000 in benchmarks/reliability.py --full


def _cfg(d: Path) -> StateConfig:
    return StateConfig.in_dir(d, backup_interval=1e9, durability="snapshot")


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    """A writer in another process gets StateLockedError naming our pid; none of its attempts writes."""
    key = generate_key()
    with PositionStateManager(_cfg(tmp_path / "s"), key=key) as m:
        m.save()
        lines = run_contenders(tmp_path / "s", key=key, processes=1, attempts=3)
        assert lines == [f"refused {os.getpid()}"] * 3
        assert m.generation == 1


def test_two_processes_contending_lose_and_interleave_nothing(tmp_path: Path) -> None:
    """2 processes x N attempts of lock+read+increment+save: every win wrote a distinct next value."""
    key = generate_key()
    lines = run_contenders(tmp_path / "s", key=key, processes=2, attempts=ATTEMPTS)
    wrote = sorted(int(x.split()[1]) for x in lines if x.startswith("wrote "))
    refused = sum(1 for x in lines if x.startswith("refused "))
    assert len(wrote) + refused == 2 * ATTEMPTS
    assert wrote == list(range(1, len(wrote) + 1))  # no value written twice (lost update), none skipped
    with PositionStateManager(_cfg(tmp_path / "s"), key=key) as m:
        m.load_positions()
        meta = m.get_symbol_metadata("COUNTER")
        assert meta is not None and meta["n"] == len(wrote)
        assert m.generation == len(wrote)


def _updates(m: PositionStateManager, t: int, n: int, save_every: int) -> None:
    sym = f"T{t}/USDT"
    for i in range(1, n + 1):
        m.set_position(Position(symbol=sym, side="long", contracts=Decimal(i), entry_price=Decimal(t + 1)))
        m.set_symbol_metadata(sym, {"i": i, "thread": t})
        if i % save_every == 0:
            m.save()


@pytest.mark.parametrize("threads", [8])
def test_threads_updating_one_manager_equal_the_serial_result(tmp_path: Path, threads: int) -> None:
    """8 threads x 1,000 updates (saving every 100) end in the same state as the same updates run serially."""
    key = generate_key()
    with PositionStateManager(_cfg(tmp_path / "par"), key=key) as m:
        m.load_positions()
        workers = [threading.Thread(target=_updates, args=(m, t, 1000, 100)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        m.save()
    with PositionStateManager(_cfg(tmp_path / "ser"), key=key) as s:
        s.load_positions()
        for t in range(threads):
            _updates(s, t, 1000, 100)
        s.save()
    with PositionStateManager(_cfg(tmp_path / "par"), key=key) as a, PositionStateManager(_cfg(tmp_path / "ser"), key=key) as b:
        pa, pb = a.load_positions(), b.load_positions()
        assert len(pa) == threads
        assert digest(pa, a.get_all_symbol_metadata()) == digest(pb, b.get_all_symbol_metadata())
        assert a.generation == b.generation == threads * 10 + 1


def test_second_manager_in_the_same_process_is_refused(tmp_path: Path) -> None:
    """The flock is per open file description: a second manager in this process is refused too."""
    key = generate_key()
    with PositionStateManager(_cfg(tmp_path / "s"), key=key), pytest.raises(StateLockedError) as info:
        PositionStateManager(_cfg(tmp_path / "s"), key=key)
    assert info.value.pid == os.getpid()
