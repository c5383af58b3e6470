"""The order lifecycle of the durable ledger: statuses, events, and the reducer that folds events into an order.

Everything here is pure and works on the JSON the state document stores (decimals as strings), so the same
code builds an order incrementally as events arrive and rebuilds it from its events
(:func:`reconstruct`); the two must agree (a property test checks it, and the load-time invariants report
an entry where they do not).

Lifecycle: ``recorded -> sent -> accepted | rejected | unknown -> partially_filled -> filled | cancelled |
expired``. A fill may arrive before the exchange's acknowledgement (``sent`` or ``unknown`` straight to
``partially_filled``), and a late fill may arrive after a cancel (the status stays ``cancelled``; the fill
counts).

Fills: each order keeps every trade id it has seen (exact de-duplication: a replayed fill changes nothing),
its totals (filled quantity, cost, average price, fees per currency) and the details of its
:data:`EXECUTION_BUFFER` newest fills. When an order holds more fill events than that, the oldest are folded
into one ``order_fills_folded`` event carrying their totals and trade ids: each journal record still holds
its fill until the journal's compaction, and the snapshot keeps the folded totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal

from posstate.account.ledgertypes import LIVE, TERMINAL, Execution, Fill, OrderRecord, _opt_text, ledger_arithmetic, tidy
from posstate.core.errors import OrderTransitionError, SchemaValidationError
from posstate.model.position import to_decimal

__all__ = ["LIVE", "TERMINAL", "Execution", "Fill", "OrderRecord"]

OrderStatus = Literal["recorded", "sent", "accepted", "rejected", "unknown", "partially_filled", "filled", "cancelled", "expired"]
ORDER_LIFECYCLE: tuple[str, ...] = (
    "recorded",
    "sent",
    "accepted",
    "rejected",
    "unknown",
    "partially_filled",
    "filled",
    "cancelled",
    "expired",
)
#: Statuses a fill may move on (``partially_filled`` or ``filled``); after a cancel or expiry, or once the
#: exchange said ``filled`` (``watch_orders`` often reports the closed order before ``watch_my_trades`` brings its
#: trades), a late fill counts without changing the status.
_FILL_MOVES: frozenset[str] = frozenset({"sent", "accepted", "unknown", "partially_filled"})
_FILL_LATE: frozenset[str] = frozenset({"cancelled", "expired", "filled"})
#: Status changes an answer (not a fill) may make.
_NEXT: dict[str, frozenset[str]] = {
    "recorded": frozenset({"sent", "rejected", "cancelled"}),
    "sent": frozenset({"accepted", "rejected", "unknown", "cancelled", "expired"}),
    "unknown": frozenset({"accepted", "rejected", "unknown", "cancelled", "expired"}),
    "accepted": frozenset({"cancelled", "expired"}),
    "partially_filled": frozenset({"cancelled", "expired"}),
}

_UPDATE_TO: frozenset[str] = frozenset({"accepted", "partially_filled", "unknown"}) | TERMINAL

#: The reference design's ring buffer: details of this many newest fills per order are kept.
EXECUTION_BUFFER = 32

ORDER_EVENTS: frozenset[str] = frozenset(
    {
        "order_placed",
        "order_adopted",
        "order_sent",
        "order_accepted",
        "order_rejected",
        "order_status_unknown",
        "order_partially_filled",
        "order_filled",
        "order_cancelled",
        "order_expired",
        "order_updated",
        "order_fills_folded",
    }
)
_STATUS_OF_EVENT = {
    "order_sent": "sent",
    "order_accepted": "accepted",
    "order_rejected": "rejected",
    "order_status_unknown": "unknown",
    "order_cancelled": "cancelled",
    "order_expired": "expired",
}
_FILL_EVENTS = frozenset({"order_partially_filled", "order_filled"})
_ZERO = Decimal(0)


def order_key(client_order_id: str | None, exchange_order_id: str | None) -> str:
    """The ledger key of an order: its client order id, else ``x:`` + the exchange's id (an adopted order). A client
    id that itself starts with ``x:`` (only the exchange's, for an adopted order: the bot's are refused) is not a
    key: it would name the adopted order whose exchange id follows, and take its fills."""
    if client_order_id and not client_order_id.startswith("x:"):
        return client_order_id
    if exchange_order_id:
        return "x:" + exchange_order_id
    raise SchemaValidationError(None, "$.client_order_id", "required", "an order needs a client order id or an exchange id")


def _dec(value: Any, name: str) -> str:
    return str(to_decimal(value, name))


# --------------------------------------------------------------------------------------------- events


def new_order(
    *,
    client_order_id: str | None,
    exchange_order_id: str | None,
    origin: str,
    symbol: str,
    side: str,
    type: str,
    amount: Any,
    price: Any,
    reduce_only: bool,
    position_side: str | None,
    epoch: int,
    status: str,
    strategy: str | None = None,
    signal: str | None = None,
) -> dict[str, Any]:
    """The JSON of a new order (what ``order_placed``/``order_adopted`` carries); validates every field."""
    if not isinstance(symbol, str) or not symbol:
        raise SchemaValidationError(None, "$.symbol", "type", "an order needs a symbol")
    low = side.lower() if isinstance(side, str) else side
    if low not in ("buy", "sell"):
        raise SchemaValidationError(None, "$.side", "enum", f"order side must be 'buy' or 'sell', got {side!r}")
    if not isinstance(type, str) or not type:
        raise SchemaValidationError(None, "$.type", "type", "an order needs a type (limit, market, ...)")
    if position_side is None:
        position_side = ("short" if low == "buy" else "long") if reduce_only else ("long" if low == "buy" else "short")
    if position_side not in ("long", "short"):
        raise SchemaValidationError(None, "$.position_side", "enum", f"expected 'long' or 'short', got {position_side!r}")
    client_order_id = _opt_text(client_order_id, "client_order_id")  # bounded like every id (schema "id")
    return {
        "key": order_key(client_order_id, exchange_order_id),
        "client_order_id": client_order_id,
        "exchange_order_id": _opt_text(exchange_order_id, "exchange_order_id"),
        "origin": origin,
        "strategy": strategy,
        "signal": signal,
        "symbol": symbol,
        "side": low,
        "type": type.lower(),
        "amount": _dec(amount, "amount"),
        "price": _dec(price, "price") if price is not None else None,
        "reduce_only": bool(reduce_only),
        "position_side": position_side,
        "epoch": epoch,
        "status": status,
    }


def is_opening(order: Mapping[str, Any]) -> bool:
    """Whether the order's fills grow its position (a buy for a long, a sell for a short)."""
    return (order["side"] == "buy") == (order["position_side"] == "long") and not order["reduce_only"]


@ledger_arithmetic
def apply_event(order: dict[str, Any] | None, event: Mapping[str, Any]) -> dict[str, Any]:
    """The order after *event* (a new dict; *order* is not changed). Raises OrderTransitionError when the
    lifecycle does not allow it; the caller checks before it writes, so a stored event always applies."""
    kind = event["type"]
    at = event["at"]
    if kind in ("order_placed", "order_adopted"):
        if order is not None:
            raise OrderTransitionError(order["key"], f"{kind} for an order that exists")
        base = dict(event["order"])
        base.update(
            reason=None,
            filled="0",
            cost="0",
            average_price=None,
            fees={},
            fill_count=0,
            trade_ids=[],
            executions=[],
            exchange_filled=None,
            created_at=at,
            sent_at=at if kind == "order_adopted" else None,
        )
        return _stamp(base, event)
    if order is None:
        raise OrderTransitionError(str(event.get("key")), f"{kind} before the order was placed")
    out = dict(order)
    key = order["key"]
    status = order["status"]
    if kind in _STATUS_OF_EVENT:
        to = _STATUS_OF_EVENT[kind]
        if to not in _NEXT.get(status, frozenset()):
            raise OrderTransitionError(key, f"cannot go from {status} to {to}")
        out["status"] = to
        out["reason"] = event.get("reason")
        if kind == "order_sent":
            out["sent_at"] = at
        if event.get("exchange_order_id"):
            out["exchange_order_id"] = event["exchange_order_id"]
        return _stamp(out, event)
    if kind == "order_updated":
        new_status = event.get("status")
        if new_status is not None and new_status != status:
            # The exchange's word on an order: from a live status to another live one or to its end (a filled
            # order whose fills the ledger has not seen, an order closed while the bot was down).
            # A sent order taken as rejected ("not found" by client id) that the exchange then lists is live again.
            revived = status == "rejected" and order.get("sent_at") is not None and new_status in LIVE
            if not revived and (status not in LIVE or new_status not in _UPDATE_TO):
                raise OrderTransitionError(key, f"an exchange update cannot move {status} to {new_status}")
            out["status"] = new_status
            out["reason"] = event.get("reason")
        if event.get("exchange_order_id"):
            out["exchange_order_id"] = event["exchange_order_id"]
        if event.get("exchange_filled") is not None:
            out["exchange_filled"] = event["exchange_filled"]
        return _stamp(out, event)
    if kind in _FILL_EVENTS or kind == "order_fills_folded":
        if kind == "order_fills_folded":
            amount, cost, fees, ids, count = (
                Decimal(event["amount"]),
                Decimal(event["cost"]),
                event["fees"],
                list(event["trade_ids"]),
                int(event["count"]),
            )
            execution = None
        else:
            execution = event["fill"]
            amount = Decimal(execution["amount"])
            cost = Decimal(execution["price"]) * amount
            fees = {execution.get("fee_currency") or "?": execution["fee"]}
            ids, count = [execution["trade_id"]], 1
        sent = order.get("sent_at") is not None
        # A rejected order that was sent (an unknown submission resolved "not found", an error answer to a request
        # that did arrive) and fills: the exchange's trade proves it exists, so the fill counts and moves it.
        moves = status in _FILL_MOVES or (status == "rejected" and sent)
        if not moves and (status not in _FILL_LATE or not sent):
            raise OrderTransitionError(key, f"a fill for an order that is {status} (never sent)")
        seen = set(order["trade_ids"])
        if any(i in seen for i in ids):
            raise OrderTransitionError(key, "a fill applied twice")
        filled = Decimal(order["filled"]) + amount
        if filled > Decimal(order["amount"]):
            raise OrderTransitionError(key, f"fills of {filled} exceed the order amount {order['amount']}")
        total_cost = Decimal(order["cost"]) + cost
        out["filled"] = str(filled)
        out["cost"] = str(total_cost)
        out["average_price"] = str(tidy(total_cost / filled)) if filled else None
        merged = dict(order["fees"])
        for cur, fee in fees.items():
            merged[cur] = str(Decimal(merged.get(cur, "0")) + Decimal(fee))
        out["fees"] = merged
        out["fill_count"] = int(order["fill_count"]) + count
        out["trade_ids"] = list(order["trade_ids"]) + ids
        if execution is not None:
            out["executions"] = [*order["executions"], execution][-EXECUTION_BUFFER:]
        if moves:
            out["status"] = "filled" if filled == Decimal(order["amount"]) else "partially_filled"
            out["reason"] = None
        return _stamp(out, event)
    raise OrderTransitionError(key, f"unknown event type {kind!r}")


def _stamp(order: dict[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    order["updated_at"] = event["at"]
    order["version"] = event["v"]
    return order


@ledger_arithmetic
def fill_event_type(order: Mapping[str, Any], fill: Fill) -> str:
    """``order_filled`` when *fill* completes the order, else ``order_partially_filled``."""
    done = Decimal(order["filled"]) + fill.amount >= Decimal(order["amount"])
    return "order_filled" if done else "order_partially_filled"


@ledger_arithmetic
def fold_fills(events: list[dict[str, Any]], keep: int = EXECUTION_BUFFER) -> list[dict[str, Any]]:
    """*events* with all but the *keep* newest fill events merged into one ``order_fills_folded`` event (placed
    where the last of them was, so versions stay in order). Rebuilding from the result gives the same order:
    fills commute with every other event (a cancel is allowed before or after a fill; a late fill keeps the
    status ``cancelled``)."""
    fills = [i for i, e in enumerate(events) if e["type"] in _FILL_EVENTS]
    if len(fills) <= keep:
        return events
    drop = set(fills[: len(fills) - keep])
    last = max(drop)
    folded_prior = next((e for e in events if e["type"] == "order_fills_folded"), None)
    amount = Decimal(folded_prior["amount"]) if folded_prior else _ZERO
    cost = Decimal(folded_prior["cost"]) if folded_prior else _ZERO
    fees: dict[str, str] = dict(folded_prior["fees"]) if folded_prior else {}
    ids: list[str] = list(folded_prior["trade_ids"]) if folded_prior else []
    count = int(folded_prior["count"]) if folded_prior else 0
    last_v, last_at = (folded_prior["v"], folded_prior["at"]) if folded_prior else (0, 0)
    for i in sorted(drop):
        f = events[i]["fill"]
        a = Decimal(f["amount"])
        amount += a
        cost += Decimal(f["price"]) * a
        cur = f.get("fee_currency") or "?"
        fees[cur] = str(Decimal(fees.get(cur, "0")) + Decimal(f["fee"]))
        ids.append(f["trade_id"])
        count += 1
        last_v, last_at = events[i]["v"], events[i]["at"]
    folded = {
        "v": last_v,
        "type": "order_fills_folded",
        "at": last_at,
        "count": count,
        "amount": str(amount),
        "cost": str(cost),
        "fees": fees,
        "trade_ids": ids,
    }
    out: list[dict[str, Any]] = []
    for i, e in enumerate(events):
        if i == last:
            out.append(folded)
        elif i not in drop and e["type"] != "order_fills_folded":
            out.append(e)
    return out


def reconstruct(events: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The order its events describe (None for no events)."""
    order: dict[str, Any] | None = None
    for event in events:
        order = apply_event(order, event)
    return order
