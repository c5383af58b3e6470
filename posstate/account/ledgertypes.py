"""Records of the order ledger: a fill (a ccxt trade), an execution an order keeps, and the read-only view of
a stored order. Statuses are defined here; the lifecycle rules are in lifecycle.py."""

from __future__ import annotations

import decimal
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ParamSpec, TypeVar

from posstate.core.errors import SchemaValidationError
from posstate.model.position import SURROGATE, to_decimal

#: Longest exchange or trade id kept (the ledger schema's ``id``).
MAX_ID_LENGTH = 256

TERMINAL: frozenset[str] = frozenset({"rejected", "filled", "cancelled", "expired"})
#: Orders that may be resting on the exchange (``unknown``: nobody knows yet).
LIVE: frozenset[str] = frozenset({"sent", "accepted", "unknown", "partially_filled"})
_ZERO = Decimal(0)

#: The ledger's arithmetic context: Python's default, fixed, so that a bot that changes its own decimal context
#: (``getcontext().prec = 8`` is common) changes no stored total, average or position, and a stored order still
#: equals its events when loaded under any context.
LEDGER_CONTEXT = decimal.Context(
    prec=28,
    rounding=decimal.ROUND_HALF_EVEN,
    Emin=-999999,
    Emax=999999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def ledger_arithmetic(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run *fn* under :data:`LEDGER_CONTEXT` (a copy, local to the call and the thread)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with decimal.localcontext(LEDGER_CONTEXT):
            return fn(*args, **kwargs)

    return wrapper


@ledger_arithmetic
def tidy(value: Decimal) -> Decimal:
    """*value* without trailing zeros after the point (``6.50000`` -> ``6.5``, ``100.0`` -> ``100``): what a
    division leaves, written the way an exchange writes prices."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent >= 0:
        return value
    n = value.normalize()
    n_exponent = n.as_tuple().exponent
    return n if isinstance(n_exponent, int) and n_exponent <= 0 else value.quantize(Decimal(1))


def looks_binary_float(text: str) -> bool:
    """A decimal text a binary float made (``0.30000000000000004``, ``0.1000000000000000055511151231257827``):
    17 or more significant digits that are exactly a double, or a double's shortest repr."""
    try:
        d = Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        return False
    if not d.is_finite():
        return False
    digits = "".join(map(str, d.as_tuple().digits)).rstrip("0")  # 6.50000 is a division's text, not a float's
    if len(digits) < 17:
        return False
    f = float(d)
    return Decimal(f) == d or Decimal(repr(f)) == d


def ledger_decimal(value: Any, name: str) -> Decimal:
    """*value* as a Decimal (:func:`~posstate.model.position.to_decimal`), refusing a binary float's text
    (``0.1 + 0.2`` gives ``0.30000000000000004``): stored, the ledger's invariant would report it at the next
    load and block trading until fixed by hand; refused here, the bot rounds it to the exchange's precision first."""
    result = to_decimal(value, name)
    if looks_binary_float(str(result)):
        raise SchemaValidationError(
            None,
            f"$.{name}",
            "pattern",
            f"{name} {str(result)[:40]} is a binary float's arithmetic, not a decimal the exchange uses; round it "
            "first (ccxt: exchange.amount_to_precision / price_to_precision)",
        )
    return result


def _opt_text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # exchanges' numeric ids (Binance trade ids)
    if not isinstance(value, str) or not value.strip():
        raise SchemaValidationError(None, f"$.{name}", "type", f"{name} must be a non-empty string, got {str(value)[:40]!r}")
    text: str = value.strip()  # " 123" and "123" are one trade: a padded replay must not count twice
    if len(text) > MAX_ID_LENGTH or SURROGATE.search(text) is not None:
        raise SchemaValidationError(
            None, f"$.{name}", "maxLength", f"{name} is not an id of 1 to {MAX_ID_LENGTH} characters of text"
        )
    return text


def _ms(value: Any, name: str = "timestamp") -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaValidationError(None, f"$.{name}", "type", f"expected milliseconds since the epoch, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- fills


@dataclass(frozen=True, slots=True, kw_only=True)
class Fill:
    """One execution (a ccxt trade). ``trade_id`` is the exchange's id: the key of de-duplication."""

    trade_id: str
    price: Decimal
    amount: Decimal
    order_id: str | None = None
    client_order_id: str | None = None
    symbol: str | None = None
    side: str | None = None
    fee: Decimal = _ZERO
    fee_currency: str | None = None
    timestamp: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trade_id", _opt_text(self.trade_id, "trade_id"))
        if self.trade_id is None:
            raise SchemaValidationError(None, "$.trade_id", "required", "a fill needs the exchange's trade id")
        for name in ("price", "amount", "fee"):
            object.__setattr__(self, name, ledger_decimal(getattr(self, name), name))
        if self.amount <= 0 or self.price < 0:
            raise SchemaValidationError(None, "$.amount", "minimum", "a fill has a positive amount and a price >= 0")
        object.__setattr__(self, "order_id", _opt_text(self.order_id, "order_id"))
        object.__setattr__(self, "client_order_id", _opt_text(self.client_order_id, "client_order_id"))
        object.__setattr__(self, "timestamp", _ms(self.timestamp))

    @classmethod
    def from_ccxt(cls, trade: Mapping[str, Any]) -> Fill:
        """From a ccxt unified trade (``fetch_my_trades``, ``watch_my_trades``): id, order, price, amount, fee."""
        if not isinstance(trade, Mapping):
            raise SchemaValidationError(None, "$", "type", f"expected a ccxt trade dict, got {type(trade).__name__}")
        fee = trade.get("fee") or {}
        info = trade.get("info") or {}
        # The unified trade has no client id; the raw payload often does (binance's user-data stream "c",
        # bybit's "orderLinkId"): with it a trade of an order whose acceptance was lost still finds its order.
        cid = trade.get("clientOrderId")
        if not cid and isinstance(info, Mapping):
            cid = info.get("clientOrderId") or info.get("orderLinkId") or info.get("c")
        return cls(
            trade_id=trade.get("id"),  # type: ignore[arg-type]
            order_id=trade.get("order"),
            client_order_id=cid or None,
            symbol=trade.get("symbol"),
            side=trade.get("side"),
            price=trade.get("price"),  # type: ignore[arg-type]
            amount=trade.get("amount"),  # type: ignore[arg-type]
            fee=(fee.get("cost") if isinstance(fee, Mapping) else None) or _ZERO,
            fee_currency=fee.get("currency") if isinstance(fee, Mapping) else None,
            timestamp=trade.get("timestamp"),
        )

    def execution(self) -> dict[str, Any]:
        """The JSON an order keeps for this fill."""
        return {
            "trade_id": self.trade_id,
            "price": str(self.price),
            "amount": str(self.amount),
            "fee": str(self.fee),
            "fee_currency": self.fee_currency,
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True, slots=True)
class Execution:
    trade_id: str
    price: Decimal
    amount: Decimal
    fee: Decimal
    fee_currency: str | None
    timestamp: int | None


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """One order of the ledger, as stored (a read-only view; decimals are Decimal)."""

    key: str
    client_order_id: str | None
    exchange_order_id: str | None
    origin: str
    strategy: str | None
    signal: str | None
    symbol: str
    side: str
    type: str
    amount: Decimal
    price: Decimal | None
    reduce_only: bool
    position_side: str
    epoch: int
    status: str
    reason: str | None
    filled: Decimal
    average_price: Decimal | None
    fees: Mapping[str, Decimal]
    fill_count: int
    trade_ids: tuple[str, ...]
    executions: tuple[Execution, ...]
    exchange_filled: Decimal | None
    created_at: int
    updated_at: int
    version: int
    #: When the order went out (``record_order_sent``; adopted orders: when adopted); None: never sent.
    sent_at: int | None = None

    @property
    def is_live(self) -> bool:
        """May be resting on the exchange (``sent``, ``accepted``, ``unknown``, ``partially_filled``)."""
        return self.status in LIVE

    @property
    def remaining(self) -> Decimal:
        return self.amount - self.filled

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OrderRecord:
        price = d.get("price")
        avg = d.get("average_price")
        ex = d.get("exchange_filled")
        return cls(
            key=d["key"],
            client_order_id=d.get("client_order_id"),
            exchange_order_id=d.get("exchange_order_id"),
            origin=d["origin"],
            strategy=d.get("strategy"),
            signal=d.get("signal"),
            symbol=d["symbol"],
            side=d["side"],
            type=d["type"],
            amount=Decimal(d["amount"]),
            price=Decimal(price) if price is not None else None,
            reduce_only=bool(d["reduce_only"]),
            position_side=d["position_side"],
            epoch=int(d["epoch"]),
            status=d["status"],
            reason=d.get("reason"),
            filled=Decimal(d["filled"]),
            average_price=Decimal(avg) if avg is not None else None,
            fees={c: Decimal(v) for c, v in d["fees"].items()},
            fill_count=int(d["fill_count"]),
            trade_ids=tuple(d["trade_ids"]),
            executions=tuple(
                Execution(
                    e["trade_id"],
                    Decimal(e["price"]),
                    Decimal(e["amount"]),
                    Decimal(e["fee"]),
                    e.get("fee_currency"),
                    e.get("timestamp"),
                )
                for e in d["executions"]
            ),
            exchange_filled=Decimal(ex) if ex is not None else None,
            created_at=int(d["created_at"]),
            updated_at=int(d["updated_at"]),
            version=int(d["version"]),
            sent_at=d.get("sent_at"),
        )
