"""The position record: a ccxt unified position with snake_case names and exact decimals.

Quantities and prices are :class:`~decimal.Decimal` and are written as decimal strings, never binary floats:
``Decimal("0.00000001")`` saved comes back equal with the same digits. A float from ccxt becomes the
Decimal of its shortest repr, so ``0.1`` is ``Decimal("0.1")``, not ``0.1000000000000000055...``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from operator import attrgetter
from typing import Any, Literal, cast

from posstate.core.errors import SchemaValidationError
from posstate.core.text import BAD_TEXT as BAD_TEXT  # re-exported: the model's text rule

Side = Literal["long", "short"]
MarginMode = Literal["cross", "isolated"]
PositionKey = tuple[str, Side]

SIDES: frozenset[str] = frozenset({"long", "short"})
MARGIN_MODES: frozenset[str] = frozenset({"cross", "isolated"})
#: Fields holding a Decimal (or None); the order follows the ccxt unified position.
DECIMAL_FIELDS: tuple[str, ...] = (
    "contracts",
    "contract_size",
    "entry_price",
    "mark_price",
    "notional",
    "leverage",
    "unrealized_pnl",
    "realized_pnl",
    "liquidation_price",
    "stop_loss_price",
    "take_profit_price",
)
REQUIRED_FIELDS: frozenset[str] = frozenset({"symbol", "side", "contracts", "entry_price"})
MAX_SYMBOL_LENGTH = 128
MAX_DECIMAL_LENGTH = 64
#: Largest exponent a decimal's text may show (``1E+999``): three digits, the schema's decimal pattern.
MAX_DECIMAL_EXPONENT = 999
MAX_COUNTER = 2**53 - 1
#: Lone surrogates: refused in every string (other controls are fine in metadata values).
SURROGATE = re.compile(r"[\ud800-\udfff]")

_CCXT_NAMES: dict[str, str] = {
    "symbol": "symbol",
    "side": "side",
    "contracts": "contracts",
    "contractSize": "contract_size",
    "entryPrice": "entry_price",
    "markPrice": "mark_price",
    "notional": "notional",
    "leverage": "leverage",
    "unrealizedPnl": "unrealized_pnl",
    "realizedPnl": "realized_pnl",
    "liquidationPrice": "liquidation_price",
    "marginMode": "margin_mode",
    "stopLossPrice": "stop_loss_price",
    "takeProfitPrice": "take_profit_price",
    "timestamp": "timestamp",
}


def _bad(field: str, rule: str, message: str) -> SchemaValidationError:
    return SchemaValidationError(None, f"$.{field}", rule, message)


def check_text(value: str, where: str, what: str = "symbol") -> str:
    """*value* if it holds no control, lone surrogate or bidi character (see ``BAD_TEXT``), else SchemaValidationError."""
    found = BAD_TEXT.search(value)
    if found is not None:
        raise SchemaValidationError(
            None,
            where,
            "pattern",
            f"{what} holds the character U+{ord(found.group()):04X} (controls, lone surrogates and bidi overrides are refused)",
        )
    return value


def to_decimal(value: object, field: str) -> Decimal:
    """Coerce *value* to a finite Decimal: Decimal, int, str, or float (via its shortest repr).

    The result's text is at most MAX_DECIMAL_LENGTH characters with an exponent of at most three digits, and
    a negative zero becomes zero (``-0.00`` becomes ``0.00``): one text per value, which the schema accepts.
    """
    if isinstance(value, bool):
        raise _bad(field, "type", f"expected a decimal number, got a bool ({value!r})")
    if type(value) is Decimal:
        result = value
    elif isinstance(value, (Decimal, int)):  # a Decimal subclass could choose its own text (__str__): keep the value
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(field, "finite", f"expected a finite number, got {value!r}")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise _bad(field, "pattern", f"{value[:40]!r} is not a decimal number") from None
    else:
        raise _bad(field, "type", f"expected a decimal number, got {type(value).__name__}")
    if not result.is_finite():
        raise _bad(field, "finite", f"expected a finite number, got {value!r}")
    if len(str(result)) > MAX_DECIMAL_LENGTH:
        raise _bad(field, "maxLength", f"more than {MAX_DECIMAL_LENGTH} characters as text")
    if not -MAX_DECIMAL_EXPONENT <= result.adjusted() <= MAX_DECIMAL_EXPONENT:
        raise _bad(field, "pattern", f"exponent of {str(result)[:40]} is beyond +-{MAX_DECIMAL_EXPONENT}")
    if result.is_zero() and result.is_signed():
        result = result.copy_abs()
    return result


@dataclass(frozen=True, kw_only=True, slots=True)
class Position:
    """One open position, keyed by ``(symbol, side)`` so hedge mode can hold a long and a short.

    Only ``symbol``, ``side``, ``contracts`` and ``entry_price`` are required. Numbers may be given as
    Decimal, int, str or float and are stored as Decimal. An invalid value raises
    :class:`~posstate.SchemaValidationError` (a ``ValueError``) naming the field, so a Position that exists
    is always valid and a save never has to re-validate it.

    The class has ``__slots__``: a Position is fifteen references and no ``__dict__`` (about 160 bytes
    instead of 530 besides its values), so holding 100,000 of them costs what the decimals cost.
    """

    symbol: str
    side: Side
    contracts: Decimal
    contract_size: Decimal | None = None
    entry_price: Decimal
    mark_price: Decimal | None = None
    notional: Decimal | None = None
    leverage: Decimal | None = None
    unrealized_pnl: Decimal | None = None
    realized_pnl: Decimal | None = None
    liquidation_price: Decimal | None = None
    margin_mode: MarginMode | None = None
    stop_loss_price: Decimal | None = None
    take_profit_price: Decimal | None = None
    timestamp: int | None = None

    def __post_init__(self) -> None:
        sym = self.symbol
        if not isinstance(sym, str) or not 1 <= len(sym) <= MAX_SYMBOL_LENGTH:
            raise _bad("symbol", "type", f"expected a symbol of 1 to {MAX_SYMBOL_LENGTH} characters, got {sym!r}")
        check_text(sym, "$.symbol")
        if not isinstance(self.side, str) or self.side not in SIDES:
            raise _bad("side", "enum", f"expected 'long' or 'short', got {self.side!r}")
        if self.margin_mode is not None and (not isinstance(self.margin_mode, str) or self.margin_mode not in MARGIN_MODES):
            raise _bad("margin_mode", "enum", f"expected 'cross', 'isolated' or None, got {self.margin_mode!r}")
        for name in DECIMAL_FIELDS:
            value = getattr(self, name)
            if value is None:
                if name in REQUIRED_FIELDS:
                    raise _bad(name, "required", f"{name} is required")
                continue
            if (
                type(value) is not Decimal
                or not value.is_finite()
                or len(str(value)) > MAX_DECIMAL_LENGTH
                or not -MAX_DECIMAL_EXPONENT <= value.adjusted() <= MAX_DECIMAL_EXPONENT
                or (value.is_signed() and value.is_zero())
            ):
                object.__setattr__(self, name, to_decimal(value, name))
        if self.contracts < 0:
            raise _bad("contracts", "minimum", f"contracts must be >= 0, got {self.contracts}")
        ts = self.timestamp
        if ts is not None:
            if isinstance(ts, float) and float(ts).is_integer():
                ts = int(ts)
                object.__setattr__(self, "timestamp", ts)
            if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_COUNTER:
                raise _bad("timestamp", "type", f"expected milliseconds since the epoch (int >= 0), got {ts!r}")

    @property
    def key(self) -> PositionKey:
        """``(symbol, side)``: the identity of a position."""
        return (self.symbol, self.side)

    def to_dict(self) -> dict[str, str | int]:
        """The document form: snake_case keys in field order, decimals as strings, absent fields left out.

        A save builds this for every position (nothing is kept per position, issue 14.4), so it is written
        out field by field: half the time of a loop over the fields (a test holds it to that loop's result).
        """
        out: dict[str, str | int] = {"symbol": self.symbol, "side": self.side, "contracts": str(self.contracts)}
        if (v := self.contract_size) is not None:
            out["contract_size"] = str(v)
        out["entry_price"] = str(self.entry_price)
        if (v := self.mark_price) is not None:
            out["mark_price"] = str(v)
        if (v := self.notional) is not None:
            out["notional"] = str(v)
        if (v := self.leverage) is not None:
            out["leverage"] = str(v)
        if (v := self.unrealized_pnl) is not None:
            out["unrealized_pnl"] = str(v)
        if (v := self.realized_pnl) is not None:
            out["realized_pnl"] = str(v)
        if (v := self.liquidation_price) is not None:
            out["liquidation_price"] = str(v)
        if (m := self.margin_mode) is not None:
            out["margin_mode"] = m
        if (v := self.stop_loss_price) is not None:
            out["stop_loss_price"] = str(v)
        if (v := self.take_profit_price) is not None:
            out["take_profit_price"] = str(v)
        if (t := self.timestamp) is not None:
            out["timestamp"] = t
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Position:
        """Build from the document form (or any snake_case mapping); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise _bad("position", "type", f"expected a position mapping, got {type(data).__name__}")
        unknown = sorted(map(str, set(data) - _FIELD_NAMES))
        if unknown:
            raise _bad(unknown[0], "additionalProperties", f"unknown field {unknown[0]!r}")
        missing = REQUIRED_FIELDS - set(data)
        if missing:
            raise _bad(sorted(missing)[0], "required", f"{sorted(missing)[0]} is required")
        return cls(**data)

    @classmethod
    def from_ccxt(cls, data: Mapping[str, Any]) -> Position:
        """Build from a ccxt unified position dict (camelCase); extra keys such as ``info`` are ignored."""
        if not isinstance(data, Mapping):
            raise _bad("position", "type", f"expected a ccxt position dict, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for ccxt_name, name in _CCXT_NAMES.items():
            value = data.get(ccxt_name)
            if value is not None:
                kwargs[name] = value
        if "margin_mode" not in kwargs and data.get("marginType") is not None:
            kwargs["margin_mode"] = data["marginType"]
        if "side" not in kwargs:
            raise _bad("side", "required", "ccxt position has no side (flat positions report None; skip them)")
        for name in ("symbol", "contracts", "entry_price"):
            if name not in kwargs:
                raise _bad(name, "required", f"ccxt position has no {name}")
        return cls(**kwargs)


#: Every field, in declaration order (the order of a Position's slots and of its document form).
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Position))
_FIELD_NAMES: frozenset[str] = frozenset(FIELD_NAMES)
#: ``field_values(p)``: the tuple of every field of *p* in FIELD_NAMES order (one C call). Two Positions are
#: equal exactly when these tuples are (what the dataclass ``__eq__`` compares, without building them in Python).
field_values: Any = attrgetter(*FIELD_NAMES)
#: One setter per field, in FIELD_NAMES order: the slot descriptors themselves (they bypass the frozen
#: ``__setattr__``). Only the validated-document fast path uses them, to build a Position without running
#: ``__post_init__`` on values it has already checked (model/fastpath.py).
SLOT_SETTERS: tuple[Any, ...] = tuple(getattr(Position, name).__set__ for name in FIELD_NAMES)


def check_key(symbol: object, side: object) -> PositionKey:
    """A (symbol, side) key given by a caller, checked: SchemaValidationError rather than a TypeError later."""
    if not isinstance(symbol, str) or not 1 <= len(symbol) <= MAX_SYMBOL_LENGTH:
        raise _bad("symbol", "type", f"expected a symbol of 1 to {MAX_SYMBOL_LENGTH} characters, got {symbol!r}")
    check_text(symbol, "$.symbol")
    if not isinstance(side, str) or side not in SIDES:
        raise _bad("side", "enum", f"expected 'long' or 'short', got {side!r}")
    return (symbol, cast(Side, side))


def position_key_text(key: PositionKey) -> str:
    """The document key of a position: ``SYMBOL|SIDE``."""
    return f"{key[0]}|{key[1]}"


def parse_position_key(text: str) -> PositionKey:
    symbol, _, side = text.rpartition("|")
    return (symbol, cast(Side, side))
