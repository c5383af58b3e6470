"""What the server shows: one immutable :class:`View` of the state, its JSON, and the changes between two views.

Every source (a live account store, a live manager, a state directory read from disk) is turned into a
``View``; the stream's topics are computed from :class:`~posstate.account.types.AccountUpdate` items, the
account store's own update type, so a source with a feed (the store) and a polled one (manager, directory)
give the same messages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal

from posstate.account.types import EMPTY, AccountUpdate, Order
from posstate.model.position import Position, PositionKey, position_key_text
from posstate.serve import shapes

SourceKind = Literal["store", "manager", "directory"]


@dataclass(frozen=True, slots=True)
class View:
    """The state at one ``version`` (the store's version; for a manager or directory, a counter of the
    changes the server saw). ``revs`` are None for an account store (it keeps none). ``changed_at`` is the
    wall time the server first saw this version."""

    source: SourceKind
    version: int
    generation: int | None = None
    positions: Mapping[PositionKey, Position] = field(default_factory=lambda: EMPTY)
    position_revs: Mapping[PositionKey, int] | None = None
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: EMPTY)
    metadata_revs: Mapping[str, int] | None = None
    orders: Mapping[str, Order] = field(default_factory=lambda: EMPTY)
    balance: Decimal | None = None
    previous_balance: Decimal | None = None
    leverage: Mapping[str, Decimal] = field(default_factory=lambda: EMPTY)
    account: Mapping[str, str] | None = None
    changed_at: float = field(default_factory=time.time)

    def snapshot_json(self, *, symbols: frozenset[str] | None = None) -> dict[str, Any]:
        """``GET /api/account/snapshot`` and the stream's first message (without ``topic``)."""

        def keep(symbol: str) -> bool:
            return symbols is None or symbol in symbols

        return {
            "source": self.source,
            "version": self.version,
            "generation": self.generation,
            "changed_at": _iso(self.changed_at),
            "account": dict(self.account) if self.account is not None else None,
            "positions": shapes.positions_json({k: p for k, p in self.positions.items() if keep(k[0])}, self.position_revs),
            "orders": {i: shapes.order_json(o) for i, o in sorted(self.orders.items()) if keep(o.symbol)},
            "balances": {"wallet": self.balance, "previous": self.previous_balance},
            "leverage": {s: v for s, v in sorted(self.leverage.items()) if keep(s)},
            "symbol_metadata": shapes.metadata_json({s: d for s, d in self.metadata.items() if keep(s)}, self.metadata_revs),
        }

    def positions_json(self) -> dict[str, Any]:
        """``GET /api/positions``: the positions with the version and generation they belong to."""
        return {
            "version": self.version,
            "generation": self.generation,
            "positions": shapes.positions_json(self.positions, self.position_revs),
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def changes(old: View, new: View) -> Iterator[tuple[str, Any, Any]]:
    """``(kind, key, value)`` for each entry that differs (value None: removed), as the store's feed
    names them: position, metadata, order, balance, leverage."""
    yield from _map_changes("position", old.positions, new.positions)
    yield from _map_changes("metadata", old.metadata, new.metadata)
    yield from _map_changes("order", old.orders, new.orders)
    yield from _map_changes("leverage", old.leverage, new.leverage)
    if not same(old.balance, new.balance):
        yield ("balance", "balance", new.balance)
    if not same(old.previous_balance, new.previous_balance):
        yield ("balance", "previous_balance", new.previous_balance)


def _map_changes(kind: str, a: Mapping[Any, Any], b: Mapping[Any, Any]) -> Iterator[tuple[str, Any, Any]]:
    if a is b:
        return
    for k in a.keys() - b.keys():
        yield (kind, k, None)
    for k, v in b.items():
        old = a.get(k, _MISSING)
        if old is not v and not same(old, v):
            yield (kind, k, v)


_MISSING = object()


def same(a: Any, b: Any) -> bool:
    """*a* and *b* would be served alike: ``==`` and also of the same types, all the way down (``1 == True ==
    1.0`` and ``Decimal("1.0") == Decimal("1.00")``, but each is shown differently in JSON). Called only for
    entries that are not the same object (the bot's copies share every unchanged one)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (dict, MappingProxyType)):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (float, Decimal)):
        return repr(a) == repr(b)  # -0.0 and 0.0, "1.0" and "1.00" differ; NaN is NaN
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


# ------------------------------------------------------------------------------------------ stream topics
TOPICS: frozenset[str] = frozenset(
    {
        "snapshot",
        "balance.update",
        "position.update",
        "order.update",
        "order.fill",
        "order.closed",
        "metadata.update",
        "leverage.update",
        "resync",
        "heartbeat",
    }
)


def messages(update: AccountUpdate, orders: dict[str, Order]) -> Iterable[dict[str, Any]]:
    """The stream messages of one update. *orders* is the client's view of the open orders (kept up to date
    here): an order whose ``filled`` grew also gives ``order.fill`` with the filled amount."""
    base: dict[str, Any] = {"version": update.version, "source": update.source}
    kind, key, value = update.kind, update.key, update.value
    if kind == "position":
        symbol, side = key
        body = value.to_dict() if isinstance(value, Position) else None
        return [
            {"topic": "position.update", **base, "symbol": symbol, "side": side, "key": position_key_text(key), "position": body}
        ]
    if kind == "order":
        return _order_messages(base, str(key), value, orders)
    if kind == "metadata":
        data = shapes.metadata_json({key: value})[key]["data"] if value is not None else None
        return [{"topic": "metadata.update", **base, "symbol": key, "data": data}]
    if kind == "balance":
        return [{"topic": "balance.update", **base, "name": "wallet" if key == "balance" else "previous", "balance": value}]
    if kind == "resync":
        return [{"topic": "resync", **base, "reason": "the stream fell behind; reconnect for a fresh snapshot"}]
    # leverage, and any kind a newer account store adds: "<kind>.update" with the raw key and value
    value_json = value.to_dict() if hasattr(value, "to_dict") else value
    return [{"topic": f"{kind}.update", **base, "symbol" if kind == "leverage" else "key": key, "value": value_json}]


def _order_messages(base: dict[str, Any], order_id: str, order: Order | None, orders: dict[str, Order]) -> list[dict[str, Any]]:
    before = orders.get(order_id)
    if order is None:
        orders.pop(order_id, None)
        last = shapes.order_json(before) if before is not None else None
        symbol = before.symbol if before is not None else None
        return [{"topic": "order.closed", **base, "id": order_id, "symbol": symbol, "order": last}]
    orders[order_id] = order
    out = [{"topic": "order.update", **base, "id": order_id, "symbol": order.symbol, "order": shapes.order_json(order)}]
    grown = order.filled - (before.filled if before is not None else Decimal(0))
    if grown > 0:
        out.append(
            {"topic": "order.fill", **base, "id": order_id, "symbol": order.symbol, "amount": grown, "filled": order.filled}
        )
    return out


def symbol_of(message: Mapping[str, Any]) -> str | None:
    """The symbol a stream message is about (None: not about one symbol, such as a balance)."""
    symbol = message.get("symbol")
    return symbol if isinstance(symbol, str) else None
