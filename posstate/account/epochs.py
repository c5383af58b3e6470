"""Position lifecycle epochs: each (symbol, side) goes ``open -> closing -> closed`` with an epoch that grows by
one whenever a new position opens on it.

An order remembers the epoch it was placed for; a fill or an update tagged with an older epoch (or with the
epoch of a position already closed) is refused and reported, so stale data never reopens a closed position.
Pure functions over the JSON the ledger stores (``{"epoch", "state", "version", "events"}`` per
``"SYMBOL|side"``); each position event carries the aggregate's next version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

from posstate.account.ledgertypes import ledger_arithmetic, tidy
from posstate.account.lifecycle import is_opening
from posstate.model.position import Position, PositionKey

LifecycleState = Literal["open", "closing", "closed"]
POSITION_EVENTS: frozenset[str] = frozenset({"position_opened", "position_modified", "position_closed"})
#: Position events kept per (symbol, side); older ones are dropped (the version keeps counting).
POSITION_EVENT_BUFFER = 16
_ZERO = Decimal(0)


def key_text(key: PositionKey) -> str:
    return f"{key[0]}|{key[1]}"


def empty() -> dict[str, Any]:
    return {"epoch": 0, "state": "closed", "version": 0, "events": []}


def get(lifecycles: Mapping[str, Any], key: PositionKey) -> dict[str, Any]:
    found = lifecycles.get(key_text(key))
    return dict(found) if found is not None else empty()


def adopt_open(lifecycles: dict[str, Any], positions: Mapping[PositionKey, Position], at: int) -> dict[str, Any]:
    """*lifecycles* with an open epoch 1 for every open position that has none (a state written before the
    ledger, or positions set through the plain store API)."""
    out = dict(lifecycles)
    for key, p in positions.items():
        if p.contracts != 0 and key_text(key) not in out:
            out[key_text(key)] = record(empty(), "position_opened", at, p, source="restore")
    return out


def epoch_for_order(lc: Mapping[str, Any], order: Mapping[str, Any]) -> int:
    """The epoch an order belongs to: the open position's, or (flat) the next one for an opening order."""
    if lc["state"] != "closed":
        return int(lc["epoch"])
    return int(lc["epoch"]) + (1 if is_opening(order) else 0)


def stale_reason(lc: Mapping[str, Any], epoch: int) -> str | None:
    """Why data tagged with *epoch* must not touch this position, or None when it may."""
    if epoch < lc["epoch"]:
        return f"tagged with epoch {epoch}; the position is at epoch {lc['epoch']}"
    if epoch == lc["epoch"] and lc["state"] == "closed" and epoch > 0:
        return f"epoch {epoch} is closed"
    return None


def record(lc: dict[str, Any], kind: str, at: int, position: Position | None, **extra: Any) -> dict[str, Any]:
    """*lc* after a position event of *kind* (opened: a new epoch; closed: state closed)."""
    out = dict(lc)
    if kind == "position_opened":
        out["epoch"] = max(int(lc["epoch"]) + 1, int(extra.pop("epoch", 0)))
        out["state"] = "open"
    elif kind == "position_closed":
        out["state"] = "closed"
    elif "state" in extra:
        out["state"] = extra.pop("state")
    out["version"] = int(lc["version"]) + 1
    event: dict[str, Any] = {"v": out["version"], "type": kind, "at": at, "epoch": out["epoch"], "state": out["state"]}
    if position is not None:
        event["contracts"] = str(position.contracts)
        event["entry_price"] = str(position.entry_price)
    event.update(extra)
    out["events"] = [*lc["events"], event][-POSITION_EVENT_BUFFER:]
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class FillEffect:
    """What a fill does to its position: the new position (None: closed), the lifecycle, or why it was refused."""

    position: Position | None
    lifecycle: dict[str, Any]
    refused: str | None = None
    changed: bool = True


@ledger_arithmetic
def fill_effect(
    lc: dict[str, Any], current: Position | None, order: Mapping[str, Any], amount: Decimal, price: Decimal, at: int
) -> FillEffect:
    """The position after a fill of *amount* at *price* for *order* (pure)."""
    epoch = int(order["epoch"])
    if is_opening(order):
        if lc["state"] == "closed":
            if epoch <= lc["epoch"]:
                return FillEffect(current, lc, f"late fill for epoch {epoch}, which is closed", changed=False)
            held = current.contracts if current is not None else _ZERO  # a position set without the ledger
            if held:
                assert current is not None
                size = held + amount
                pos = dataclasses.replace(
                    current, contracts=size, entry_price=tidy((current.entry_price * held + price * amount) / size), timestamp=at
                )
            else:
                pos = Position(
                    symbol=order["symbol"], side=order["position_side"], contracts=amount, entry_price=price, timestamp=at
                )
            return FillEffect(pos, record(lc, "position_opened", at, pos, epoch=epoch, order=order["key"]))
        if epoch < lc["epoch"]:
            return FillEffect(current, lc, f"late fill for epoch {epoch}; the position is at epoch {lc['epoch']}", changed=False)
        held = current.contracts if current is not None else _ZERO
        entry = current.entry_price if current is not None else price
        size = held + amount
        new_entry = tidy((entry * held + price * amount) / size)
        if current is None:
            pos = Position(
                symbol=order["symbol"], side=order["position_side"], contracts=size, entry_price=new_entry, timestamp=at
            )
        else:
            pos = dataclasses.replace(current, contracts=size, entry_price=new_entry, timestamp=at)
        return FillEffect(pos, record(lc, "position_modified", at, pos, order=order["key"]))
    if lc["state"] == "closed" or epoch != lc["epoch"]:
        why = "is closed" if lc["state"] == "closed" else f"is not the position's ({lc['epoch']})"
        return FillEffect(current, lc, f"reducing fill for epoch {epoch}, which {why}", changed=False)
    held = current.contracts if current is not None else _ZERO
    left = held - amount
    if left <= 0:
        return FillEffect(None, record(lc, "position_closed", at, None, order=order["key"]))
    assert current is not None
    pos = dataclasses.replace(current, contracts=left, timestamp=at)
    return FillEffect(pos, record(lc, "position_modified", at, pos, order=order["key"]))


def exchange_effect(lc: dict[str, Any], current: Position | None, new: Position | None, at: int) -> tuple[dict[str, Any], bool]:
    """The lifecycle after the exchange reports *new* (None or zero contracts: flat); (lifecycle, changed)."""
    open_now = new is not None and new.contracts != 0
    if open_now:
        if lc["state"] == "closed":
            return record(lc, "position_opened", at, new, source="exchange"), True
        if current is None or current.contracts != new.contracts or current.entry_price != new.entry_price:  # type: ignore[union-attr]
            return record(lc, "position_modified", at, new, source="exchange"), True
        return lc, False
    if lc["state"] != "closed":
        return record(lc, "position_closed", at, None, source="exchange"), True
    return lc, False
