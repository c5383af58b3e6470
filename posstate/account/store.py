"""AccountStateStore: balances, positions, leverage, active orders and symbol metadata, in memory.

A Python counterpart of the ``accountstate`` npm store (snake_case names), with three changes:

* The whole state is one immutable :class:`AccountSnapshot`. A write copies only the map it changes
  (copy-on-write), builds the next snapshot with ``version + 1`` and swaps one reference, so readers in other
  threads take :meth:`snapshot` (or call any getter) without a lock while the writer goes on. Writes are
  serialised by one lock.
* Metadata is the part the exchange cannot give back. Its setters mark "pending persist" as accountstate's
  do, and also bump a change counter, so a persister that takes ``(token, copy)`` with
  :meth:`begin_persist` and calls :meth:`finish_persist` after writing never clears the flag over an edit
  made while it was writing (accountstate's clear-then-write race). Getters return deep copies, so editing a
  returned dict cannot change the store behind the flag's back.
* Every change is also queued to subscribers (:meth:`subscribe`), bounded, never blocking the writer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from posstate.account.feed import UpdateFeed, UpdateQueue
from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport, fingerprint, merged, reconcile
from posstate.account.types import (
    EMPTY,
    AccountSnapshot,
    AccountUpdate,
    ActivePositionCounts,
    Order,
    PersistTicket,
    SessionSummary,
    freeze_json,
    is_reserved,
    normalize_side,
    thaw_json,
)
from posstate.core.errors import SchemaValidationError, StaleReportError, SymbolMetadataNotFoundError
from posstate.model import document as _document
from posstate.model.position import Position, PositionKey, to_decimal

log = logging.getLogger("posstate")

StoreHandler = Callable[[dict[str, Any]], object]
#: Store-level events: a reconciliation was applied; a persist finished or failed (persisted store).
STORE_EVENTS: frozenset[str] = frozenset({"reconciliationApplied", "persisted", "persistFailed"})
_ZERO = Decimal(0)
_ONE = Decimal(1)


def _proxy(d: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(d)


def _check_symbol(symbol: str) -> str:
    if not isinstance(symbol, str) or not symbol:
        raise SchemaValidationError(None, "$.symbol", "type", f"expected a non-empty symbol, got {symbol!r}")
    return symbol


def _check_meta_symbol(symbol: str) -> str:
    _check_symbol(symbol)
    if is_reserved(symbol):
        raise SchemaValidationError(None, "$.symbol", "reserved", f"names starting with '__posstate_' are reserved ({symbol!r})")
    return symbol


class AccountStateStore:
    """In-memory account state; thread-safe; lock-free reads. See the module docstring."""

    #: Whether position changes count as changes to persist (the persisted store says yes; accountstate no).
    _persist_positions = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._snap = AccountSnapshot(0, _ZERO, _ZERO, EMPTY, EMPTY, EMPTY, EMPTY)
        self._feed = UpdateFeed()
        self._changes = 0
        self._pending = False
        self._handlers: dict[str, list[StoreHandler]] = {}

    # ------------------------------------------------------------------------------------ core machinery
    def _commit(
        self, updates: Iterable[tuple[str, Any, Any]], *, source: str = "local", persist: bool = False, **maps: Any
    ) -> int:
        """Swap in the next snapshot (caller holds the lock) and queue its updates; returns the version."""
        old = self._snap
        version = old.version + 1
        self._snap = dataclasses.replace(old, version=version, **maps)
        if persist:
            self._changes += 1
            self._pending = True
        self._feed.publish(AccountUpdate(kind, version, key, value, source) for kind, key, value in updates)  # type: ignore[arg-type]
        return version

    def _after_write(self, persistable: bool) -> None:
        """Hook run after a write, outside the lock (the persisted store flushes here)."""

    def snapshot(self) -> AccountSnapshot:
        """The current immutable, versioned view; hold it as long as you like, from any thread."""
        return self._snap

    @property
    def version(self) -> int:
        return self._snap.version

    def subscribe(self, *, maxsize: int = 1024) -> UpdateQueue:
        """A bounded queue receiving every later change (see :mod:`posstate.account.feed` for the policy:
        a subscriber whose queue is full is dropped with a final ``resync`` update; the writer never blocks)."""
        with self._lock:
            return self._feed.add(maxsize, start_version=self._snap.version)

    def unsubscribe(self, q: UpdateQueue) -> bool:
        return self._feed.remove(q)

    def on(self, event: str, handler: StoreHandler) -> None:
        if event not in STORE_EVENTS:
            raise ValueError(f"unknown store event {event!r}; known: {', '.join(sorted(STORE_EVENTS))}")
        with self._lock:
            self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: StoreHandler | None = None) -> None:
        with self._lock:
            if handler is None:
                self._handlers.pop(event, None)
            elif handler in self._handlers.get(event, []):
                self._handlers[event].remove(handler)

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        with self._lock:
            handlers = list(self._handlers.get(event, ()))
        for handler in handlers:
            try:
                handler({"event": event, **payload})
            except Exception:  # a listener never breaks the store
                log.exception("account store handler for %s raised", event)

    # ------------------------------------------------------------------------------------ pending persist
    def is_pending_persist(self) -> bool:
        """True when metadata changed since the last completed persist."""
        return self._pending

    def set_is_pending_persist(self, flag: bool) -> None:
        """Set the flag by hand (accountstate's API). Prefer :meth:`begin_persist`/:meth:`finish_persist`:
        clearing it by hand after writing loses any edit made while you were writing."""
        with self._lock:
            self._pending = bool(flag)
            if flag:
                self._changes += 1

    def begin_persist(self) -> PersistTicket:
        """Take what to write: a change token plus private copies of metadata (and positions)."""
        with self._lock:
            snap = self._snap
            return PersistTicket(
                token=self._changes,
                pending=self._pending,
                version=snap.version,
                metadata={s: thaw_json(d) for s, d in snap.metadata.items()},
                positions=dict(snap.positions),
            )

    def finish_persist(self, token: int) -> bool:
        """Call once the ticket's copies are durable. Clears the pending flag only if nothing changed since
        :meth:`begin_persist` (returns True); otherwise the flag stays set for the next persist (False)."""
        with self._lock:
            if self._changes != token:
                return False
            self._pending = False
            return True

    # ------------------------------------------------------------------------------------ balances
    def set_wallet_balance(self, balance: Decimal | int | str | float) -> None:
        value = to_decimal(balance, "balance")
        with self._lock:
            self._commit([("balance", "balance", value)], balance=value)
        self._after_write(False)

    def get_wallet_balance(self) -> Decimal:
        return self._snap.balance

    def store_previous_balance(self) -> None:
        """Overwrite the previous balance with the current one (to measure a change across an event)."""
        with self._lock:
            value = self._snap.balance
            self._commit([("balance", "previous_balance", value)], previous_balance=value)
        self._after_write(False)

    def get_previous_balance(self) -> Decimal:
        return self._snap.previous_balance

    # ------------------------------------------------------------------------------------ positions
    def set_active_position(self, position: Position) -> None:
        """Add or replace the position at ``(position.symbol, position.side)``."""
        if not isinstance(position, Position):
            raise SchemaValidationError(None, "$", "type", f"expected a Position, got {type(position).__name__}")
        with self._lock:
            positions = dict(self._snap.positions)
            positions[position.key] = position
            self._commit([("position", position.key, position)], persist=self._persist_positions, positions=_proxy(positions))
        self._after_write(self._persist_positions)

    def get_active_position(self, symbol: str, side: str) -> Position | None:
        return self._snap.positions.get((symbol, normalize_side(side)))

    def delete_active_position(self, symbol: str, side: str) -> bool:
        key: PositionKey = (symbol, normalize_side(side))
        with self._lock:
            if key not in self._snap.positions:
                return False
            positions = dict(self._snap.positions)
            del positions[key]
            self._commit([("position", key, None)], persist=self._persist_positions, positions=_proxy(positions))
        self._after_write(self._persist_positions)
        return True

    def get_positions(self) -> dict[PositionKey, Position]:
        """Every stored position, including zero-contract ones."""
        return dict(self._snap.positions)

    def get_all_positions(self) -> list[Position]:
        """Positions with non-zero contracts."""
        return [p for p in self._snap.positions.values() if p.contracts != 0]

    def get_total_active_positions(self) -> ActivePositionCounts:
        sides: dict[str, set[str]] = {}
        for p in self.get_all_positions():
            sides.setdefault(p.symbol, set()).add(p.side)
        total = sum(len(s) for s in sides.values())
        return ActivePositionCounts(total=total, total_hedged=sum(1 for s in sides.values() if len(s) == 2))

    def get_total_hedged_positions(self) -> int:
        return self.get_total_active_positions().total_hedged

    def is_symbol_side_in_position(self, symbol: str, side: str) -> bool:
        p = self.get_active_position(symbol, side)
        return p is not None and p.contracts != 0

    def is_symbol_in_any_position(self, symbol: str) -> bool:
        return self.is_symbol_side_in_position(symbol, "long") or self.is_symbol_side_in_position(symbol, "short")

    def process_price_event(self, symbol: str, price: Decimal | int | str | float) -> None:
        """Update mark price and unrealised PnL of *symbol*'s open positions.

        Long: ``(price - entry) * contracts * contract_size``; short: ``(entry - price) * ...``
        (contract_size 1 when unknown). Not a change to persist: the exchange can give PnL back.
        """
        px = to_decimal(price, "price")
        with self._lock:
            snap = self._snap
            changed: dict[PositionKey, Position] = {}
            for side in ("long", "short"):
                p = snap.positions.get((symbol, side))
                if p is None or p.contracts == 0:
                    continue
                size = p.contracts * (p.contract_size if p.contract_size is not None else _ONE)
                pnl = (px - p.entry_price) * size if side == "long" else (p.entry_price - px) * size
                changed[p.key] = dataclasses.replace(p, mark_price=px, unrealized_pnl=pnl)
            if not changed:
                return
            positions = dict(snap.positions)
            positions.update(changed)
            self._commit([("position", k, p) for k, p in changed.items()], source="price", positions=_proxy(positions))

    # ------------------------------------------------------------------------------------ leverage
    def set_symbol_leverage(self, symbol: str, leverage: Decimal | int | str | float) -> None:
        value = to_decimal(leverage, "leverage")
        with self._lock:
            lev = dict(self._snap.leverage)
            lev[_check_symbol(symbol)] = value
            self._commit([("leverage", symbol, value)], leverage=_proxy(lev))
        self._after_write(False)

    def get_symbol_leverage(self, symbol: str) -> Decimal | None:
        return self._snap.leverage.get(symbol)

    def get_symbol_leverage_cache(self) -> dict[str, Decimal]:
        return dict(self._snap.leverage)

    # ------------------------------------------------------------------------------------ orders
    def upsert_active_order(self, order: Order) -> None:
        """Keep NEW and PARTIALLY_FILLED orders (keyed by exchange id); any other status removes the order."""
        if not isinstance(order, Order):
            raise SchemaValidationError(None, "$", "type", f"expected an Order, got {type(order).__name__}")
        if not order.is_active:
            self.delete_order(order.id)
            return
        with self._lock:
            orders = dict(self._snap.orders)
            orders[order.id] = order
            self._commit([("order", order.id, order)], orders=_proxy(orders))
        self._after_write(False)

    def delete_order(self, order_id: str) -> bool:
        with self._lock:
            if order_id not in self._snap.orders:
                return False
            orders = dict(self._snap.orders)
            del orders[order_id]
            self._commit([("order", order_id, None)], orders=_proxy(orders))
        self._after_write(False)
        return True

    def clear_all_orders(self) -> None:
        with self._lock:
            ids = list(self._snap.orders)
            if ids:
                self._commit([("order", i, None) for i in ids], orders=EMPTY)
        self._after_write(False)

    def get_orders(self) -> list[Order]:
        return list(self._snap.orders.values())

    def get_active_orders(self) -> list[Order]:
        return [o for o in self.get_orders() if o.is_active]

    def get_order(self, order_id: str) -> Order | None:
        return self._snap.orders.get(order_id)

    def get_order_by_client_id(self, client_order_id: str) -> Order | None:
        return next((o for o in self.get_orders() if o.client_order_id == client_order_id), None)

    def get_orders_for_symbol(self, symbol: str) -> list[Order]:
        return [o for o in self.get_orders() if o.symbol == symbol]

    def get_orders_for_symbol_side(self, symbol: str, side: str) -> list[Order]:
        s = side.lower()
        return [o for o in self.get_orders() if o.symbol == symbol and o.side == s]

    def get_orders_by_status(self, status: str) -> list[Order]:
        s = status.upper()
        return [o for o in self.get_orders() if o.status == s]

    def get_orders_by_type(self, order_type: str) -> list[Order]:
        t = order_type.lower()
        return [o for o in self.get_orders() if o.type == t]

    def get_orders_sorted_by_id(self, *, ascending: bool = True) -> list[Order]:
        return sorted(self.get_orders(), key=lambda o: o.id, reverse=not ascending)

    def get_orders_sorted_by_symbol(self, *, ascending: bool = True) -> list[Order]:
        return sorted(self.get_orders(), key=lambda o: o.symbol, reverse=not ascending)

    def get_orders_sorted_by_price(self, *, ascending: bool = True) -> list[Order]:
        """By price; orders without a price (market orders) come last either way."""
        return _by_price(self.get_orders(), ascending)

    def get_orders_for_symbol_sorted_by_price(self, symbol: str, *, ascending: bool = True) -> list[Order]:
        return _by_price(self.get_orders_for_symbol(symbol), ascending)

    def get_orders_for_symbol_side_sorted_by_price(self, symbol: str, side: str, *, ascending: bool = True) -> list[Order]:
        return _by_price(self.get_orders_for_symbol_side(symbol, side), ascending)

    def get_orders_sorted_by_timestamp(self, *, ascending: bool = True) -> list[Order]:
        """Oldest first (or newest first); orders without a timestamp come last either way."""
        priced = [o for o in self.get_orders() if o.timestamp is not None]
        rest = [o for o in self.get_orders() if o.timestamp is None]
        return sorted(priced, key=lambda o: o.timestamp or 0, reverse=not ascending) + rest

    # ------------------------------------------------------------------------------------ metadata
    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Replace *symbol*'s metadata (a JSON-able dict; a private copy is kept). Marks pending persist."""
        clean = _document.clean_metadata(_check_meta_symbol(symbol), data)
        frozen = freeze_json(clean)
        with self._lock:
            meta = dict(self._snap.metadata)
            meta[symbol] = frozen
            self._commit([("metadata", symbol, frozen)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return thaw_json(frozen)  # type: ignore[no-any-return]

    def set_symbol_metadata_value(self, symbol: str, key: str, value: Any) -> dict[str, Any]:
        """Set one value in *symbol*'s metadata (initialise it with :meth:`set_symbol_metadata` first).
        Marks pending persist; returns a copy of the symbol's metadata."""
        if not isinstance(key, str):
            raise SchemaValidationError(None, "$.key", "type", f"metadata keys are strings, got {key!r}")
        _document.check_json_value(value, f"$.symbol_metadata[{symbol!r}].{key}")
        with self._lock:
            current = self._snap.metadata.get(symbol)
            if current is None:
                raise SymbolMetadataNotFoundError(symbol)
            data = thaw_json(current)
            data[key] = value
            frozen = freeze_json(_document.clean_metadata(symbol, data))
            meta = dict(self._snap.metadata)
            meta[symbol] = frozen
            self._commit([("metadata", symbol, frozen)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return thaw_json(frozen)  # type: ignore[no-any-return]

    def get_symbol_metadata(self, symbol: str) -> dict[str, Any] | None:
        """A deep copy (editing it changes nothing until you set it), or None."""
        found = self._snap.metadata.get(symbol)
        return thaw_json(found) if found is not None else None

    def get_all_symbol_metadata(self) -> dict[str, dict[str, Any]]:
        return {s: thaw_json(d) for s, d in self._snap.metadata.items()}

    def get_symbols_with_metadata(self) -> list[str]:
        return list(self._snap.metadata)

    def delete_symbol_metadata(self, symbol: str) -> bool:
        """Remove *symbol*'s metadata; marks pending persist when there was some. Returns whether it existed."""
        with self._lock:
            if symbol not in self._snap.metadata:
                return False
            meta = dict(self._snap.metadata)
            del meta[symbol]
            self._commit([("metadata", symbol, None)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return True

    def set_all_symbol_metadata(self, data: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace all metadata (the restore path): does NOT mark pending persist."""
        frozen = {_check_meta_symbol(s): freeze_json(_document.clean_metadata(s, d)) for s, d in data.items()}
        with self._lock:
            old = self._snap.metadata
            updates = [("metadata", s, None) for s in old if s not in frozen] + [("metadata", s, d) for s, d in frozen.items()]
            self._commit(updates, source="restore", metadata=_proxy(frozen))

    # ------------------------------------------------------------------------------------ summary
    def get_session_summary(self, starting_balance: Decimal | int | str | float) -> SessionSummary:
        start = to_decimal(starting_balance, "starting_balance")
        snap = self._snap
        active = tuple(p for p in snap.positions.values() if p.contracts != 0)
        locked = _ZERO
        upnl = _ZERO
        for p in active:
            upnl += p.unrealized_pnl or _ZERO
            size = p.contracts * (p.contract_size if p.contract_size is not None else _ONE)
            notional = abs(p.notional) if p.notional is not None else size * p.entry_price
            lev = p.leverage or snap.leverage.get(p.symbol) or _ONE
            locked += notional / lev
        return SessionSummary(
            version=snap.version,
            starting_balance=start,
            balance_now=snap.balance,
            previous_balance=snap.previous_balance,
            locked_margin=locked,
            available=snap.balance - locked,
            if_closed_at_market=snap.balance + upnl,
            realised_pnl=snap.balance - start,
            unrealised_pnl=upnl,
            active_positions=active,
        )

    # ------------------------------------------------------------------------------------ reconciliation
    def reconcile(
        self,
        exchange_positions: Iterable[Mapping[str, Any]],
        *,
        tolerance: Decimal | int | str | float = 0,
        price_tolerance: Decimal | int | str | float = 0,
    ) -> ReconciliationReport:
        """Compare this store's positions with ccxt ``fetch_positions`` output; changes nothing."""
        return reconcile(self._snap.positions, exchange_positions, tolerance=tolerance, price_tolerance=price_tolerance)

    def apply_reconciliation(self, report: ReconciliationReport) -> AppliedReconciliation:
        """Make the positions match the exchange as the report saw it; metadata, orders, balances stay.

        Refused with :class:`~posstate.StaleReportError` if the positions changed (size, entry price,
        keys) since the report was made. Local SL/TP and other fields the exchange does not report are kept.
        Emits position updates (source ``reconcile``) and a ``reconciliationApplied`` event.
        """
        with self._lock:
            current = self._snap.positions
            if fingerprint(current) != report.local_fingerprint:
                raise StaleReportError("the store's positions changed since this reconciliation report was made")
            wanted = {k: merged(current.get(k), p) for k, p in report.exchange_positions.items()}
            removed = tuple(sorted(k for k in current if k not in wanted))
            added = tuple(sorted(k for k in wanted if k not in current))
            updated = tuple(sorted(k for k in wanted if k in current and current[k] != wanted[k]))
            version = self._snap.version
            if removed or added or updated:
                updates = [("position", k, None) for k in removed] + [("position", k, wanted[k]) for k in added + updated]
                positions = _proxy(dict(sorted(wanted.items())))
                version = self._commit(updates, source="reconcile", persist=self._persist_positions, positions=positions)
        result = AppliedReconciliation(added=added, removed=removed, updated=updated, version=version)
        self._emit("reconciliationApplied", {"version": version, **result.to_dict()})
        self._after_write(self._persist_positions and result.changed)
        return result

    def _restore_positions(self, positions: Mapping[PositionKey, Position]) -> None:
        """Replace all positions without marking pending (the persisted store's restore path)."""
        with self._lock:
            old = self._snap.positions
            updates: list[tuple[str, Any, Any]] = [("position", k, None) for k in old if k not in positions]
            updates += [("position", k, p) for k, p in positions.items()]
            self._commit(updates, source="restore", positions=_proxy(dict(positions)))


def _by_price(orders: list[Order], ascending: bool) -> list[Order]:
    priced = [o for o in orders if o.price is not None]
    rest = [o for o in orders if o.price is None]
    return sorted(priced, key=lambda o: o.price or _ZERO, reverse=not ascending) + rest
