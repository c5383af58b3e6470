"""Reconciliation: compare the positions we remember with what the exchange reports (ccxt ``fetch_positions``).

:func:`reconcile` only reads and returns a frozen :class:`ReconciliationReport`; nothing changes until
:meth:`ReconciliationReport.apply` (or ``store.apply_reconciliation``) makes the store match the exchange.
The exchange is the source of truth for positions; the bot's symbol metadata is kept as it is.
Positions are keyed by (symbol, side), so hedge mode (a long and a short on one symbol) is compared
side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from posstate.core.errors import SchemaValidationError
from posstate.model.position import Position, PositionKey, Side, to_decimal

if TYPE_CHECKING:
    from posstate.account.store import AccountStateStore

#: Local fields kept when the exchange does not report them (the bot's own SL/TP, a known contract size).
KEEP_LOCAL_IF_MISSING: tuple[str, ...] = ("contract_size", "leverage", "margin_mode", "stop_loss_price", "take_profit_price")

Fingerprint = tuple[tuple[str, str, str, str], ...]


def fingerprint(positions: Mapping[PositionKey, Position]) -> Fingerprint:
    """What a report depends on: each position's key, size and entry price (not PnL, which ticks move)."""
    return tuple(sorted((k[0], k[1], str(p.contracts), str(p.entry_price)) for k, p in positions.items()))


def parse_exchange_positions(items: Iterable[Mapping[str, Any]]) -> tuple[dict[PositionKey, Position], int]:
    """Positions from a ccxt ``fetch_positions`` list; zero-contract (flat) entries are skipped and counted."""
    if isinstance(items, (str, bytes, Mapping)):
        raise SchemaValidationError(None, "$", "type", "expected a list of ccxt position dicts (what fetch_positions returns)")
    out: dict[PositionKey, Position] = {}
    skipped = 0
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise SchemaValidationError(None, f"$[{i}]", "type", f"expected a ccxt position dict, got {type(item).__name__}")
        raw = item.get("contracts")
        try:
            if raw is None or to_decimal(raw, "contracts") == 0:
                skipped += 1
                continue
            pos = Position.from_ccxt(item)
        except SchemaValidationError as exc:
            raise SchemaValidationError(None, f"$[{i}]{exc.json_path[1:]}", exc.rule, exc.detail) from exc
        if pos.key in out:
            raise SchemaValidationError(
                None, f"$[{i}]", "unique", f"two exchange positions for {pos.symbol} {pos.side} (expected one per side)"
            )
        out[pos.key] = pos
    return out, skipped


@dataclass(frozen=True, slots=True)
class SizeMismatch:
    """Same (symbol, side) on both sides, different size. ``difference`` is exchange minus local."""

    symbol: str
    side: Side
    local_contracts: Decimal
    exchange_contracts: Decimal
    difference: Decimal
    within_tolerance: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": self.side,
            "local_contracts": str(self.local_contracts),
            "exchange_contracts": str(self.exchange_contracts),
            "difference": str(self.difference),
            "within_tolerance": self.within_tolerance,
        }


@dataclass(frozen=True, slots=True)
class SideMismatch:
    """A symbol held on one side locally and only on the other side on the exchange."""

    symbol: str
    local: tuple[Position, ...]
    exchange: tuple[Position, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "local_sides": [p.side for p in self.local],
            "exchange_sides": [p.side for p in self.exchange],
            "local": [p.to_dict() for p in self.local],
            "exchange": [p.to_dict() for p in self.exchange],
        }


@dataclass(frozen=True, slots=True)
class EntryPriceDifference:
    symbol: str
    side: Side
    local_entry_price: Decimal
    exchange_entry_price: Decimal
    difference: Decimal

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "side": self.side,
            "local_entry_price": str(self.local_entry_price),
            "exchange_entry_price": str(self.exchange_entry_price),
            "difference": str(self.difference),
        }


@dataclass(frozen=True, slots=True)
class AppliedReconciliation:
    """What :meth:`ReconciliationReport.apply` changed, and the store version after it."""

    added: tuple[PositionKey, ...]
    removed: tuple[PositionKey, ...]
    updated: tuple[PositionKey, ...]
    version: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.updated)

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": [list(k) for k in self.added],
            "removed": [list(k) for k in self.removed],
            "updated": [list(k) for k in self.updated],
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class ReconciliationReport:
    """Differences between local positions and the exchange's. Making it changes nothing.

    ``missing_locally``: on the exchange, not here (opened by hand, or while the bot was down).
    ``stale_locally``: here, not on the exchange (closed, liquidated, or closed by hand while down).
    ``size_mismatches``: same key, size differs by more than ``tolerance`` contracts;
    ``size_within_tolerance``: differs, but by at most ``tolerance``. ``side_mismatches``: the symbol is
    long here and short there (or the reverse); those positions are not repeated in missing/stale.
    ``entry_price_differences``: same key, entry price differs by more than ``price_tolerance``
    (informational: apply takes the exchange's value anyway).
    """

    missing_locally: tuple[Position, ...]
    stale_locally: tuple[Position, ...]
    size_mismatches: tuple[SizeMismatch, ...]
    size_within_tolerance: tuple[SizeMismatch, ...]
    side_mismatches: tuple[SideMismatch, ...]
    entry_price_differences: tuple[EntryPriceDifference, ...]
    exchange_positions: Mapping[PositionKey, Position]
    local_fingerprint: Fingerprint
    tolerance: Decimal
    price_tolerance: Decimal
    skipped_flat: int

    @property
    def in_sync(self) -> bool:
        """True when nothing differs beyond the tolerances (entry prices are not counted)."""
        return not (self.missing_locally or self.stale_locally or self.size_mismatches or self.side_mismatches)

    def apply(self, store: AccountStateStore) -> AppliedReconciliation:
        """Make *store* match the exchange (keeping symbol metadata); see ``apply_reconciliation``."""
        return store.apply_reconciliation(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (decimals as strings), for ``posstate reconcile`` output."""
        return {
            "in_sync": self.in_sync,
            "tolerance": str(self.tolerance),
            "price_tolerance": str(self.price_tolerance),
            "exchange_positions": len(self.exchange_positions),
            "skipped_flat": self.skipped_flat,
            "missing_locally": [p.to_dict() for p in self.missing_locally],
            "stale_locally": [p.to_dict() for p in self.stale_locally],
            "size_mismatches": [m.to_dict() for m in self.size_mismatches],
            "size_within_tolerance": [m.to_dict() for m in self.size_within_tolerance],
            "side_mismatches": [m.to_dict() for m in self.side_mismatches],
            "entry_price_differences": [d.to_dict() for d in self.entry_price_differences],
        }


def _check_tolerance(name: str, value: Decimal | int | str | float) -> Decimal:
    dec = to_decimal(value, name)
    if dec < 0:
        raise SchemaValidationError(None, f"$.{name}", "minimum", f"{name} must be >= 0, got {dec}")
    return dec


def reconcile(
    local_positions: Mapping[PositionKey, Position],
    exchange_positions: Iterable[Mapping[str, Any]],
    *,
    tolerance: Decimal | int | str | float = 0,
    price_tolerance: Decimal | int | str | float = 0,
) -> ReconciliationReport:
    """Compare *local_positions* with a ccxt ``fetch_positions`` list. Pure: changes nothing.

    Local positions with zero contracts count as absent. *tolerance* is in contracts (absolute);
    *price_tolerance* in quote units.
    """
    tol = _check_tolerance("tolerance", tolerance)
    ptol = _check_tolerance("price_tolerance", price_tolerance)
    remote, skipped = parse_exchange_positions(exchange_positions)
    local = {k: p for k, p in local_positions.items() if p.contracts != 0}

    by_symbol_local: dict[str, list[Position]] = {}
    by_symbol_remote: dict[str, list[Position]] = {}
    for p in local.values():
        by_symbol_local.setdefault(p.symbol, []).append(p)
    for p in remote.values():
        by_symbol_remote.setdefault(p.symbol, []).append(p)

    side_mismatches: list[SideMismatch] = []
    flipped: set[str] = set()
    for symbol in sorted(by_symbol_local.keys() & by_symbol_remote.keys()):
        l_sides = {p.side for p in by_symbol_local[symbol]}
        r_sides = {p.side for p in by_symbol_remote[symbol]}
        if not (l_sides & r_sides):
            flipped.add(symbol)
            side_mismatches.append(
                SideMismatch(
                    symbol,
                    tuple(sorted(by_symbol_local[symbol], key=lambda p: p.side)),
                    tuple(sorted(by_symbol_remote[symbol], key=lambda p: p.side)),
                )
            )

    missing = [p for k, p in sorted(remote.items()) if k not in local and p.symbol not in flipped]
    stale = [p for k, p in sorted(local.items()) if k not in remote and p.symbol not in flipped]
    over: list[SizeMismatch] = []
    within: list[SizeMismatch] = []
    prices: list[EntryPriceDifference] = []
    for key in sorted(local.keys() & remote.keys()):
        mine, theirs = local[key], remote[key]
        diff = theirs.contracts - mine.contracts
        if diff != 0:
            ok = abs(diff) <= tol
            (within if ok else over).append(SizeMismatch(key[0], key[1], mine.contracts, theirs.contracts, diff, ok))
        pdiff = theirs.entry_price - mine.entry_price
        if abs(pdiff) > ptol:
            prices.append(EntryPriceDifference(key[0], key[1], mine.entry_price, theirs.entry_price, pdiff))

    return ReconciliationReport(
        missing_locally=tuple(missing),
        stale_locally=tuple(stale),
        size_mismatches=tuple(over),
        size_within_tolerance=tuple(within),
        side_mismatches=tuple(side_mismatches),
        entry_price_differences=tuple(prices),
        exchange_positions=MappingProxyType(dict(remote)),
        local_fingerprint=fingerprint(local_positions),
        tolerance=tol,
        price_tolerance=ptol,
        skipped_flat=skipped,
    )


def merged(local: Position | None, exchange: Position) -> Position:
    """The exchange's position, keeping the local values of :data:`KEEP_LOCAL_IF_MISSING` it does not report."""
    if local is None:
        return exchange
    keep = {
        name: getattr(local, name)
        for name in KEEP_LOCAL_IF_MISSING
        if getattr(exchange, name) is None and getattr(local, name) is not None
    }
    if not keep:
        return exchange
    values: dict[str, Any] = {**exchange.to_dict(), **keep}
    return Position.from_dict(values)
