"""Position: the ccxt unified position with exact Decimals."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import Position, SchemaValidationError
from posstate.model.position import DECIMAL_FIELDS, FIELD_NAMES

CCXT = {
    "info": {"raw": "exchange payload"},
    "id": None,
    "symbol": "BTC/USDT:USDT",
    "timestamp": 1700000000000,
    "datetime": "2023-11-14T22:13:20.000Z",
    "isolated": False,
    "hedged": True,
    "side": "short",
    "contracts": 0.1,
    "contractSize": 1.0,
    "entryPrice": 35123.4,
    "markPrice": 35100.05,
    "notional": 3510.005,
    "leverage": 10,
    "collateral": 351.0,
    "initialMargin": 351.0,
    "maintenanceMargin": 17.5,
    "unrealizedPnl": 2.335,
    "realizedPnl": -0.35,
    "liquidationPrice": 38500.5,
    "marginMode": "cross",
    "marginRatio": 0.05,
    "percentage": 0.66,
    "stopLossPrice": 36000,
    "takeProfitPrice": 33000.25,
}


def test_from_ccxt_maps_every_field_and_ignores_extras() -> None:
    """from_ccxt maps camelCase to snake_case, turns floats into shortest-repr Decimals, ignores info."""
    p = Position.from_ccxt(CCXT)
    assert p.key == ("BTC/USDT:USDT", "short")
    assert p.contracts == Decimal("0.1") and str(p.contracts) == "0.1"
    assert p.entry_price == Decimal("35123.4")
    assert p.notional == Decimal("3510.005")
    assert p.leverage == Decimal(10)
    assert p.realized_pnl == Decimal("-0.35")
    assert p.stop_loss_price == Decimal(36000)
    assert p.margin_mode == "cross"
    assert p.timestamp == 1700000000000
    assert all(
        type(getattr(p, n)) is Decimal
        for n in ("contract_size", "mark_price", "unrealized_pnl", "liquidation_price", "take_profit_price")
    )


def test_from_ccxt_without_side_is_refused() -> None:
    """A flat ccxt position (side None) raises a SchemaValidationError naming side."""
    with pytest.raises(SchemaValidationError) as info:
        Position.from_ccxt({**CCXT, "side": None})
    assert info.value.json_path == "$.side"


def test_only_four_fields_required() -> None:
    """symbol, side, contracts, entry_price are enough; the rest default to None."""
    p = Position(symbol="ETH/USDT", side="long", contracts=Decimal(1), entry_price=Decimal("2000.5"))
    assert p.mark_price is None and p.timestamp is None and p.margin_mode is None
    assert p.to_dict() == {"symbol": "ETH/USDT", "side": "long", "contracts": "1", "entry_price": "2000.5"}


def test_frozen() -> None:
    """Position is immutable."""
    p = Position(symbol="A", side="long", contracts=1, entry_price=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.contracts = Decimal(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "json_path", "rule"),
    [
        pytest.param({"side": "flat"}, "$.side", "enum", id="side"),
        pytest.param({"side": ["long"]}, "$.side", "enum", id="side-unhashable"),
        pytest.param({"margin_mode": {}}, "$.margin_mode", "enum", id="margin-unhashable"),
        pytest.param({"symbol": 5}, "$.symbol", "type", id="symbol-int"),
        pytest.param({"symbol": ""}, "$.symbol", "type", id="empty-symbol"),
        pytest.param({"symbol": "X" * 129}, "$.symbol", "type", id="long-symbol"),
        pytest.param({"symbol": "A\nB"}, "$.symbol", "pattern", id="control-char"),
        pytest.param({"contracts": Decimal(-1)}, "$.contracts", "minimum", id="negative"),
        pytest.param({"contracts": float("nan")}, "$.contracts", "finite", id="nan"),
        pytest.param({"contracts": Decimal("Infinity")}, "$.contracts", "finite", id="inf"),
        pytest.param({"contracts": True}, "$.contracts", "type", id="bool"),
        pytest.param({"contracts": "abc"}, "$.contracts", "pattern", id="text"),
        pytest.param({"contracts": [1]}, "$.contracts", "type", id="list"),
        pytest.param({"contracts": "1" * 65}, "$.contracts", "maxLength", id="too-long"),
        pytest.param({"margin_mode": "portfolio"}, "$.margin_mode", "enum", id="margin"),
        pytest.param({"timestamp": -1}, "$.timestamp", "type", id="ts-negative"),
        pytest.param({"timestamp": 1.5}, "$.timestamp", "type", id="ts-fraction"),
        pytest.param({"timestamp": 2**53}, "$.timestamp", "type", id="ts-huge"),
        pytest.param({"entry_price": None}, "$.entry_price", "required", id="required"),
    ],
)
def test_invalid_values_name_field_and_rule(kwargs: dict[str, object], json_path: str, rule: str) -> None:
    """Every invalid value raises SchemaValidationError (a ValueError) with the field's path and the rule."""
    base: dict[str, object] = {"symbol": "BTC/USDT", "side": "long", "contracts": Decimal(1), "entry_price": Decimal(1)}
    with pytest.raises(SchemaValidationError) as info:
        Position(**{**base, **kwargs})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert (info.value.json_path, info.value.rule) == (json_path, rule)
    assert json_path in str(info.value) and rule in str(info.value)


def test_float_timestamp_with_integer_value_becomes_int() -> None:
    """A ccxt timestamp of 1.7e12 (float) is stored as an int."""
    p = Position(symbol="A", side="long", contracts=1, entry_price=1, timestamp=1700000000000.0)  # type: ignore[arg-type]
    assert p.timestamp == 1700000000000 and type(p.timestamp) is int


def test_from_dict_rejects_unknown_and_missing() -> None:
    """from_dict refuses unknown keys and missing required keys."""
    with pytest.raises(SchemaValidationError, match="additionalProperties"):
        Position.from_dict({"symbol": "A", "side": "long", "contracts": "1", "entry_price": "1", "colour": "red"})
    with pytest.raises(SchemaValidationError, match="required"):
        Position.from_dict({"symbol": "A", "side": "long", "contracts": "1"})


@settings(max_examples=150, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=0))
def test_float_becomes_decimal_of_shortest_repr(x: float) -> None:
    """Any finite float from ccxt becomes Decimal(repr(x)), and survives to_dict/from_dict."""
    p = Position(symbol="S", side="long", contracts=x, entry_price=x)  # type: ignore[arg-type]
    assert p.contracts == Decimal(repr(x))
    back = Position.from_dict(p.to_dict())
    assert back == p and str(back.contracts) == str(p.contracts)


@settings(max_examples=200, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(lambda d: len(str(d)) <= 64))
def test_decimal_dict_round_trip_keeps_digits(d: Decimal) -> None:
    """A Decimal survives to_dict/from_dict with the same sign, digits and exponent."""
    p = Position(symbol="S", side="short", contracts=abs(d), entry_price=d)
    back = Position.from_dict(p.to_dict())
    assert back.entry_price.as_tuple() == d.as_tuple()
    assert back.contracts.as_tuple() == abs(d).as_tuple()


_OPTIONAL = st.one_of(
    st.none(), st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**9), max_value=10**9)
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {name: _OPTIONAL for name in DECIMAL_FIELDS if name not in ("contracts", "entry_price")},
        optional={"margin_mode": st.sampled_from(["cross", "isolated"]), "timestamp": st.integers(0, 2**53 - 1)},
    )
)
def test_to_dict_is_every_present_field_in_order(values: dict[str, object]) -> None:
    """issue 14.4: the field-by-field to_dict (a save builds it for every position) equals a loop over every
    field: the same keys in field order, decimals as text, None left out (a new field missed there fails)."""
    p = Position(symbol="S", side="long", contracts=Decimal(1), entry_price=Decimal("2.5"), **values)  # type: ignore[arg-type]
    expected = {
        name: str(value) if name in DECIMAL_FIELDS else value for name in FIELD_NAMES if (value := getattr(p, name)) is not None
    }
    assert list(p.to_dict().items()) == list(expected.items())
    assert Position.from_dict(p.to_dict()) == p


def test_position_has_slots_and_no_dict() -> None:
    """issue 14.4: a Position is its fifteen slots (no per-instance __dict__), frozen, and equal by value."""
    p = Position(symbol="S", side="long", contracts=Decimal(1), entry_price=Decimal(2))
    assert not hasattr(p, "__dict__")
    assert Position.__slots__ == FIELD_NAMES
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.contracts = Decimal(3)  # type: ignore[misc]
    assert p == dataclasses.replace(p) and hash(p) == hash(dataclasses.replace(p))
