"""Parity with accountstate's AccountStateStore: each method, snake_case, Decimal quantities."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import (
    AccountStateStore,
    ActivePositionCounts,
    Order,
    Position,
    SchemaValidationError,
    SymbolMetadataNotFoundError,
)
from posstate.model.position import BAD_TEXT


def pos(symbol: str, side: str, contracts: str, entry: str = "100", **kw: object) -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(contracts), entry_price=Decimal(entry), **kw)  # type: ignore[arg-type]


def order(
    oid: str, *, symbol: str = "BTC/USDT", side: str = "buy", type: str = "limit", status: str = "NEW", **kw: object
) -> Order:
    kw.setdefault("amount", "1")
    return Order(id=oid, symbol=symbol, side=side, type=type, status=status, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ balances
def test_wallet_balance_set_get() -> None:
    """set_wallet_balance/get_wallet_balance round-trip exactly as Decimal (floats via their repr)."""
    s = AccountStateStore()
    assert s.get_wallet_balance() == 0
    s.set_wallet_balance(0.1)
    assert s.get_wallet_balance() == Decimal("0.1")
    s.set_wallet_balance("1234.00000001")
    assert s.get_wallet_balance() == Decimal("1234.00000001")


def test_store_previous_balance() -> None:
    """store_previous_balance copies the current balance; later balance changes leave it alone."""
    s = AccountStateStore()
    s.set_wallet_balance(100)
    assert s.get_previous_balance() == 0
    s.store_previous_balance()
    s.set_wallet_balance(90)
    assert s.get_previous_balance() == 100
    assert s.get_wallet_balance() == 90


def test_balance_rejects_non_number() -> None:
    """A balance that is not a finite number is a SchemaValidationError, not a silent NaN."""
    s = AccountStateStore()
    with pytest.raises(SchemaValidationError):
        s.set_wallet_balance(float("nan"))
    with pytest.raises(SchemaValidationError):
        s.set_wallet_balance("abc")


# ------------------------------------------------------------------------------------------ positions
def test_set_get_delete_active_position() -> None:
    """Positions are keyed by (symbol, side); accountstate's LONG/SHORT spelling is accepted on lookup."""
    s = AccountStateStore()
    p = pos("BTC/USDT", "long", "0.5")
    s.set_active_position(p)
    assert s.get_active_position("BTC/USDT", "long") == p
    assert s.get_active_position("BTC/USDT", "LONG") == p
    assert s.get_active_position("BTC/USDT", "short") is None
    assert s.delete_active_position("BTC/USDT", "LONG") is True
    assert s.get_active_position("BTC/USDT", "long") is None
    assert s.delete_active_position("BTC/USDT", "long") is False


def test_position_side_validated() -> None:
    """An unknown side is refused with SchemaValidationError; a non-Position is refused too."""
    s = AccountStateStore()
    with pytest.raises(SchemaValidationError):
        s.get_active_position("BTC/USDT", "NONE")
    with pytest.raises(SchemaValidationError):
        s.set_active_position({"symbol": "BTC/USDT"})  # type: ignore[arg-type]


def test_get_all_positions_non_zero_only() -> None:
    """get_all_positions skips zero-contract entries, as accountstate skips assetQty 0."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", "long", "1"))
    s.set_active_position(pos("ETH/USDT", "short", "0"))
    assert [p.symbol for p in s.get_all_positions()] == ["BTC/USDT"]
    assert len(s.get_positions()) == 2


def test_total_active_positions_counts_hedged() -> None:
    """A symbol with a long and a short counts twice in total and once in total_hedged."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", "long", "1"))
    s.set_active_position(pos("BTC/USDT", "short", "2"))
    s.set_active_position(pos("ETH/USDT", "long", "3"))
    s.set_active_position(pos("SOL/USDT", "short", "0"))
    assert s.get_total_active_positions() == ActivePositionCounts(total=3, total_hedged=1)
    assert s.get_total_hedged_positions() == 1


def test_is_symbol_side_and_any_position() -> None:
    """A zero-contract position is not 'in position'; either side counts for is_symbol_in_any_position."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", "short", "1"))
    s.set_active_position(pos("ETH/USDT", "long", "0"))
    assert s.is_symbol_side_in_position("BTC/USDT", "short")
    assert not s.is_symbol_side_in_position("BTC/USDT", "long")
    assert s.is_symbol_in_any_position("BTC/USDT")
    assert not s.is_symbol_in_any_position("ETH/USDT")
    assert not s.is_symbol_in_any_position("XRP/USDT")


def test_process_price_event_long_and_short() -> None:
    """Long PnL is (price-entry)*contracts*contract_size, short the reverse; mark price follows."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", "long", "2", "100", contract_size=Decimal("0.5")))
    s.set_active_position(pos("BTC/USDT", "short", "3", "120"))
    s.process_price_event("BTC/USDT", "110")
    long_, short = s.get_active_position("BTC/USDT", "long"), s.get_active_position("BTC/USDT", "short")
    assert long_ is not None and short is not None
    assert long_.unrealized_pnl == Decimal("10.0")
    assert short.unrealized_pnl == Decimal("30")
    assert long_.mark_price == short.mark_price == Decimal("110")


def test_process_price_event_other_symbol_is_no_change() -> None:
    """A price for a symbol without open positions changes nothing (the version does not move)."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", "long", "1"))
    s.set_active_position(pos("ETH/USDT", "long", "0"))
    v = s.version
    s.process_price_event("XRP/USDT", 1)
    s.process_price_event("ETH/USDT", 1)
    assert s.version == v


# ------------------------------------------------------------------------------------------ leverage
def test_symbol_leverage() -> None:
    """Leverage per symbol: set/get, unknown is None, the cache view is a copy."""
    s = AccountStateStore()
    assert s.get_symbol_leverage("BTC/USDT") is None
    s.set_symbol_leverage("BTC/USDT", 10)
    assert s.get_symbol_leverage("BTC/USDT") == Decimal(10)
    cache = s.get_symbol_leverage_cache()
    cache["BTC/USDT"] = Decimal(1)
    assert s.get_symbol_leverage("BTC/USDT") == 10


# ------------------------------------------------------------------------------------------ orders
@pytest.mark.parametrize(
    ("status", "kept"),
    [
        pytest.param("NEW", True, id="new"),
        pytest.param("PARTIALLY_FILLED", True, id="partial"),
        pytest.param("FILLED", False, id="filled"),
        pytest.param("CANCELED", False, id="canceled"),
        pytest.param("cancelled", False, id="cancelled-spelling"),
        pytest.param("EXPIRED", False, id="expired"),
        pytest.param("REJECTED", False, id="rejected"),
    ],
)
def test_upsert_active_order_keeps_only_active(status: str, kept: bool) -> None:
    """upsert_active_order keeps NEW and PARTIALLY_FILLED orders and removes an order on any other status."""
    s = AccountStateStore()
    s.upsert_active_order(order("1"))
    s.upsert_active_order(order("1", status=status, filled="0.5"))
    assert (s.get_order("1") is not None) is kept
    assert len(s.get_active_orders()) == int(kept)


def test_order_lookups() -> None:
    """Lookups by id, client id, symbol, symbol+side, status and type each return exactly the matches."""
    s = AccountStateStore()
    s.upsert_active_order(order("1", client_order_id="c1"))
    s.upsert_active_order(order("2", side="sell", status="PARTIALLY_FILLED", filled="0.1"))
    s.upsert_active_order(order("3", symbol="ETH/USDT", type="market", price=None))
    assert s.get_order("2") is not None and s.get_order("2").side == "sell"  # type: ignore[union-attr]
    assert s.get_order("9") is None
    assert s.get_order_by_client_id("c1") == s.get_order("1")
    assert {o.id for o in s.get_orders_for_symbol("BTC/USDT")} == {"1", "2"}
    assert [o.id for o in s.get_orders_for_symbol_side("BTC/USDT", "SELL")] == ["2"]
    assert [o.id for o in s.get_orders_by_status("partially_filled")] == ["2"]
    assert [o.id for o in s.get_orders_by_type("MARKET")] == ["3"]
    assert len(s.get_orders()) == 3


def test_order_sorted_views() -> None:
    """Sorted by id, symbol, price (priceless last) and timestamp, ascending and descending."""
    s = AccountStateStore()
    s.upsert_active_order(order("b", symbol="ETH/USDT", price="10", timestamp=3))
    s.upsert_active_order(order("a", symbol="BTC/USDT", price="30", timestamp=1))
    s.upsert_active_order(order("c", symbol="BTC/USDT", price="20", timestamp=2, side="sell"))
    s.upsert_active_order(order("d", symbol="BTC/USDT", type="market"))
    ids = lambda orders: [o.id for o in orders]  # noqa: E731
    assert ids(s.get_orders_sorted_by_id()) == ["a", "b", "c", "d"]
    assert ids(s.get_orders_sorted_by_id(ascending=False)) == ["d", "c", "b", "a"]
    assert ids(s.get_orders_sorted_by_symbol())[-1] == "b"
    assert ids(s.get_orders_sorted_by_price()) == ["b", "c", "a", "d"]
    assert ids(s.get_orders_sorted_by_price(ascending=False)) == ["a", "c", "b", "d"]
    assert ids(s.get_orders_for_symbol_sorted_by_price("BTC/USDT")) == ["c", "a", "d"]
    assert ids(s.get_orders_for_symbol_side_sorted_by_price("BTC/USDT", "buy", ascending=False)) == ["a", "d"]
    assert ids(s.get_orders_sorted_by_timestamp()) == ["a", "c", "b", "d"]
    assert ids(s.get_orders_sorted_by_timestamp(ascending=False)) == ["b", "c", "a", "d"]


def test_delete_and_clear_orders() -> None:
    """delete_order removes one order (False when absent); clear_all_orders removes all."""
    s = AccountStateStore()
    s.upsert_active_order(order("1"))
    s.upsert_active_order(order("2"))
    assert s.delete_order("1") is True
    assert s.delete_order("1") is False
    s.clear_all_orders()
    assert s.get_orders() == []


def test_order_from_ccxt_and_validation() -> None:
    """ccxt 'open' maps to NEW or PARTIALLY_FILLED by filled; 'closed' to FILLED; bad values are refused."""
    raw = {
        "id": "42",
        "clientOrderId": "ps1",
        "symbol": "BTC/USDT",
        "side": "buy",
        "type": "limit",
        "status": "open",
        "price": 0.1,
        "amount": 2.5,
        "filled": 0.0,
        "timestamp": 1700000000000,
        "info": {},
    }
    o = Order.from_ccxt(raw)
    assert (o.status, o.price, o.amount, o.client_order_id) == ("NEW", Decimal("0.1"), Decimal("2.5"), "ps1")
    assert Order.from_ccxt({**raw, "filled": 1}).status == "PARTIALLY_FILLED"
    assert Order.from_ccxt({**raw, "status": "closed"}).status == "FILLED"
    assert Order.from_ccxt({**raw, "filled": 1}).remaining == Decimal("1.5")
    with pytest.raises(SchemaValidationError):
        order("1", status="WHATEVER")
    with pytest.raises(SchemaValidationError):
        order("1", side="up")
    with pytest.raises(SchemaValidationError):
        s = AccountStateStore()
        s.upsert_active_order({"id": "1"})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ metadata
def test_set_symbol_metadata_marks_pending() -> None:
    """set_symbol_metadata stores the data, returns a copy and marks pending persist."""
    s = AccountStateStore()
    assert not s.is_pending_persist()
    out = s.set_symbol_metadata("BTC/USDT", {"entries_long": 1, "trail": {"on": True, "levels": [1, 2]}})
    assert out == {"entries_long": 1, "trail": {"on": True, "levels": [1, 2]}}
    assert s.is_pending_persist()
    assert s.get_symbol_metadata("BTC/USDT") == out


def test_set_symbol_metadata_value_requires_init() -> None:
    """Like accountstate, setting one value before set_symbol_metadata raises (a typed LookupError)."""
    s = AccountStateStore()
    with pytest.raises(SymbolMetadataNotFoundError) as info:
        s.set_symbol_metadata_value("BTC/USDT", "entries_long", 1)
    assert isinstance(info.value, LookupError)
    assert not s.is_pending_persist()


def test_set_symbol_metadata_value_marks_pending() -> None:
    """set_symbol_metadata_value changes one key, keeps the others and marks pending persist."""
    s = AccountStateStore()
    s.set_symbol_metadata("BTC/USDT", {"a": 1, "b": 2})
    s.set_is_pending_persist(False)
    out = s.set_symbol_metadata_value("BTC/USDT", "a", 5)
    assert out == {"a": 5, "b": 2}
    assert s.is_pending_persist()


def test_get_all_and_symbols_with_metadata() -> None:
    """get_all_symbol_metadata returns every symbol's data; get_symbols_with_metadata their names."""
    s = AccountStateStore()
    s.set_symbol_metadata("BTC/USDT", {"a": 1})
    s.set_symbol_metadata("ETH/USDT", {"b": 2})
    assert s.get_all_symbol_metadata() == {"BTC/USDT": {"a": 1}, "ETH/USDT": {"b": 2}}
    assert sorted(s.get_symbols_with_metadata()) == ["BTC/USDT", "ETH/USDT"]
    assert s.get_symbol_metadata("XRP/USDT") is None


def test_delete_symbol_metadata_marks_pending() -> None:
    """Deleting existing metadata marks pending; deleting absent metadata is a no-op returning False."""
    s = AccountStateStore()
    s.set_symbol_metadata("BTC/USDT", {"a": 1})
    s.set_is_pending_persist(False)
    assert s.delete_symbol_metadata("XRP/USDT") is False
    assert not s.is_pending_persist()
    assert s.delete_symbol_metadata("BTC/USDT") is True
    assert s.is_pending_persist()
    assert s.get_symbol_metadata("BTC/USDT") is None


def test_set_all_symbol_metadata_does_not_mark_pending() -> None:
    """The restore path (set_all_symbol_metadata) replaces everything without marking pending persist."""
    s = AccountStateStore()
    s.set_symbol_metadata("OLD/USDT", {"x": 1})
    s.set_is_pending_persist(False)
    s.set_all_symbol_metadata({"BTC/USDT": {"a": 1}})
    assert not s.is_pending_persist()
    assert s.get_all_symbol_metadata() == {"BTC/USDT": {"a": 1}}


def test_set_is_pending_persist_by_hand() -> None:
    """set_is_pending_persist sets and clears the flag, as in accountstate."""
    s = AccountStateStore()
    s.set_is_pending_persist(True)
    assert s.is_pending_persist()
    s.set_is_pending_persist(False)
    assert not s.is_pending_persist()


def test_metadata_must_be_json_and_not_reserved() -> None:
    """Metadata that JSON cannot hold exactly (a Decimal, NaN) and reserved names are refused up front."""
    s = AccountStateStore()
    with pytest.raises(SchemaValidationError):
        s.set_symbol_metadata("BTC/USDT", {"price": Decimal("1.5")})
    with pytest.raises(SchemaValidationError):
        s.set_symbol_metadata("BTC/USDT", {"x": float("nan")})
    with pytest.raises(SchemaValidationError):
        s.set_symbol_metadata("__posstate_orders__", {"x": 1})
    s.set_symbol_metadata("BTC/USDT", {"a": 1})
    with pytest.raises(SchemaValidationError):
        s.set_symbol_metadata_value("BTC/USDT", "a", Decimal(1))
    assert s.get_symbol_metadata("BTC/USDT") == {"a": 1}


# ------------------------------------------------------------------------------------------ summary
def test_session_summary() -> None:
    """Summary: realised = now - start, unrealised = sum of PnL, locked margin = notional / leverage."""
    s = AccountStateStore()
    s.set_wallet_balance(1100)
    s.set_symbol_leverage("BTC/USDT", 10)
    s.set_active_position(pos("BTC/USDT", "long", "2", "100"))
    s.set_active_position(pos("ETH/USDT", "short", "1", "50", leverage=Decimal(5)))
    s.set_active_position(pos("SOL/USDT", "short", "0", "50"))
    s.process_price_event("BTC/USDT", 110)
    s.process_price_event("ETH/USDT", 40)
    summary = s.get_session_summary(1000)
    assert summary.realised_pnl == 100
    assert summary.unrealised_pnl == 30
    assert summary.locked_margin == Decimal(20) + Decimal(10)
    assert summary.available == 1070
    assert summary.if_closed_at_market == 1130
    assert len(summary.active_positions) == 2
    assert summary.to_dict()["locked_margin"] == "30"


# Keys are text: no controls, lone surrogates or bidi overrides (issue 12.17).
json_keys = st.text(max_size=6).filter(lambda s: BAD_TEXT.search(s) is None)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=50, deadline=None)
@given(data=st.dictionaries(json_keys, json_values, max_size=5))
def test_metadata_round_trips_as_independent_copies(data: dict[str, object]) -> None:
    """Any JSON dict set as metadata comes back equal, and two reads are independent copies."""
    s = AccountStateStore()
    s.set_symbol_metadata("BTC/USDT", data)
    first = s.get_symbol_metadata("BTC/USDT")
    assert first == data
    assert first is not s.get_symbol_metadata("BTC/USDT")
    assert s.snapshot().metadata["BTC/USDT"].keys() == data.keys()
