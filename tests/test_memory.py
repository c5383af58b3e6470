"""What holding positions costs in memory (issue 14.4): bytes counted by tracemalloc, never time."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.model.document import ENTRY_CACHE_POSITIONS

#: Above the bounded entry cache (a state of at most ENTRY_CACHE_POSITIONS positions keeps its entries: at most
#: a few MiB, test_entry_cache.py), so this measures what a large state costs; the issue measures at 100,000.
N = ENTRY_CACHE_POSITIONS + 1_000


def _positions(n: int) -> list[Position]:
    return [
        Position(
            symbol=f"SYM{i}/USDT:USDT",
            side="long" if i % 3 else "short",
            contracts=Decimal(i % 97) + Decimal("0.125"),
            contract_size=Decimal("0.001"),
            entry_price=Decimal(40_000 + i) / 7,
            mark_price=Decimal(40_100 + i) / 7,
            notional=Decimal(i) * Decimal("12.5"),
            leverage=Decimal(1 + i % 20),
            unrealized_pnl=Decimal(i) / 3,
            realized_pnl=Decimal(-i) / 11,
            liquidation_price=Decimal(30_000 + i),
            margin_mode="cross",
            timestamp=1_700_000_000_000 + i,
        )
        for i in range(n)
    ]


@pytest.fixture
def traced() -> Iterator[Callable[[Callable[[], object]], tuple[int, object]]]:
    """measure(build): the bytes still allocated after build() returned, and what it returned (kept alive)."""
    was_tracing = tracemalloc.is_tracing()

    def measure(build: Callable[[], object]) -> tuple[int, object]:
        gc.collect()
        if not was_tracing:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = build()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        if not was_tracing:
            tracemalloc.stop()
        return used, held

    yield measure
    if not was_tracing and tracemalloc.is_tracing():
        tracemalloc.stop()


def test_manager_holds_positions_in_at_most_1_3x_a_plain_dict(
    tmp_path: Path, key: bytes, traced: Callable[[Callable[[], object]], tuple[int, object]]
) -> None:
    """issue 14.4: a manager that loaded N positions, changed one and saved holds at most 1.3x the bytes of a
    plain dict of the same Positions (it used to keep a JSON-ready entry per position beside each: ~2x)."""
    cfg = StateConfig.in_dir(tmp_path / "state", durability="snapshot")
    with PositionStateManager(cfg, key=key) as w:
        w.save_positions(_positions(N))
    with PositionStateManager(cfg, key=key) as warm:  # the lazy imports of a load and a save, not counted
        warm.load_positions()
        warm.save()

    def manager() -> PositionStateManager:
        m = PositionStateManager(cfg, key=key)
        one = next(iter(m.load_positions().values()))
        m.set_position(dataclasses.replace(one, mark_price=one.mark_price + 1))  # type: ignore[operator]
        m.save()
        return m

    held_by_manager, m = traced(manager)
    assert isinstance(m, PositionStateManager)
    text = orjson.dumps([p.to_dict() for p in m.get_positions().values()])  # the same values, as bare code reads them
    m.close()
    del m

    def plain() -> dict[tuple[str, str], Position]:
        return {(d["symbol"], d["side"]): Position(**d) for d in orjson.loads(text)}

    held_plain, held = traced(plain)
    assert isinstance(held, dict) and len(held) == N
    assert held_by_manager <= 1.3 * held_plain, f"manager {held_by_manager} bytes, plain dict {held_plain} bytes"
