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
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from posstate.account.metadata import StoreMetadata
from posstate.account.orderbook import StoreOrders
from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport, fingerprint, merged, reconcile
from posstate.account.storebase import _ONE, _ZERO, _check_symbol, _proxy
from posstate.account.types import (
    ActivePositionCounts,
    SessionSummary,
    normalize_side,
)
from posstate.core.errors import SchemaValidationError, StaleReportError
from posstate.core.serving import Servable
from posstate.model.position import Position, PositionKey, to_decimal


class AccountStateStore(StoreOrders, StoreMetadata, Servable):
    """In-memory account state; thread-safe; lock-free reads. See the module docstring."""

    #: Whether position changes count as changes to persist (the persisted store says yes; accountstate no).
    _persist_positions = False

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
