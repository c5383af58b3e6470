"""Idempotent orders: deterministic client ids, intents durable before sending, optimistic concurrency."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import (
    AccountStateStore,
    ConcurrentModificationError,
    OrderIntentNotFoundError,
    OrderIntents,
    PersistedAccountStateStore,
    PersistenceError,
    PositionStateManager,
    SchemaValidationError,
    StateConfig,
    make_client_order_id,
)
from posstate.storage import fileops as fs

ROOT = Path(__file__).resolve().parent.parent
ORDER: dict[str, Any] = {
    "strategy": "grid",
    "signal": "1763700000000:buy1",
    "symbol": "BTC/USDT:USDT",
    "side": "buy",
    "type": "limit",
    "amount": Decimal("0.01"),
    "price": Decimal("91250.5"),
}
SAFE = re.compile(r"^[A-Za-z0-9]{1,32}$")


def config(tmp_path: Path, **kw: Any) -> StateConfig:
    return StateConfig.in_dir(tmp_path / "state", encryption=False, **kw)


class FailWrite(fs.FileOps):
    """Every write fails with ENOSPC (a full disk)."""

    def write(self, fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


# ------------------------------------------------------------------------------------------ ids
def test_client_order_id_is_deterministic_and_exchange_safe() -> None:
    """Same inputs, same id (no clock); 32 characters of [A-Za-z0-9]; equal decimals written differently hash alike."""
    a = make_client_order_id(**ORDER)
    assert a == make_client_order_id(**ORDER)
    assert SAFE.match(a) and len(a) == 32 and a.startswith("ps")
    assert make_client_order_id(**{**ORDER, "amount": "0.0100", "price": 91250.50, "side": "BUY"}) == a
    assert make_client_order_id(**{**ORDER, "signal": "1763700000000:buy2"}) != a
    assert make_client_order_id(**{**ORDER, "strategy": "grid2"}) != a
    assert make_client_order_id(**{**ORDER, "price": None, "type": "market"}) != a
    assert make_client_order_id(**ORDER, prefix="") != a
    assert len(make_client_order_id(**ORDER, prefix="bot7")) == 32


def test_client_order_id_fields_cannot_run_together() -> None:
    """Moving text between fields changes the id (fields are length-prefixed, not just joined)."""
    assert make_client_order_id(**{**ORDER, "strategy": "ab", "signal": "c"}) != make_client_order_id(
        **{**ORDER, "strategy": "a", "signal": "bc"}
    )


def test_client_order_id_bad_input() -> None:
    """An unsafe prefix, an empty field or a non-number amount is a SchemaValidationError."""
    with pytest.raises(SchemaValidationError):
        make_client_order_id(**ORDER, prefix="a-b")
    with pytest.raises(SchemaValidationError):
        make_client_order_id(**{**ORDER, "signal": ""})
    with pytest.raises(SchemaValidationError):
        make_client_order_id(**{**ORDER, "amount": "lots"})


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.text(min_size=1, max_size=20),
    signal=st.text(min_size=1, max_size=40),
    amount=st.decimals(
        min_value=Decimal("0.00000001"), max_value=Decimal("1e9"), allow_nan=False, allow_infinity=False, places=8
    ),
)
def test_client_order_id_property(strategy: str, signal: str, amount: Decimal) -> None:
    """For any strategy, signal and amount the id is exchange-safe and stable across calls."""
    cid = make_client_order_id(**{**ORDER, "strategy": strategy, "signal": signal, "amount": amount})
    assert SAFE.match(cid)
    assert cid == make_client_order_id(**{**ORDER, "strategy": strategy, "signal": signal, "amount": str(amount)})


# ------------------------------------------------------------------------------------------ intents
def test_record_is_durable_and_idempotent(tmp_path: Path) -> None:
    """record() returns the id once the intent is in the file; recording again changes nothing; states move
    recorded -> sent -> filled durably; forget() removes it."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        intents = OrderIntents(m, clock=lambda: 1763700000.0)
        assert not intents.was_sent(make_client_order_id(**ORDER))
        cid = intents.record(**ORDER)
        generation = m.generation
        assert intents.record(**ORDER) == cid
        assert m.generation == generation
        assert [i.client_order_id for i in intents.unconfirmed()] == [cid]
    with PositionStateManager(cfg) as m:
        intents = OrderIntents(m)
        intent = intents.get(cid)
        assert intent is not None
        assert (intent.state, intent.amount, intent.price, intent.recorded_at) == (
            "recorded",
            Decimal("0.01"),
            Decimal("91250.5"),
            1763700000000,
        )
        intents.mark_sent(cid, exchange_order_id="8389765")
        intents.mark_filled(cid)
    with PositionStateManager(cfg) as m:
        intents = OrderIntents(m)
        intent = intents.get(cid)
        assert intent is not None and (intent.state, intent.exchange_order_id) == ("filled", "8389765")
        assert intents.unconfirmed() == []
        assert intents.forget(cid) is True
        assert intents.forget(cid) is False
        with pytest.raises(OrderIntentNotFoundError):
            intents.mark_sent(cid)
    with PositionStateManager(cfg) as m:
        assert OrderIntents(m).all() == []


def test_failed_record_is_not_claimed(tmp_path: Path) -> None:
    """If the intent cannot be written (ENOSPC), record() raises PersistenceError and was_sent stays False,
    so the bot does not send; once the disk has room, record() succeeds."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        intents = OrderIntents(m)
        with fs.use(FailWrite()), pytest.raises(PersistenceError):
            intents.record(**ORDER)
        cid = make_client_order_id(**ORDER)
        assert not intents.was_sent(cid)
        assert m.get_symbol_metadata("__posstate_orders__") is None
        assert intents.record(**ORDER) == cid
        assert intents.was_sent(cid)


def test_intents_hidden_from_store_and_kept_by_flush(tmp_path: Path) -> None:
    """The account store neither shows nor deletes the reserved intents entry, and refuses to write it."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        cid = OrderIntents(m).record(**ORDER)
        store = PersistedAccountStateStore(m)
        assert store.get_symbols_with_metadata() == []
        store.set_symbol_metadata("BTC/USDT:USDT", {"entries": 1})
        store.delete_symbol_metadata("BTC/USDT:USDT")
        assert OrderIntents(m).was_sent(cid)
        with pytest.raises(SchemaValidationError):
            AccountStateStore().set_all_symbol_metadata({"__posstate_orders__": {}})


CHILD = textwrap.dedent(
    """
    import sys
    from decimal import Decimal
    from posstate import OrderIntents, PositionStateManager, StateConfig
    m = PositionStateManager(StateConfig.in_dir(sys.argv[1], encryption=False))
    cid = OrderIntents(m).record(strategy="grid", signal="1763700000000:buy1", symbol="BTC/USDT:USDT", side="buy",
                                 type="limit", amount=Decimal("0.01"), price=Decimal("91250.5"))
    print(cid, flush=True)
    sys.stdin.read()  # "sending" would happen here; the parent kills us first
    print("sent", flush=True)
    """
)


class FakeExchange:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def create_order(self, cid: str) -> None:
        self.sent.append(cid)


def place_once(intents: OrderIntents, exchange: FakeExchange) -> str:
    """The bot's order path: check, record durably, then send."""
    cid = make_client_order_id(**ORDER)
    if intents.was_sent(cid):
        return "confirm-with-exchange"
    intents.record(**ORDER)
    exchange.create_order(cid)
    intents.mark_sent(cid)
    return "sent"


def test_kill_between_record_and_send(tmp_path: Path) -> None:
    """A real child records an intent and is killed with SIGKILL before sending: the restarted bot (parent)
    sees the intent under the same deterministic id and does not send the order again."""
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        cid = child.stdout.readline().decode().strip()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        rest = child.stdout.read()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and b"sent" not in rest
    assert cid == make_client_order_id(**ORDER)
    exchange = FakeExchange()
    with PositionStateManager(StateConfig.in_dir(state_dir, encryption=False)) as m:
        intents = OrderIntents(m)
        assert intents.was_sent(cid)
        assert [i.client_order_id for i in intents.unconfirmed()] == [cid]
        assert place_once(intents, exchange) == "confirm-with-exchange"
    assert exchange.sent == []


def test_fresh_bot_sends_once(tmp_path: Path) -> None:
    """Without a prior intent the order is sent once; a second attempt with the same decision is not sent."""
    exchange = FakeExchange()
    with PositionStateManager(config(tmp_path)) as m:
        intents = OrderIntents(m)
        assert place_once(intents, exchange) == "sent"
        assert place_once(intents, exchange) == "confirm-with-exchange"
    assert len(exchange.sent) == 1


# ------------------------------------------------------------------------------------------ optimistic concurrency
def test_save_expected_generation(tmp_path: Path) -> None:
    """save(expected_generation=N) succeeds while the state is at N and is refused with
    ConcurrentModificationError once someone saved in between; the file keeps the other save."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        m.set_symbol_metadata("A", {"n": 1})
        seen = m.generation
        assert m.save(expected_generation=seen) == seen + 1
        stale = seen
        m.set_symbol_metadata("A", {"n": 2})
        with pytest.raises(ConcurrentModificationError) as info:
            m.save(expected_generation=stale)
        # The journaled change moved the generation past the save's (issue 12.10).
        assert info.value.expected == stale and info.value.found == seen + 2 == m.generation
        assert m.dirty
        assert m.save(expected_generation=m.generation) == seen + 3
    with PositionStateManager(cfg) as m:
        assert m.get_symbol_metadata("A") == {"n": 2}
        with pytest.raises(ConcurrentModificationError):
            m.save(expected_generation=0)


def test_asave_expected_generation(tmp_path: Path) -> None:
    """The asyncio variant takes the same keyword."""
    import asyncio

    with PositionStateManager(config(tmp_path)) as m:
        m.set_symbol_metadata("A", {"n": 1})
        seen = m.generation
        assert asyncio.run(m.asave(expected_generation=seen)) == seen + 1 == m.generation
        with pytest.raises(ConcurrentModificationError):
            asyncio.run(m.asave(expected_generation=seen))  # stale now


# ------------------------------------------------------------------------------------------ issue 12.18
def test_client_order_id_pinned_for_ordinary_values() -> None:
    """issue 12.18: the canonical form of ordinary amounts and prices did not change (ids made before still match)."""
    assert make_client_order_id(**ORDER) == "ps26102f48a1c4c6635c6bd402cd3c89"
    assert (
        make_client_order_id(**{**ORDER, "amount": "100", "price": None, "type": "market"}) == "ps962da1a315e683ddcf2287a1e21cb9"
    )
    assert make_client_order_id(**{**ORDER, "amount": "-0", "price": "1E+3"}) == "ps3d3dc2e4b43f0c3f0b7473e404ad28"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param("1E-999", "0", id="tiny-vs-zero"),
        pytest.param("1" * 29, "1" * 28 + "0", id="29-digits"),
        pytest.param("1.0000000000000000000000000001", "1", id="28-places"),
        pytest.param("1E+101", "1E+102", id="huge-exponents"),
    ],
)
def test_client_order_id_never_rounds(a: str, b: str) -> None:
    """issue 12.18: amounts that differ beyond a Decimal context's precision or exponent range give different ids."""
    assert make_client_order_id(**{**ORDER, "amount": a}) != make_client_order_id(**{**ORDER, "amount": b})
    assert make_client_order_id(**{**ORDER, "price": a}) != make_client_order_id(**{**ORDER, "price": b})


@pytest.mark.parametrize("value", ["1E+999999999", "-1E+999999999", "1E-999999999", "1E-99999999", "1E+1000"])
def test_client_order_id_refuses_extreme_exponents(value: str) -> None:
    """issue 12.18: an amount or price whose exponent is beyond +-999 (the schema's decimal rule) is a
    SchemaValidationError, never decimal.Overflow and never the id of another amount (1E-99999999 was 0's)."""
    with pytest.raises(SchemaValidationError, match="exponent"):
        make_client_order_id(**{**ORDER, "amount": value})
    with pytest.raises(SchemaValidationError, match="exponent"):
        make_client_order_id(**{**ORDER, "price": value})


@pytest.mark.parametrize(
    "value", ["1E+999", "-1E-999", "9" * 60, "0.000000000000000000000000000000000000000000000000000000000001"]
)
def test_client_order_id_extreme_but_valid_values(value: str) -> None:
    """issue 12.18: the largest and smallest amounts a document can hold give an id, without decimal.Overflow."""
    assert SAFE.match(make_client_order_id(**{**ORDER, "amount": value, "price": value}))


_DECIMALS = st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: len(str(d)) <= 64 and abs(d.adjusted()) <= 999)


@settings(max_examples=300, deadline=None)
@given(a=_DECIMALS, b=_DECIMALS)
def test_client_order_id_distinct_values_distinct_ids(a: Decimal, b: Decimal) -> None:
    """issue 12.18: two amounts give the same id exactly when they are the same number (1.0 and 1.00 alike)."""
    same = make_client_order_id(**{**ORDER, "amount": a}) == make_client_order_id(**{**ORDER, "amount": b})
    assert same == (a == b), (a, b)


@settings(max_examples=200, deadline=None)
@given(
    digits=st.integers(min_value=0, max_value=10**40),
    exponent=st.one_of(st.integers(min_value=-1100, max_value=1100), st.integers(min_value=-(10**9), max_value=10**9)),
    zeros=st.integers(min_value=0, max_value=5),
    negative=st.booleans(),
)
def test_client_order_id_equal_values_equal_ids(digits: int, exponent: int, zeros: int, negative: bool) -> None:
    """issue 12.18: the same number written with trailing zeros (1.0 vs 1.00, 1E3 vs 10E2) gives the same id."""
    sign = "-" if negative else ""
    a = f"{sign}{digits}E{exponent}"
    b = f"{sign}{digits}{'0' * zeros}E{exponent - zeros}"
    if len(a) > 64 or len(b) > 64:
        return
    if abs(Decimal(a).adjusted()) > 999:  # refused, alike: see test_client_order_id_refuses_extreme_exponents
        with pytest.raises(SchemaValidationError):
            make_client_order_id(**{**ORDER, "amount": b})
        return
    assert make_client_order_id(**{**ORDER, "amount": a}) == make_client_order_id(**{**ORDER, "amount": b})
