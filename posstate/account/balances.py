"""Balances per asset, as the reference architecture keeps them: total, available, hold (derived), source
(trading or funding) and the time of the last update. Pure parsing of ccxt ``fetch_balance`` output."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from posstate.account.ledgertypes import ledger_decimal
from posstate.core.errors import SchemaValidationError
from posstate.model.position import check_text, to_decimal

BalanceSource = Literal["trading", "funding"]
_CCXT_SKIP = frozenset({"info", "free", "used", "total", "timestamp", "datetime", "debt"})


@dataclass(frozen=True, slots=True)
class Balance:
    """One asset's balance. ``hold`` is ``total - available`` (what orders and margin lock)."""

    asset: str
    total: Decimal
    available: Decimal
    source: BalanceSource = "trading"
    updated_at: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.asset, str) or not 1 <= len(self.asset) <= 64:
            raise SchemaValidationError(
                None, "$.asset", "type", f"expected an asset code of 1 to 64 characters, got {self.asset!r}"
            )
        check_text(self.asset, "$.asset", "asset")
        object.__setattr__(self, "asset", self.asset.upper())
        object.__setattr__(self, "total", ledger_decimal(self.total, "total"))
        object.__setattr__(self, "available", ledger_decimal(self.available, "available"))
        if self.source not in ("trading", "funding"):
            raise SchemaValidationError(None, "$.source", "enum", f"expected 'trading' or 'funding', got {self.source!r}")

    @property
    def hold(self) -> Decimal:
        return self.total - self.available

    @property
    def key(self) -> str:
        """``USDT`` for the trading account, ``USDT.FUNDING`` for the funding one."""
        return self.asset if self.source == "trading" else f"{self.asset}.FUNDING"

    def to_json(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "total": str(self.total),
            "available": str(self.available),
            "source": self.source,
            "updated_at": self.updated_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.to_json(), "hold": str(self.hold)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Balance:
        return cls(d["asset"], Decimal(d["total"]), Decimal(d["available"]), d["source"], d.get("updated_at"))


def parse_balances(snapshot: Any, *, source: BalanceSource, at: int) -> list[Balance]:
    """Balances from ccxt ``fetch_balance()`` (``{"USDT": {"free", "used", "total"}, ...}``), a mapping of asset
    to such dicts, or a list of :class:`Balance`. Assets with neither total nor free are skipped."""
    if isinstance(snapshot, Mapping):
        out = []
        for asset, entry in snapshot.items():
            if asset in _CCXT_SKIP or not isinstance(entry, Mapping):
                continue
            total, free = entry.get("total"), entry.get("free")
            if total is None and free is None:
                continue
            amount = total if total is not None else free
            out.append(
                Balance(
                    asset, to_decimal(amount, "total"), to_decimal(free if free is not None else amount, "available"), source, at
                )
            )
        return out
    if isinstance(snapshot, Iterable) and not isinstance(snapshot, (str, bytes)):
        items = list(snapshot)
        for i, b in enumerate(items):
            if not isinstance(b, Balance):
                raise SchemaValidationError(None, f"$[{i}]", "type", f"expected a Balance, got {type(b).__name__}")
        return items
    raise SchemaValidationError(None, "$", "type", "expected ccxt fetch_balance() output or a list of Balance")
