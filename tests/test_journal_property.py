"""Property: any sequence of changes (transactions included, some aborted) replays to the same state."""

from __future__ import annotations

import shutil
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posstate import PositionStateManager, StateConfig
from posstate.model.position import Position

KEY = bytes(range(32))
SYMBOLS = st.sampled_from(["A/USDT", "B/USDT", "C/USDT"])
SIDES = st.sampled_from(["long", "short"])

op = st.one_of(
    st.tuples(st.just("set"), SYMBOLS, SIDES, st.decimals(min_value=0, max_value=10**6, places=8, allow_nan=False)),
    st.tuples(st.just("del"), SYMBOLS, SIDES),
    st.tuples(
        st.just("meta"), SYMBOLS, st.dictionaries(st.text(alphabet="abcXYZ_ 1é", max_size=5), st.integers(-5, 5), max_size=3)
    ),
    st.tuples(st.just("undmeta"), SYMBOLS),
)
step = st.one_of(op, st.tuples(st.just("txn"), st.lists(op, min_size=1, max_size=4), st.booleans()))


def _apply(m: PositionStateManager, o: tuple[Any, ...]) -> None:
    if o[0] == "set":
        m.set_position(Position(symbol=o[1], side=o[2], contracts=o[3], entry_price=Decimal("1.5")))
    elif o[0] == "del":
        m.delete_position(o[1], o[2])
    elif o[0] == "meta":
        m.set_symbol_metadata(o[1], o[2])
    else:
        m.delete_symbol_metadata(o[1])


class Abort(Exception):
    pass


def _view(m: PositionStateManager) -> tuple[Any, ...]:
    s = m._state
    return (
        dict(s.positions),
        dict(s.position_revs),
        dict(s.metadata),
        dict(s.metadata_revs),
        dict(s.position_tombstones),
        dict(s.metadata_tombstones),
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=12), mode=st.sampled_from(["sync", "group"]), max_records=st.sampled_from([3, 1000]))
def test_replay_equals_memory(steps: list[tuple[Any, ...]], mode: str, max_records: int) -> None:
    """After any mix of changes, compactions and aborted transactions, a reopened manager holds exactly
    what the writer held in memory."""
    d = Path(tempfile.mkdtemp(prefix="posstate-prop-"))
    try:
        cfg = StateConfig.in_dir(d, durability=mode, journal_max_records=max_records)
        with PositionStateManager(cfg, key=KEY) as m:
            m.load_positions()
            for s in steps:
                if s[0] != "txn":
                    _apply(m, s)
                    continue
                try:
                    with m.transaction():
                        for o in s[1]:
                            _apply(m, o)
                        if s[2]:
                            raise Abort
                except Abort:
                    pass
            expected = _view(m)
        with PositionStateManager(cfg, key=KEY) as m2:
            m2.load_positions()
            assert _view(m2) == expected
    finally:
        shutil.rmtree(d, ignore_errors=True)
