"""Records of the account state store: orders, snapshots, incremental updates, summaries.

Everything here is immutable, so a reader in another thread can hold any of it without a lock while the
store's writer goes on: dataclasses are frozen, mappings are :class:`types.MappingProxyType` over dicts no
one else references, and metadata are frozen deeply (dicts become mapping proxies, lists become tuples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal, cast

from posstate.core.errors import SchemaValidationError
from posstate.model.position import Position, PositionKey, Side, to_decimal

#: Symbol-metadata names starting with this are reserved for posstate itself (order intents live under
#: ``__posstate_orders__``); the account store refuses them and hides them on restore.
RESERVED_PREFIX = "__posstate_"

#: Order statuses the store keeps (accountstate's rule: anything else is removed on upsert).
ACTIVE_ORDER_STATUSES: frozenset[str] = frozenset({"NEW", "PARTIALLY_FILLED"})
ORDER_STATUSES: frozenset[str] = ACTIVE_ORDER_STATUSES | {"FILLED", "CANCELED", "EXPIRED", "REJECTED", "PENDING_CANCEL"}
_CCXT_STATUS = {"closed": "FILLED", "canceled": "CANCELED", "cancelled": "CANCELED", "expired": "EXPIRED", "rejected": "REJECTED"}

OrderSide = Literal["buy", "sell"]
UpdateKind = Literal["balance", "position", "order", "metadata", "leverage", "resync"]
EMPTY: Mapping[Any, Any] = MappingProxyType({})


def is_reserved(symbol: str) -> bool:
    return symbol.startswith(RESERVED_PREFIX)


def normalize_side(side: str) -> Side:
    """``"long"``/``"short"`` in any case (accountstate writes ``LONG``/``SHORT``)."""
    low = side.lower() if isinstance(side, str) else side
    if low == "long":
        return "long"
    if low == "short":
        return "short"
    raise SchemaValidationError(None, "$.side", "enum", f"expected 'long' or 'short', got {side!r}")


def freeze_json(value: Any) -> Any:
    """A deeply immutable copy of a JSON value: dicts become mapping proxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze_json(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze_json(v) for v in value)
    return value


def thaw_json(value: Any) -> Any:
    """A fresh, mutable deep copy of a frozen JSON value (editing it changes nothing in the store)."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(v) for v in value]
    return value


def _ccxt_timestamp(ts: Any) -> int | None:
    """ccxt's millisecond timestamp as an int; None when absent or not a number. NaN and infinity are
    SchemaValidationError (never a ValueError or OverflowError from int())."""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None
    if isinstance(ts, float) and not math.isfinite(ts):
        raise SchemaValidationError(None, "$.timestamp", "type", f"expected milliseconds since the epoch, got {ts!r}")
    return int(ts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    """An exchange order with ccxt-like fields; quantities and prices are Decimal.

    ``status`` uses accountstate's upper-case names (``NEW``, ``PARTIALLY_FILLED``, ``FILLED``, ``CANCELED``,
    ``EXPIRED``, ``REJECTED``, ``PENDING_CANCEL``); :meth:`from_ccxt` maps ccxt's ``open``/``closed``/... to them.
    """

    id: str
    symbol: str
    side: OrderSide
    type: str
    status: str
    amount: Decimal
    price: Decimal | None = None
    filled: Decimal = Decimal(0)
    client_order_id: str | None = None
    timestamp: int | None = None

    def __post_init__(self) -> None:
        for name in ("id", "symbol", "type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise SchemaValidationError(None, f"$.{name}", "type", f"order {name} must be a non-empty string, got {value!r}")
        side = self.side.lower() if isinstance(self.side, str) else self.side
        if side not in ("buy", "sell"):
            raise SchemaValidationError(None, "$.side", "enum", f"order side must be 'buy' or 'sell', got {self.side!r}")
        object.__setattr__(self, "side", side)
        status = self.status.upper().replace("CANCELLED", "CANCELED") if isinstance(self.status, str) else self.status
        if status not in ORDER_STATUSES:
            known = ", ".join(sorted(ORDER_STATUSES))
            raise SchemaValidationError(None, "$.status", "enum", f"unknown order status {self.status!r}; known: {known}")
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "type", self.type.lower())
        object.__setattr__(self, "amount", to_decimal(self.amount, "amount"))
        object.__setattr__(self, "filled", to_decimal(self.filled, "filled"))
        if self.price is not None:
            object.__setattr__(self, "price", to_decimal(self.price, "price"))
        ts = self.timestamp
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts < 0):
            raise SchemaValidationError(None, "$.timestamp", "type", f"expected milliseconds since the epoch, got {ts!r}")

    @property
    def is_active(self) -> bool:
        """True for ``NEW`` and ``PARTIALLY_FILLED`` (the orders the store keeps)."""
        return self.status in ACTIVE_ORDER_STATUSES

    @property
    def remaining(self) -> Decimal:
        return self.amount - self.filled

    @classmethod
    def from_ccxt(cls, data: Mapping[str, Any]) -> Order:
        """Build from a ccxt unified order dict (``open`` becomes NEW or PARTIALLY_FILLED by ``filled``)."""
        if not isinstance(data, Mapping):
            raise SchemaValidationError(None, "$", "type", f"expected a ccxt order dict, got {type(data).__name__}")
        filled = to_decimal(data.get("filled") or 0, "filled")
        raw = str(data.get("status") or "open")
        status = ("PARTIALLY_FILLED" if filled > 0 else "NEW") if raw == "open" else _CCXT_STATUS.get(raw, raw)
        ts = data.get("timestamp")
        return cls(
            id=str(data.get("id") or ""),
            client_order_id=data.get("clientOrderId"),
            symbol=str(data.get("symbol") or ""),
            side=cast(OrderSide, data.get("side") or ""),
            type=str(data.get("type") or "limit"),
            status=status,
            price=data.get("price"),
            amount=to_decimal(data.get("amount") if data.get("amount") is not None else 0, "amount"),
            filled=filled,
            timestamp=_ccxt_timestamp(ts),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: decimals as strings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            out[name] = str(value) if isinstance(value, Decimal) else value
        return out


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """One immutable, versioned view of the whole store. ``version`` grows by one with every change."""

    version: int
    balance: Decimal
    previous_balance: Decimal
    positions: Mapping[PositionKey, Position]
    leverage: Mapping[str, Decimal]
    orders: Mapping[str, Order]
    metadata: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class AccountUpdate:
    """One incremental change, as queued to subscribers.

    ``kind`` and ``key``: ``balance`` (key ``"balance"`` or ``"previous_balance"``), ``position`` (key
    ``(symbol, side)``), ``order`` (key: order id), ``metadata`` (key: symbol), ``leverage`` (key: symbol),
    ``resync`` (key None: the subscriber was dropped; take :meth:`snapshot` and subscribe again).
    ``value`` is the new value, or None when the entry was removed. ``source`` is ``"local"``,
    ``"price"``, ``"restore"`` or ``"reconcile"``.
    """

    kind: UpdateKind
    version: int
    key: Any
    value: Any
    source: str = "local"


@dataclass(frozen=True, slots=True)
class ActivePositionCounts:
    """Open positions (hedged symbols count twice) and symbols holding both a long and a short."""

    total: int
    total_hedged: int


@dataclass(frozen=True, slots=True)
class PersistTicket:
    """What a persister writes: taken by :meth:`AccountStateStore.begin_persist`.

    ``metadata`` and ``positions`` are private copies. Pass ``token`` to ``finish_persist`` once they are
    durable; the pending flag is cleared only if nothing changed since.
    """

    token: int
    pending: bool
    version: int
    metadata: dict[str, dict[str, Any]]
    positions: dict[PositionKey, Position]


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A loggable summary (accountstate's ``getSessionSummary``), computed from one snapshot.

    ``locked_margin`` sums, per open position, its notional (``notional`` if known, else
    ``contracts * contract_size * entry_price``) divided by its leverage (the position's, else the symbol's,
    else 1). ``realised_pnl`` is ``balance_now - starting_balance``; ``available`` is
    ``balance_now - locked_margin``; ``if_closed_at_market`` is ``balance_now + unrealised_pnl``.
    """

    version: int
    starting_balance: Decimal
    balance_now: Decimal
    previous_balance: Decimal
    locked_margin: Decimal
    available: Decimal
    if_closed_at_market: Decimal
    realised_pnl: Decimal
    unrealised_pnl: Decimal
    active_positions: tuple[Position, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "starting_balance": str(self.starting_balance),
            "balance_now": str(self.balance_now),
            "previous_balance": str(self.previous_balance),
            "locked_margin": str(self.locked_margin),
            "available": str(self.available),
            "if_closed_at_market": str(self.if_closed_at_market),
            "realised_pnl": str(self.realised_pnl),
            "unrealised_pnl": str(self.unrealised_pnl),
            "active_positions": [p.to_dict() for p in self.active_positions],
        }
