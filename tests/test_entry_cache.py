"""The manager's bounded cache of document entries (issue 14.4): kept for small states only, never stale."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posstate import PersistenceError, Position, PositionStateManager, StateConfig
from posstate.model import document as _document
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage.crypto import Keyring

SYMBOLS = [f"C{i}/USDT:USDT" for i in range(6)]


def _position(symbol: str, side: str, mark: int) -> Position:
    return Position(
        symbol=symbol,
        side=side,  # type: ignore[arg-type]
        contracts=Decimal("1.5"),
        entry_price=Decimal("100"),
        mark_price=Decimal(mark),
        margin_mode="cross",
        timestamp=1_700_000_000_000 + mark,
    )


def _written(m: PositionStateManager, key: bytes) -> dict[str, Any]:
    """The document in the state file on disk."""
    _, text = _codec.decode(m.path.read_bytes(), keyring=Keyring(key=key), path=m.path)
    doc: dict[str, Any] = orjson.loads(text)
    return doc


def _check(m: PositionStateManager, key: bytes) -> None:
    """Every cached entry is the current entry of its very Position, and the file holds what a build
    without any cache writes for the state in memory (after a save)."""
    state = m._state
    for k, (p, entry) in m._entries.items():
        assert state.positions.get(k) is p, f"cached entry of {k} is for another Position"
        assert entry == _document.position_entry(p, state.position_revs.get(k, 0)), f"cached entry of {k} is stale"
    assert len(m._entries) <= _document.ENTRY_CACHE_POSITIONS


def _check_saved(m: PositionStateManager, key: bytes) -> None:
    _check(m, key)
    assert _written(m, key) == orjson.loads(orjson.dumps(_document.build_document(m._state)))


keys = st.tuples(st.sampled_from(SYMBOLS), st.sampled_from(["long", "short"]))
change = st.one_of(
    st.tuples(st.just("set"), keys, st.integers(1, 50)),
    st.tuples(st.just("delete"), keys, st.just(0)),
)
action = st.one_of(
    change,
    st.tuples(st.just("save"), st.just(("", "")), st.just(0)),
    st.tuples(st.just("txn"), st.lists(change, min_size=1, max_size=4), st.booleans()),
    st.tuples(st.just("batch"), st.lists(change, min_size=1, max_size=4), st.just(0)),
    st.tuples(st.just("replace"), st.lists(keys, max_size=6), st.integers(1, 50)),
    st.tuples(st.just("failed save"), st.just(("", "")), st.just(0)),
    st.tuples(st.just("reload"), st.just(("", "")), st.just(0)),
)


def _do(m: PositionStateManager, c: tuple[Any, ...]) -> None:
    kind, (sym, side), mark = c
    if kind == "set":
        m.set_position(_position(sym, side, mark))
    else:
        m.delete_position(sym, side)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("durability", ["snapshot", "sync"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=1, max_size=25))
def test_saves_after_any_changes_write_what_a_build_without_cache_writes(
    tmp_path_factory: pytest.TempPathFactory, key: bytes, durability: str, actions: list[tuple[Any, ...]]
) -> None:
    """issue 14.4: after random sets, deletes, batches, transactions (committed or rolled back), failed saves and
    reloads, every save writes the document a build without any cache writes, and no cached entry is stale."""
    cfg = StateConfig.in_dir(tmp_path_factory.mktemp("cache") / "state", durability=durability)  # type: ignore[arg-type]
    m = PositionStateManager(cfg, key=key)
    try:
        m.load_positions()
        for kind, arg, extra in actions:
            if kind in ("set", "delete"):
                _do(m, (kind, arg, extra))
            elif kind == "txn":
                try:
                    with m.transaction():
                        for c in arg:
                            _do(m, c)
                        if extra:
                            raise _Boom
                except _Boom:
                    pass
            elif kind == "batch":
                ups = {(s, sd): _position(s, sd, mk) for k, (s, sd), mk in arg if k == "set"}
                dels = {(s, sd) for k, (s, sd), _ in arg if k == "delete"} - ups.keys()
                m.batch_save_positions(ups, deletes=dels)
                _check_saved(m, key)
            elif kind == "replace":
                m.save_positions({k: _position(k[0], k[1], extra) for k in arg})
                _check_saved(m, key)
            elif kind == "failed save":
                if not m.get_positions():
                    continue
                k0 = next(iter(m.get_positions()))
                m.set_position(_position(k0[0], k0[1], 999))
                real = _atomic.write_temp

                def failing(target: Path, data: bytes) -> Path:
                    raise OSError(28, "No space left on device")

                _atomic.write_temp = failing  # type: ignore[assignment]
                try:
                    with pytest.raises(PersistenceError):
                        m.save()
                finally:
                    _atomic.write_temp = real  # type: ignore[assignment]
                _check(m, key)
            elif kind == "reload":
                m.save()
                m.close()
                m = PositionStateManager(cfg, key=key)
                m.load_positions()
                assert m._entries == {}
            else:
                m.save()
                _check_saved(m, key)
            _check(m, key)
        m.save()
        _check_saved(m, key)
    finally:
        m.close()


def _many(n: int) -> list[Position]:
    return [_position(f"S{i}/USDT:USDT", "long", i + 1) for i in range(n)]


def test_a_small_state_keeps_its_entries_and_a_large_one_none(tmp_path: Path, key: bytes) -> None:
    """issue 14.4: a save keeps every entry of a state of at most ENTRY_CACHE_POSITIONS positions (the next
    save reuses them) and none above that, so holding a large state costs only its Positions."""
    limit = _document.ENTRY_CACHE_POSITIONS
    small = PositionStateManager(StateConfig.in_dir(tmp_path / "small", durability="snapshot"), key=key)
    small.save_positions(_many(limit))
    assert len(small._entries) == limit
    one = small.get_positions()[("S0/USDT:USDT", "long")]
    small.set_position(dataclasses.replace(one, mark_price=Decimal(7)))
    assert len(small._entries) == limit - 1  # the changed position's entry is dropped at once
    small.save()
    assert len(small._entries) == limit
    _check_saved(small, key)
    small.close()
    big = PositionStateManager(StateConfig.in_dir(tmp_path / "big", durability="snapshot"), key=key)
    big.save_positions(_many(limit + 1))
    assert big._entries == {}
    big.delete_position("S0/USDT:USDT", "long")  # back to the limit: the next save keeps them again
    big.save()
    assert len(big._entries) == limit
    _check_saved(big, key)
    big.close()


def test_build_document_ignores_an_entry_built_for_another_position() -> None:
    """issue 14.4: an entry is reused only for the very Position and revision it was built from, so even a
    cache a caller failed to update cannot put a stale entry into the document."""
    p = _position("A/USDT:USDT", "long", 1)
    newer = _position("A/USDT:USDT", "long", 2)
    state = _document.StateData(generation=5)
    state.positions[p.key] = newer
    state.position_revs[p.key] = 5
    cache: _document.Entries = {p.key: (p, _document.position_entry(p, 5)), ("GONE", "long"): (p, {})}
    doc = _document.build_document(state, cache)
    assert doc == _document.build_document(state)
    assert cache == {p.key: (newer, _document.position_entry(newer, 5))}
    state.position_revs[p.key] = 6  # same Position, another revision
    assert _document.build_document(state, cache) == _document.build_document(state)
