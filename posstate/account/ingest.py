"""REST snapshots and private-stream updates in accountstate 1.0's shape, with ccxt-shaped inputs:
``set_positions``/``apply_position_update`` (``fetch_positions``/``watch_positions``), ``set_open_orders``/
``apply_order_update`` (``fetch_open_orders``/``watch_orders``), ``set_balances``/``apply_balance_update``
(``fetch_balance``/``watch_balance``). A snapshot makes its subject trusted again (see ``readiness()``); each call
is one journal record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from posstate.account import epochs
from posstate.account import lifecycle as lc
from posstate.account.balances import Balance, BalanceSource, parse_balances
from posstate.account.ledger import OrderLedger
from posstate.account.reconcile import merged, parse_exchange_positions
from posstate.account.types import Order
from posstate.core.errors import SchemaValidationError
from posstate.model.position import Position, PositionKey, to_decimal

_CCXT_TO_LEDGER = {"NEW": "accepted", "PARTIALLY_FILLED": "partially_filled", "FILLED": "filled", "CANCELED": "cancelled"}
_CCXT_TO_LEDGER.update({"EXPIRED": "expired", "REJECTED": "rejected", "PENDING_CANCEL": "accepted"})


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What a snapshot or an update changed. Keys are order keys or ``SYMBOL|side``."""

    opened: tuple[str, ...] = ()
    closed: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    adopted: tuple[str, ...] = ()
    found: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {k: list(getattr(self, k)) for k in self.__slots__}


def _coverage_symbols(coverage: Mapping[str, Any] | None) -> frozenset[str] | None:
    if coverage is None:
        return None
    symbols = coverage.get("symbols")
    if not isinstance(symbols, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in symbols):
        raise SchemaValidationError(None, "$.coverage.symbols", "type", "coverage names the symbols the response covers")
    return frozenset(symbols)


class AccountIngest(OrderLedger):
    """accountstate 1.0's setters and ``apply*`` methods, durable."""

    # ------------------------------------------------------------------------------------ positions
    def set_positions(
        self,
        snapshot: Iterable[Mapping[str, Any]],
        *,
        mode: Literal["replace", "upsert"] = "replace",
        coverage: Mapping[str, Any] | None = None,
    ) -> SyncReport:
        """The exchange's positions (ccxt ``fetch_positions``). ``replace``: positions the response covers (all, or
        ``coverage={"symbols": [...]}``) and does not list are closed; ``upsert``: only listed ones change. Local
        fields the exchange does not report (SL/TP, ...) are kept. Positions become trusted."""
        remote, _ = parse_exchange_positions(snapshot)
        symbols = _coverage_symbols(coverage)
        with self._ledger():
            current = dict(self._snap.positions)
            keys = set(remote)
            if mode == "replace":
                keys |= {k for k, p in current.items() if p.contracts != 0 and (symbols is None or k[0] in symbols)}
                keys |= {
                    k
                    for k in (_key(t) for t, v in self._lifecycles.items() if v["state"] != "closed")
                    if symbols is None or k[0] in symbols
                }
            elif mode != "upsert":
                raise SchemaValidationError(None, "$.mode", "enum", f"mode is 'replace' or 'upsert', got {mode!r}")
            report = self._positions_to(current, {k: remote.get(k) for k in sorted(keys)})
            if symbols is None:  # a response covering some symbols says nothing of the others
                self._trust("positions")
            return report

    def apply_position_update(self, position: Position | Mapping[str, Any], *, epoch: int | None = None) -> SyncReport:
        """One position from the private stream (a :class:`Position` or a ccxt position; zero contracts: flat).
        With *epoch* (the epoch the bot read when it asked for this), an update for an older or closed epoch is
        refused and reported (``staleUpdate``)."""
        pos = position if isinstance(position, Position) else _parse_one(position)
        key = pos.key
        with self._ledger():
            life = epochs.get(self._lifecycles, key)
            why = epochs.stale_reason(life, epoch) if epoch is not None else None
            if why is not None:
                self._emit("staleUpdate", {"position": epochs.key_text(key), "reason": why})
                return SyncReport(refused=((epochs.key_text(key), why),))
            return self._positions_to(dict(self._snap.positions), {key: pos if pos.contracts != 0 else None})

    def _positions_to(self, current: dict[PositionKey, Position], wanted: Mapping[PositionKey, Position | None]) -> SyncReport:
        at = self._now()
        lifecycles = dict(self._lifecycles)
        moves: dict[PositionKey, Position | None] = {}
        opened: list[str] = []
        closed: list[str] = []
        modified: list[str] = []
        for key, new in wanted.items():
            old = current.get(key)
            target = merged(old, new) if new is not None else None
            life, changed = epochs.exchange_effect(epochs.get(lifecycles, key), old, target, at)
            if changed:
                lifecycles[epochs.key_text(key)] = life
                kind = life["events"][-1]["type"]
                (opened if kind == "position_opened" else closed if kind == "position_closed" else modified).append(
                    epochs.key_text(key)
                )
            if target != old and not (target is None and old is None):
                moves[key] = target
        if moves or lifecycles != self._lifecycles:
            self._write_ledger(lifecycles=lifecycles, positions=moves, source="reconcile")
        return SyncReport(opened=tuple(opened), closed=tuple(closed), modified=tuple(modified))

    # ------------------------------------------------------------------------------------ orders
    def set_open_orders(
        self,
        orders: Iterable[Mapping[str, Any] | Order],
        *,
        mode: Literal["replace", "replace-symbols"] = "replace",
        coverage: Mapping[str, Any] | None = None,
        closed_orders: Iterable[Mapping[str, Any] | Order] | None = None,
    ) -> SyncReport:
        """Reconcile the ledger's open orders with ccxt ``fetch_open_orders``. ``replace-symbols`` with
        ``coverage={"symbols": [...]}``: a per-symbol response never touches other symbols' orders.

        Orders the exchange has that the ledger does not are adopted (``adopted``, event ``orderAdopted``);
        ``unknown`` submissions found by client id become ``accepted`` (``found``). Orders the ledger thinks live
        that the response lacks are looked up in *closed_orders* (ccxt ``fetch_closed_orders``/``fetch_order``
        by client id): found, they take the exchange's final status; not found, an ``unknown`` submission becomes
        ``rejected`` (``not_found``: it never arrived) when *closed_orders* was given, and every other stays or
        becomes ``unknown`` (``unresolved``) until the bot asks the exchange. Open orders become trusted. All of
        it is one journal record."""
        with self._ledger():
            report = self._open_orders(orders, mode=mode, coverage=coverage, closed_orders=closed_orders, dry=False)
            if mode == "replace":  # a per-symbol response says nothing of the other symbols' orders
                self._trust("open_orders")
        return report

    def reconcile_open_orders(
        self,
        orders: Iterable[Mapping[str, Any] | Order],
        *,
        mode: Literal["replace", "replace-symbols"] = "replace",
        coverage: Mapping[str, Any] | None = None,
        closed_orders: Iterable[Mapping[str, Any] | Order] | None = None,
    ) -> SyncReport:
        """What :meth:`set_open_orders` would do with these responses, changing nothing (the orders half of
        ``posstate reconcile``)."""
        with self._ledger():
            return self._open_orders(orders, mode=mode, coverage=coverage, closed_orders=closed_orders, dry=True)

    def _open_orders(
        self,
        orders: Iterable[Mapping[str, Any] | Order],
        *,
        mode: str,
        coverage: Mapping[str, Any] | None,
        closed_orders: Iterable[Mapping[str, Any] | Order] | None,
        dry: bool,
    ) -> SyncReport:
        live = [o if isinstance(o, Order) else Order.from_ccxt(o) for o in orders]
        done = [o if isinstance(o, Order) else Order.from_ccxt(o) for o in (closed_orders or ())]
        if mode == "replace-symbols":
            symbols = _coverage_symbols(coverage)
            if symbols is None:
                raise SchemaValidationError(None, "$.coverage", "required", "replace-symbols needs coverage={'symbols': [...]}")
        elif mode == "replace":
            symbols = None
        else:
            raise SchemaValidationError(None, "$.mode", "enum", f"mode is 'replace' or 'replace-symbols', got {mode!r}")
        adopted: list[str] = []
        found: list[str] = []
        not_found: list[str] = []
        unresolved: list[str] = []
        with self._one_record(dry=dry):
            seen: set[str] = set()
            for o in live:
                key = self._match(o)
                if key is None:
                    adopted.append(self._adopt(o))
                    seen.add(adopted[-1])
                    continue
                seen.add(key)
                if self._orders[key]["order"]["status"] in ("unknown", "sent", "recorded", "rejected"):
                    found.append(key)
                self._take_exchange_word(key, o)
            closed_by_key = {k: o for o in done if (k := self._match(o)) is not None}
            for key, item in sorted(self._orders.items()):
                order = item["order"]
                if key in seen or order["status"] not in lc.LIVE or (symbols is not None and order["symbol"] not in symbols):
                    continue
                if order["status"] == "sent" and self._in_flight(key):
                    continue  # this process is waiting for the answer
                if key in closed_by_key:
                    found.append(key)
                    self._take_exchange_word(key, closed_by_key[key])
                elif order["status"] in ("unknown", "sent") and closed_orders is not None and not order.get("exchange_order_id"):
                    # Never acknowledged and in neither list: it never arrived. An order the exchange acknowledged
                    # (it has an exchange id) may be closed beyond the list the bot passed: it stays unresolved.
                    not_found.append(key)
                    self._append(key, "order_rejected", {"reason": "not found on the exchange by client id"})
                else:
                    unresolved.append(key)
                    if order["status"] != "unknown":
                        self._append(
                            key, "order_updated", {"status": "unknown", "reason": "not among the exchange's open orders"}
                        )
        return SyncReport(adopted=tuple(adopted), found=tuple(found), not_found=tuple(not_found), unresolved=tuple(unresolved))

    def apply_order_update(self, order: Mapping[str, Any] | Order) -> SyncReport:
        """One order from the private stream (ccxt ``watch_orders``): its status and the exchange's filled
        amount; an unknown live order is adopted. Fills come through :meth:`apply_fill` (trade ids)."""
        o = order if isinstance(order, Order) else Order.from_ccxt(order)
        with self._ledger(), self._one_record():
            key = self._match(o)
            if key is None:
                if not o.is_active:
                    return SyncReport(unresolved=(o.client_order_id or o.id,))
                return SyncReport(adopted=(self._adopt(o),))
            was = self._orders[key]["order"]["status"]
            self._take_exchange_word(key, o)
            return SyncReport(found=(key,) if was in ("unknown", "sent", "recorded", "rejected") else (), modified=(key,))

    def _match(self, o: Order) -> str | None:
        for ident in (o.client_order_id, o.id):
            if ident:
                try:
                    return self._find(ident)
                except LookupError:
                    continue
        return None

    def _adopt(self, o: Order) -> str:
        base = lc.new_order(
            client_order_id=o.client_order_id,
            exchange_order_id=o.id,
            origin="exchange",
            symbol=o.symbol,
            side=o.side,
            type=o.type,
            amount=o.amount,
            price=o.price,
            reduce_only=False,
            position_side=None,
            epoch=0,
            status="accepted",
        )
        base["epoch"] = epochs.epoch_for_order(epochs.get(self._lifecycles, (o.symbol, base["position_side"])), base)
        key: str = base["key"]
        fields: dict[str, Any] = {"order": base}
        if o.filled:
            fields["exchange_filled"] = str(o.filled)
        self._append(key, "order_adopted", fields)
        if o.filled:
            self._append(key, "order_updated", {"exchange_filled": str(o.filled), "status": "partially_filled"})
        self._notify("orderAdopted", {"order": key, "symbol": o.symbol})
        return key

    def _take_exchange_word(self, key: str, o: Order) -> None:
        """Record what the exchange says about order *key* (status, its id, its filled amount) if it differs."""
        if self._orders[key]["order"]["status"] == "recorded":
            # The exchange holds an order with our client id: it was sent (a lost write, a bot that skipped
            # record_order_sent). Left "recorded" it could be sent a second time, and its fills would be refused.
            self._append(key, "order_sent", {"reason": "found on the exchange by client id"})
        order = self._orders[key]["order"]
        to = _CCXT_TO_LEDGER.get(o.status, "accepted")
        fields: dict[str, Any] = {}
        if o.id and order.get("exchange_order_id") != o.id:
            fields["exchange_order_id"] = o.id
        if o.filled and order.get("exchange_filled") != str(o.filled):
            fields["exchange_filled"] = str(o.filled)
        status = order["status"]
        if status == "rejected" and order.get("sent_at") is not None and to in ("accepted", "partially_filled"):
            # Taken as never arrived ("not found" by client id, which an exchange may answer for a moment after a
            # timeout), now listed as open: live again, or the bot would replace an order that rests there.
            reason = "listed open by the exchange after it was not found"
            self._append(key, "order_updated", {"status": to, "reason": reason, **fields})
            return
        if to in ("accepted", "partially_filled") and status in ("sent", "unknown"):
            if to == "accepted" and Decimal(order["filled"]) == 0:
                self._append(key, "order_accepted", fields)
                return
            to = "partially_filled"  # found partly filled (by the exchange's word or by fills we hold)
        if (
            to != status
            and status in lc.LIVE
            and to != "accepted"
            and not (to == "partially_filled" and status == "partially_filled")
        ):
            if to == "rejected" and status in ("sent", "unknown"):
                self._append(key, "order_rejected", {"reason": "rejected by the exchange", **fields})
                return
            fields["status"] = to
        if fields:
            self._append(key, "order_updated", fields)

    # ------------------------------------------------------------------------------------ balances
    def set_balances(
        self, snapshot: Any, *, source: BalanceSource = "trading", coverage: Mapping[str, Any] | None = None
    ) -> SyncReport:
        """The exchange's balances (ccxt ``fetch_balance``, or a list of :class:`Balance`). Assets of *source* the
        response covers (all, or ``coverage={"assets": [...]}``) and does not list are removed. Balances become
        trusted."""
        items = parse_balances(snapshot, source=source, at=self._now())
        assets = None
        if coverage is not None:
            raw = coverage.get("assets")
            if not isinstance(raw, (list, tuple, set, frozenset)):
                raise SchemaValidationError(None, "$.coverage.assets", "type", "coverage names the assets the response covers")
            assets = {str(a).upper() for a in raw}
        with self._ledger():
            balances = {
                k: v
                for k, v in self._balances.items()
                if v["source"] != source or (assets is not None and v["asset"] not in assets)
            }
            for b in items:
                balances[b.key] = b.to_json()
            removed = tuple(sorted(set(self._balances) - set(balances)))
            changed = tuple(sorted(k for k in balances if self._balances.get(k) != balances[k]))
            if balances != self._balances:
                self._write_ledger(balances=balances)
            if assets is None:  # a response covering some assets says nothing of the others
                self._trust("balances")
        return SyncReport(closed=removed, modified=changed)

    def apply_balance_update(
        self,
        asset: str | Balance,
        *,
        total: Any = None,
        available: Any = None,
        source: BalanceSource = "trading",
        timestamp: int | None = None,
    ) -> Balance:
        """One asset's new balance from the stream (a :class:`Balance`, or *asset* with *total* and/or
        *available*; what is not given stays as it was)."""
        with self._ledger():
            if isinstance(asset, Balance):
                b = asset
            else:
                old = self._balances.get(asset.upper() if source == "trading" else f"{asset.upper()}.FUNDING")
                t = total if total is not None else (old["total"] if old else available)
                a = available if available is not None else (old["available"] if old else t)
                if t is None:
                    raise SchemaValidationError(
                        None, "$.total", "required", "a balance update needs a total or an available amount"
                    )
                b = Balance(asset, t, a, source, timestamp if timestamp is not None else self._now())
            balances = dict(self._balances)
            balances[b.key] = b.to_json()
            if balances != self._balances:
                self._write_ledger(balances=balances)
            return b


def _key(text: str) -> PositionKey:
    symbol, _, side = text.rpartition("|")
    return (symbol, side)  # type: ignore[return-value]


def _parse_one(data: Mapping[str, Any]) -> Position:
    if not isinstance(data, Mapping):
        raise SchemaValidationError(None, "$", "type", f"expected a ccxt position dict, got {type(data).__name__}")
    contracts = data.get("contracts")
    if contracts is None or to_decimal(contracts, "contracts") == 0:  # flat: the entry price may be absent
        return Position.from_ccxt({**data, "contracts": 0, "entryPrice": data.get("entryPrice") or 0})
    return Position.from_ccxt(data)
