"""Order lifecycle methods of :class:`~posstate.account.exchange.ExchangeAccountStateStore`: intents, submission
outcomes (accountstate 1.0's ``recordOrderAccepted``/``Rejected``/``StatusUnknown``/``Cancelled`` in
snake_case), fills and the event history. Each call that changes an order is one journal record, durable
when it returns; a call that changes nothing (a replayed fill, a repeated answer) writes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from posstate.account import epochs, ledgerformat
from posstate.account import lifecycle as lc
from posstate.account.ledgerbase import LedgerCore
from posstate.account.ledgertypes import MAX_ID_LENGTH, ledger_decimal
from posstate.account.lifecycle import Fill, OrderRecord
from posstate.core.errors import OrderTransitionError, SchemaValidationError, UnknownOrderError
from posstate.core.text import BAD_TEXT
from posstate.manager.orders import make_client_order_id
from posstate.model.position import SURROGATE, Position


@dataclass(frozen=True, slots=True)
class FillResult:
    """What :meth:`apply_fill` did. ``duplicate``: the trade id was seen before, nothing changed.
    ``position_refused``: the fill counted on its order but was refused for the position (stale epoch)."""

    order: OrderRecord
    applied: bool
    duplicate: bool = False
    position_refused: str | None = None
    position: Position | None = None


class OrderLedger(LedgerCore):
    """Orders: ``recorded -> sent -> accepted | rejected | unknown -> partially_filled -> filled | cancelled | expired``."""

    # ------------------------------------------------------------------------------------ writing one event
    def _append(
        self,
        key: str,
        kind: str,
        fields: Mapping[str, Any] | None = None,
        *,
        lifecycles: dict[str, dict[str, Any]] | None = None,
        positions: Mapping[Any, Position | None] | None = None,
    ) -> dict[str, Any]:
        """Append one event to order *key* and write it (with *lifecycles*/*positions*) as one record.
        Validates the transition first: a refused event writes nothing. Caller holds ``_ledger_lock``."""
        item = self._orders.get(key)
        version = int(item["order"]["version"]) + 1 if item is not None else 1
        event = {"v": version, "type": kind, "at": self._now(), **(fields or {})}
        order = lc.apply_event(item["order"] if item is not None else None, event)
        events = lc.fold_fills([*(item["events"] if item is not None else ()), event])
        if self._batch is not None:  # inside _one_record(): written together at its end
            assert lifecycles is None and positions is None
            self._batch[key] = self._orders[key] = {"order": order, "events": events}
            return order
        self._write_ledger(orders={key: {"order": order, "events": events}}, lifecycles=lifecycles, positions=positions)
        return order

    @contextlib.contextmanager
    def _one_record(self, *, dry: bool = False) -> Iterator[None]:
        """Order changes made inside are written together as one journal record at the end (nothing written and
        memory put back on an exception, or with *dry*: a plan of what the calls would do). Ledger lock held."""
        if self._batch is not None:
            yield
            return
        saved, inflight = dict(self._orders), set(self._inflight)
        self._batch, self._deferred = {}, []
        try:
            yield
            batch, deferred = self._batch, self._deferred
            self._orders, self._inflight = saved, inflight
            self._batch = None
            if batch and not dry:
                self._write_ledger(orders=batch)
        except BaseException:
            self._orders, self._inflight = saved, inflight
            raise
        finally:
            self._batch, self._deferred = None, []
        if not dry:
            for event, payload in deferred:
                self._emit(event, payload)

    def _notify(self, event: str, payload: dict[str, Any]) -> None:
        """Emit *event* now, or once the record of the surrounding _one_record() is durable."""
        if self._batch is not None:
            self._deferred.append((event, payload))
        else:
            self._emit(event, payload)

    # ------------------------------------------------------------------------------------ intents and outcomes
    def record_order_intent(
        self,
        *,
        strategy: str,
        signal: str,
        symbol: str,
        side: str,
        type: str,
        amount: Decimal | int | str | float,
        price: Decimal | int | str | float | None = None,
        reduce_only: bool = False,
        position_side: str | None = None,
        client_order_id: str | None = None,
        prefix: str = "ps",
    ) -> OrderRecord:
        """Record the decision to place an order, durably, before anything is sent (status ``recorded``).

        The client order id is :func:`~posstate.make_client_order_id` of the decision unless given, so the same
        decision after a restart finds the same order: recording it again returns the stored order and writes
        nothing. The order belongs to its position's current epoch (or, flat, to the next one it opens)."""
        if client_order_id is not None:
            _check_client_id(client_order_id)
        if ledger_decimal(amount, "amount") <= 0:
            raise SchemaValidationError(None, "$.amount", "minimum", "an order's amount is greater than zero")
        if price is not None and ledger_decimal(price, "price") < 0:
            raise SchemaValidationError(None, "$.price", "minimum", "an order's price is zero or more")
        cid = client_order_id or make_client_order_id(
            strategy=strategy, signal=signal, symbol=symbol, side=side, type=type, amount=amount, price=price, prefix=prefix
        )
        with self._ledger():
            found = self._orders.get(cid)
            base = lc.new_order(
                client_order_id=cid,
                exchange_order_id=None,
                origin="local",
                symbol=symbol,
                side=side,
                type=type,
                amount=amount,
                price=price,
                reduce_only=reduce_only,
                position_side=position_side,
                epoch=0,
                status="recorded",
                strategy=strategy,
                signal=signal,
            )
            if found is None and cid in (self._forgotten or {}):
                raise OrderTransitionError(
                    cid,
                    "an order with this client id was recorded before and removed with forget_order(); it may have "
                    "been sent: never send it again (record a new decision instead)",
                )
            if found is not None:
                same = ("symbol", "side", "type", "reduce_only", "position_side")
                if any(found["order"][k] != base[k] for k in same) or any(
                    _value(found["order"][k]) != _value(base[k]) for k in ("amount", "price")
                ):  # amounts compare by value: "0.010" and "0.01" are one decision (one client id)
                    raise OrderTransitionError(cid, "this client order id already names another order in the ledger")
                return OrderRecord.from_json(found["order"])
            base["epoch"] = epochs.epoch_for_order(epochs.get(self._lifecycles, (symbol, base["position_side"])), base)
            return OrderRecord.from_json(self._append(cid, "order_placed", {"order": base}))

    def record_order_sent(self, order_id: str) -> OrderRecord:
        """Mark the order ``sent``, durably, just before the request goes out. Refused (OrderTransitionError) for
        an order sent before: after a crash nobody knows whether it arrived, so confirm it by client id and never
        send it again. A reduce-only order large enough to close its open position moves it to ``closing``."""
        with self._ledger():
            key = self._find(order_id)
            order = self._orders[key]["order"]
            if order["status"] != "recorded":
                raise OrderTransitionError(
                    key, f"already sent (status {order['status']}); confirm it by client id, never send it again"
                )
            lifecycles = None
            pkey = (order["symbol"], order["position_side"])
            life = epochs.get(self._lifecycles, pkey)
            held = self._snap.positions.get(pkey)
            if (
                order["reduce_only"]
                and life["state"] == "open"
                and life["epoch"] == order["epoch"]
                and (held is None or Decimal(order["amount"]) >= held.contracts)
            ):
                lifecycles = dict(self._lifecycles)
                lifecycles[epochs.key_text(pkey)] = epochs.record(
                    life, "position_modified", self._now(), held, state="closing", order=key
                )
            done = self._append(key, "order_sent", lifecycles=lifecycles)
            self._inflight.add(key)
            return OrderRecord.from_json(done)

    def _outcome(self, order_id: str, kind: str, to: str, fields: Mapping[str, Any]) -> OrderRecord:
        with self._ledger():
            key = self._find(order_id)
            order = self._orders[key]["order"]
            if order["status"] == to and all(order.get(k) == v for k, v in fields.items() if k != "reason"):
                return OrderRecord.from_json(order)  # the same answer again: nothing to record
            lifecycles = self._closing_ended(key) if to in lc.TERMINAL and to != "filled" else None
            done = self._append(key, kind, dict(fields), lifecycles=lifecycles)
            self._inflight.discard(key)
            return OrderRecord.from_json(done)

    def _closing_ended(self, key: str) -> dict[str, dict[str, Any]] | None:
        """The lifecycles with the position back to ``open`` when *key* was the last live reduce-only order of
        a ``closing`` position and ends without filling it (None: nothing changes)."""
        order = self._orders[key]["order"]
        pkey = (order["symbol"], order["position_side"])
        life = epochs.get(self._lifecycles, pkey)
        if not order["reduce_only"] or life["state"] != "closing" or life["epoch"] != order["epoch"]:
            return None
        for other_key, item in self._orders.items():
            o = item["order"]
            if other_key != key and o["reduce_only"] and o["status"] in lc.LIVE and (o["symbol"], o["position_side"]) == pkey:
                return None
        lifecycles = dict(self._lifecycles)
        held = self._snap.positions.get(pkey)
        lifecycles[epochs.key_text(pkey)] = epochs.record(life, "position_modified", self._now(), held, state="open", order=key)
        return lifecycles

    def record_order_accepted(
        self, order_id: str, *, exchange_order_id: str | None = None, order: Mapping[str, Any] | None = None
    ) -> OrderRecord:
        """The exchange accepted the order (``sent`` or ``unknown`` -> ``accepted``); *order* may be its ccxt answer.
        An acceptance arriving after a fill only records the exchange id."""
        if order is not None and exchange_order_id is None:
            exchange_order_id = str(order.get("id")) if order.get("id") is not None else None
        with self._ledger():
            key = self._find(order_id)
            current = self._orders[key]["order"]
            if current["status"] in ("partially_filled", "filled", "cancelled", "expired", "accepted"):
                if exchange_order_id and current.get("exchange_order_id") != exchange_order_id:
                    return OrderRecord.from_json(self._append(key, "order_updated", {"exchange_order_id": exchange_order_id}))
                return OrderRecord.from_json(current)
            fields = {"exchange_order_id": exchange_order_id} if exchange_order_id else {}
            if current["status"] == "rejected" and current.get("sent_at") is not None:
                # Taken as never arrived (resolved "not found" while the request was still out): the answer wins.
                reason = "accepted by the exchange after it was taken as rejected"
                return OrderRecord.from_json(
                    self._append(key, "order_updated", {"status": "accepted", "reason": reason, **fields})
                )
            return self._outcome(key, "order_accepted", "accepted", fields)

    def record_order_rejected(self, order_id: str, *, reason: str) -> OrderRecord:
        """The exchange refused the order (or it was found not to exist): ``rejected``, final."""
        return self._outcome(order_id, "order_rejected", "rejected", {"reason": _reason(reason)})

    def record_order_status_unknown(self, order_id: str, *, reason: str) -> OrderRecord:
        """Nobody knows whether the order reached the exchange (a timeout, a network error, a crash after
        ``sent``). It stays ``unknown`` across any restart until resolved against the exchange, blocks
        :meth:`ready_to_trade`, and is never sent again."""
        return self._outcome(order_id, "order_status_unknown", "unknown", {"reason": _reason(reason)})

    def record_order_cancelled(self, order_id: str, *, reason: str | None = None) -> OrderRecord:
        """The order was cancelled (by the bot, the exchange or by hand). Later fills still count on it."""
        return self._outcome(order_id, "order_cancelled", "cancelled", {"reason": _reason(reason)} if reason else {})

    def record_order_expired(self, order_id: str) -> OrderRecord:
        return self._outcome(order_id, "order_expired", "expired", {})

    # ------------------------------------------------------------------------------------ fills
    def apply_fill(self, fill: Fill | Mapping[str, Any]) -> FillResult:
        """Apply one execution (a :class:`Fill` or a ccxt trade dict) to its order, found by client order id or
        exchange order id. A trade id the order has seen changes nothing (``duplicate=True``); a fill past the
        order's amount is OrderTransitionError; a fill for an order the ledger does not hold is UnknownOrderError.

        The fill also moves the order's position (an opening fill grows it at the average entry price, a
        reducing one shrinks or closes it), unless the order's epoch is older than the position's or already
        closed: then the fill counts on the order and the position is left alone (``position_refused``, and a
        ``staleUpdate`` event), so a late fill never reopens a closed position. All in one journal record."""
        f = fill if isinstance(fill, Fill) else Fill.from_ccxt(fill)
        with self._ledger():
            key = self._fill_order(f)
            item = self._orders[key]
            order = item["order"]
            if f.trade_id in order["trade_ids"] or any(
                e.get("type") == "order_fills_folded" and f.trade_id in e["trade_ids"] for e in item["events"]
            ):
                self._emit("duplicateFill", {"order": key, "trade_id": f.trade_id})
                return FillResult(OrderRecord.from_json(order), applied=False, duplicate=True)
            if f.symbol is not None and f.symbol != order["symbol"]:
                raise OrderTransitionError(key, f"fill {f.trade_id!r} is for {f.symbol}, the order for {order['symbol']}")
            if order["status"] == "recorded":  # a trade of our client id: the order was sent (see _take_exchange_word)
                order = self._append(key, "order_sent", {"reason": f"a trade ({f.trade_id}) names it: it was sent"})
            kind = lc.fill_event_type(order, f)
            at = self._now()
            pkey = (order["symbol"], order["position_side"])
            life = epochs.get(self._lifecycles, pkey)
            effect = epochs.fill_effect(life, self._snap.positions.get(pkey), order, f.amount, f.price, f.timestamp or at)
            if effect.refused is not None:
                done = self._append(key, kind, {"fill": f.execution()})
                # A new trade of an older epoch's order is real on the exchange (a resting entry that filled after
                # the close, a reduce-only order that hit the next position): the ledger's position may be wrong
                # now, so positions are untrusted until the next set_positions().
                self._blocked["positions"] = "stale_fill"
                self._emit("staleUpdate", {"order": key, "trade_id": f.trade_id, "reason": effect.refused})
                return FillResult(OrderRecord.from_json(done), applied=True, position_refused=effect.refused)
            lifecycles = dict(self._lifecycles)
            lifecycles[epochs.key_text(pkey)] = effect.lifecycle
            done = self._append(key, kind, {"fill": f.execution()}, lifecycles=lifecycles, positions={pkey: effect.position})
            return FillResult(OrderRecord.from_json(done), applied=True, position=effect.position)

    def _fill_order(self, f: Fill) -> str:
        """The key of the order a fill names: by its client order id, else (an id the ledger does not know, or
        none) by the exchange's order id."""
        if f.client_order_id:
            try:
                return self._find(f.client_order_id)
            except UnknownOrderError:
                if not f.order_id:
                    raise
        return self._find(f.order_id or "")

    def forget_order(self, order_id: str) -> bool:
        """Remove a finished order (``rejected``, ``filled``, ``cancelled``, ``expired``) and its events from the
        ledger, durably, to keep the document small. A live or unknown order is refused: it is never forgotten.
        The client id of an order that was sent is remembered for ``ledgerformat.FORGOTTEN_KEEP_MS`` (7 days):
        recording the same decision again within that time is refused instead of sending it a second time."""
        with self._ledger():
            key = self._find(order_id)
            status = self._orders[key]["order"]["status"]
            if status not in lc.TERMINAL:
                raise OrderTransitionError(key, f"is {status}; only a finished order can be forgotten")
            now = self._now()
            forgotten = {c: at for c, at in (self._forgotten or {}).items() if now - at < ledgerformat.FORGOTTEN_KEEP_MS}
            order = self._orders[key]["order"]
            cid = order.get("client_order_id")
            if cid and order.get("sent_at") is not None:  # an intent never sent may be recorded again
                forgotten[cid] = now
            self._write_ledger(orders={key: None}, forgotten=forgotten)
            self._inflight.discard(key)
            return True

    # ------------------------------------------------------------------------------------ history
    def order_events(self, order_id: str | None = None) -> list[dict[str, Any]]:
        """Stored events of every order (or one), each with its ``order_key`` and per-order version ``v``."""
        with self._ledger():
            if order_id is not None:
                order_id = self._find(order_id)
            entries = {
                ledgerformat.order_entry_name(k): ledgerformat.order_entry(i["order"], i["events"])
                for k, i in self._orders.items()
            }
        return ledgerformat.order_history(entries, order_id)

    def position_events(self) -> list[dict[str, Any]]:
        with self._ledger():
            return ledgerformat.position_history(self._lifecycles)

    def reconstruct_order(self, order_id: str) -> OrderRecord:
        """The order rebuilt from its stored events alone; equals :meth:`get_ledger_order` (the invariant the
        load checks)."""
        with self._ledger():
            key = self._find(order_id)
            rebuilt = lc.reconstruct(self._orders[key]["events"])
        assert rebuilt is not None
        return OrderRecord.from_json(rebuilt)


def _value(text: str | None) -> Decimal | None:
    return Decimal(text) if text is not None else None


def _check_client_id(cid: Any) -> None:
    """A client order id the bot chooses: plain text the exchange echoes back unchanged, never an adopted order's
    key (``x:`` + an exchange id, which would take that order's fills)."""
    if (
        not isinstance(cid, str)
        or not cid
        or cid != cid.strip()
        or len(cid) > MAX_ID_LENGTH
        or SURROGATE.search(cid) is not None
        or cid.startswith("x:")
    ):
        raise SchemaValidationError(
            None,
            "$.client_order_id",
            "pattern",
            f"a client order id is 1 to {MAX_ID_LENGTH} characters of text without surrounding spaces, not starting "
            f"with 'x:'; got {str(cid)[:40]!r}",
        )


def _reason(reason: Any) -> str:
    """The reason an outcome is stored with: any object's text (``reason=exc`` works), its first 500 characters,
    with what the state cannot store or a terminal must not print (controls, lone surrogates, bidi overrides)
    replaced by ``?``. An outcome is never refused for its reason: refused, the order would stay counted as in
    flight."""
    text = reason if isinstance(reason, str) else str(reason) if reason is not None else ""
    text = BAD_TEXT.sub("?", text[:500]).strip()
    return text or "no reason given"
