"""Where the order ledger lives in the state document, and the checks a loaded ledger must pass.

The ledger is kept in the manager's own state document, as symbol-metadata entries under reserved names
(``__posstate_``, which the account store refuses and hides), so it shares the state file's atomic save,
encryption, authentication, backups and journal, and one ledger change is one journal record together with
the position it moves:

* ``__posstate_order__<key>``: one order, ``{"format": 1, "order": {...}, "events": [...]}`` (the key is the
  client order id, or ``x:`` + the exchange id for an adopted order; a key too long for a name is hashed);
* ``__posstate_lifecycles__``: ``{"format": 1, "positions": {"SYMBOL|side": {"epoch", "state", "version",
  "events"}}}``;
* ``__posstate_balances__``: ``{"format": 1, "assets": {"USDT": {"asset", "total", "available", "source",
  "updated_at"}}}``;
* ``__posstate_forgotten__``: ``{"format": 1, "orders": {"<client order id>": <ms forgotten>}}``, the client ids
  of orders ``forget_order`` removed in the last :data:`FORGOTTEN_KEEP_MS`: the same decision recorded again is
  refused instead of being sent a second time.

schemas/ledger.schema.json (``$id`` ledger-1) describes these entries. Everything here is pure (no I/O).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import InvalidOperation
from typing import Any

from posstate.account import lifecycle as lc
from posstate.account.ledgertypes import looks_binary_float
from posstate.account.lifecycle import LIVE
from posstate.core.errors import OrderTransitionError
from posstate.model.position import MAX_SYMBOL_LENGTH, Position, PositionKey

LEDGER_FORMAT = 1
ORDER_PREFIX = "__posstate_order__"
LIFECYCLES = "__posstate_lifecycles__"
BALANCES = "__posstate_balances__"
LEGACY_INTENTS = "__posstate_orders__"
FORGOTTEN = "__posstate_forgotten__"
#: How long the client id of a forgotten order is remembered (a decision replayed later is sent again).
FORGOTTEN_KEEP_MS = 7 * 24 * 3600 * 1000

#: Fields (at any depth of a ledger entry) that hold decimals as text.
DECIMAL_KEYS: frozenset[str] = frozenset(
    {
        "amount",
        "price",
        "filled",
        "cost",
        "average_price",
        "fee",
        "exchange_filled",
        "contracts",
        "entry_price",
        "total",
        "available",
    }
)


def order_entry_name(key: str) -> str:
    name = ORDER_PREFIX + key
    if len(name) <= MAX_SYMBOL_LENGTH:
        return name
    return ORDER_PREFIX + "h" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]


def is_ledger_entry(name: str) -> bool:
    return name.startswith(ORDER_PREFIX) or name in (LIFECYCLES, BALANCES, FORGOTTEN)


def load_forgotten(entries: Mapping[str, Any]) -> tuple[dict[str, int] | None, list[Violation]]:
    """The client ids of forgotten orders (id -> ms); None, reported, when the entry is not one posstate writes."""
    entry = entries.get(FORGOTTEN)
    if entry is None:
        return {}, []
    ok = (
        isinstance(entry, Mapping)
        and entry.get("format") == LEDGER_FORMAT
        and isinstance(entry.get("orders"), Mapping)
        and all(isinstance(k, str) and type(v) is int for k, v in entry["orders"].items())
    )
    if not ok:
        return None, [Violation("malformed", FORGOTTEN, "not a forgotten-orders entry posstate writes")]
    return dict(entry["orders"]), []


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant of a loaded ledger (reported, never repaired)."""

    code: str
    subject: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "subject": self.subject, "detail": self.detail}


def _floats(value: Any, where: str, out: list[Violation]) -> None:
    if isinstance(value, float):
        out.append(Violation("binary_float", where, f"a JSON number ({value!r}) where a decimal string belongs"))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if k in DECIMAL_KEYS and isinstance(v, str) and looks_binary_float(v):
                out.append(
                    Violation("binary_float", f"{where}.{k}", f"{v!r} is a binary float's text, not the exchange's decimal")
                )
            else:
                _floats(v, f"{where}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _floats(v, f"{where}[{i}]", out)


def load_orders(entries: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Violation]]:
    """The orders of the ledger entries (key -> ``{"order", "events"}``) and the entries that are not orders."""
    orders: dict[str, dict[str, Any]] = {}
    bad: list[Violation] = []
    for name, entry in entries.items():
        if not name.startswith(ORDER_PREFIX):
            continue
        try:
            if entry.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format {entry.get('format')!r}")
            order, events = entry["order"], entry["events"]
            key = order["key"]
            if order_entry_name(key) != name:
                raise ValueError("entry name does not match the order's key")
            lc.OrderRecord.from_json(order)
            orders[key] = {"order": order, "events": list(events)}
        except (KeyError, TypeError, ValueError, AttributeError, InvalidOperation) as exc:
            bad.append(
                Violation("malformed", name, f"not an order entry posstate writes ({type(exc).__name__}: {str(exc)[:80]})")
            )
    return orders, bad


def load_lifecycles(entries: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Violation]]:
    """The position lifecycles of the ledger entries; a malformed entry or lifecycle is reported and left out."""
    entry = entries.get(LIFECYCLES)
    if entry is None:
        return {}, []
    if not isinstance(entry, Mapping) or entry.get("format") != LEDGER_FORMAT or not isinstance(entry.get("positions"), Mapping):
        return {}, [Violation("malformed", LIFECYCLES, "not a lifecycles entry posstate writes")]
    out: dict[str, dict[str, Any]] = {}
    bad: list[Violation] = []
    for text, life in entry["positions"].items():
        ok = (
            isinstance(life, Mapping)
            and type(life.get("epoch")) is int
            and life.get("state") in ("open", "closing", "closed")
            and type(life.get("version")) is int
            and isinstance(life.get("events"), list)
            and "|" in text
        )
        if ok:
            out[text] = dict(life)
        else:
            bad.append(Violation("malformed", f"{LIFECYCLES} {text}", "not a position lifecycle posstate writes"))
    return out, bad


def load_balances(entries: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Violation]]:
    """The balances of the ledger entries; a malformed one is reported and left out."""
    from posstate.account.balances import Balance

    entry = entries.get(BALANCES)
    if entry is None:
        return {}, []
    if not isinstance(entry, Mapping) or entry.get("format") != LEDGER_FORMAT or not isinstance(entry.get("assets"), Mapping):
        return {}, [Violation("malformed", BALANCES, "not a balances entry posstate writes")]
    out: dict[str, dict[str, Any]] = {}
    bad: list[Violation] = []
    for key, value in entry["assets"].items():
        try:
            Balance.from_json(value)
            out[key] = dict(value)
        except (KeyError, TypeError, ValueError, AttributeError, InvalidOperation):
            bad.append(Violation("malformed", f"{BALANCES} {key}", "not a balance posstate writes"))
    return out, bad


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The parts of the ledger a load left out of memory, kept so that no later write drops them: the names of
    malformed order entries, and the raw malformed position lifecycles and balances (``None``: the whole
    lifecycles or balances entry is not one posstate writes). Writes that would overwrite them are refused."""

    orders: frozenset[str] = frozenset()
    lifecycles: Mapping[str, Any] | None = None
    balances: Mapping[str, Any] | None = None

    def keep(self, what: str, new: Mapping[str, Any]) -> dict[str, Any]:
        """*new* (the lifecycles' ``positions`` or the balances' ``assets`` to write) with the malformed items
        put back as they were. Raises MalformedLedgerEntryError when *new* would replace one, or the whole
        entry is unreadable."""
        from posstate.core.errors import MalformedLedgerEntryError

        entry = LIFECYCLES if what == "lifecycles" else BALANCES
        bad = self.lifecycles if what == "lifecycles" else self.balances
        if bad is None:
            raise MalformedLedgerEntryError(entry, "not an entry of ledger format 1")
        clash = sorted(k for k in bad if k in new)
        if clash:
            raise MalformedLedgerEntryError(f"{entry} {clash[0]}", "its stored item is malformed")
        return {**new, **bad}


def unreadable(entries: Mapping[str, Any]) -> Unreadable:
    """What :func:`load_orders`, :func:`load_lifecycles` and :func:`load_balances` leave out of *entries*."""
    _, bad_orders = load_orders(entries)
    out: dict[str, Mapping[str, Any] | None] = {}
    for what, entry, loader, field_name in (
        ("lifecycles", LIFECYCLES, load_lifecycles, "positions"),
        ("balances", BALANCES, load_balances, "assets"),
    ):
        raw = entries.get(entry)
        loaded, bad = loader(entries)
        if raw is None:
            out[what] = {}
        elif any(v.subject == entry for v in bad):
            out[what] = None
        else:
            out[what] = {k: v for k, v in raw[field_name].items() if k not in loaded}
    return Unreadable(frozenset(v.subject for v in bad_orders), out["lifecycles"], out["balances"])


def check(entries: Mapping[str, Any], positions: Mapping[PositionKey, Position]) -> list[Violation]:
    """Every invariant of the ledger in *entries* (the state's reserved metadata) against *positions*.

    No two live orders share a client order id; every live order has its intent (an ``order_placed`` or
    ``order_adopted`` event first); no fill belongs to an order the ledger never sent; an order equals the
    order its events rebuild; no position is open in a closed epoch; no decimal is a binary float's text.
    """
    orders, out = load_orders(entries)
    seen_cids: dict[str, str] = {}
    for key, item in sorted(orders.items()):
        order, events = item["order"], item["events"]
        subject = f"order {key}"
        cid = order.get("client_order_id")
        if order["status"] in LIVE and cid:
            if cid in seen_cids:
                out.append(
                    Violation(
                        "duplicate_client_id", subject, f"live orders {seen_cids[cid]!r} and {key!r} share client id {cid!r}"
                    )
                )
            seen_cids.setdefault(cid, key)
        first = events[0]["type"] if events and isinstance(events[0], Mapping) else None
        if first not in ("order_placed", "order_adopted"):
            out.append(
                Violation("no_intent", subject, "the order's events do not start with its intent (order_placed/order_adopted)")
            )
            continue
        sent = order["origin"] == "exchange" or any(e.get("type") == "order_sent" for e in events)
        if int(order.get("fill_count", 0)) and not sent:
            out.append(Violation("fill_for_unknown_order", subject, "fills recorded for an order the ledger never sent"))
        try:
            rebuilt = lc.reconstruct(events)
        except (OrderTransitionError, KeyError, TypeError, ValueError, InvalidOperation) as exc:
            out.append(Violation("events_disagree", subject, f"its events do not replay ({str(exc)[:100]})"))
            continue
        if rebuilt != order:
            diff = sorted(k for k in set(order) | set(rebuilt or {}) if order.get(k) != (rebuilt or {}).get(k))
            out.append(Violation("events_disagree", subject, f"stored order differs from its events in {', '.join(diff)}"))
    lifecycles, bad_life = load_lifecycles(entries)
    out.extend(bad_life)
    out.extend(load_balances(entries)[1])
    out.extend(load_forgotten(entries)[1])
    for text, state in sorted(lifecycles.items()):
        symbol, _, side = text.rpartition("|")
        p = positions.get((symbol, side))  # type: ignore[arg-type]
        if p is not None and p.contracts != 0 and state.get("state") == "closed":
            out.append(
                Violation("position_in_closed_epoch", f"position {text}", f"open position in closed epoch {state.get('epoch')}")
            )
    for name in sorted(entries):
        if is_ledger_entry(name):
            _floats(entries[name], name, out)
    return out


def carry_orders(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The order entries of *before* (a state's metadata before a restore, a recovery or a repair) that *after*
    lacks or holds at an older version. An order is the exchange's fact: rolling the state back does not take
    it back, and an order forgotten this way would be sent again when the same decision is recorded anew. A
    malformed entry in *after* is left as it is. Pure: the caller writes the result."""
    old, _ = load_orders({n: e for n, e in before.items() if n.startswith(ORDER_PREFIX)})
    new, _ = load_orders({n: e for n, e in after.items() if n.startswith(ORDER_PREFIX)})
    out: dict[str, dict[str, Any]] = {}
    for key, item in sorted(old.items()):
        name = order_entry_name(key)
        if name in after and key not in new:
            continue
        cur = new.get(key)
        if cur is None or int(cur["order"]["version"]) < int(item["order"]["version"]):
            out[name] = order_entry(item["order"], item["events"])
    # The client ids of forgotten orders too: lost, the same decision could be recorded and sent again.
    old_ids, _ = load_forgotten(before)
    new_ids, _ = load_forgotten(after)
    if old_ids and new_ids is not None:
        merged = {**old_ids, **{c: max(at, old_ids.get(c, at)) for c, at in new_ids.items()}}
        if merged != new_ids:
            out[FORGOTTEN] = {"format": LEDGER_FORMAT, "orders": merged}
    return out


def order_history(entries: Mapping[str, Any], order_id: str | None = None) -> list[dict[str, Any]]:
    """Every stored event of every order (or of the order whose key, client id or exchange id is *order_id*),
    each with its ``order_key``, oldest first per order."""
    orders, _ = load_orders(entries)
    out: list[dict[str, Any]] = []
    for key, item in sorted(orders.items(), key=lambda kv: (kv[1]["order"].get("created_at", 0), kv[0])):
        o = item["order"]
        if order_id is not None and order_id not in (key, o.get("client_order_id"), o.get("exchange_order_id")):
            continue
        out.extend({"order_key": key, **e} for e in item["events"])
    return out


def position_history(lifecycles: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kept events of every position lifecycle, each with its ``position`` (``SYMBOL|side``)."""
    return [{"position": k, **e} for k, v in sorted(lifecycles.items()) for e in v.get("events", [])]


def migrate_intents(
    metadata: Mapping[str, Any], *, now: int, positions: Mapping[PositionKey, Position] | None = None
) -> dict[str, dict[str, Any]]:
    """Ledger order entries for the order intents an older posstate recorded (``__posstate_orders__``, written
    by ``OrderIntents``) that the ledger does not hold yet. Pure: the caller writes the result.

    ``recorded`` (perhaps sent, nobody knows) becomes ``unknown``: confirm it by client id, never send it again;
    ``sent`` becomes ``accepted``; ``filled`` stays a closed order with no fill details (its fills came before
    the ledger). The legacy entry itself is left as it is. An intent does not say which position it serves:
    read in one-way mode, a sell while *positions* hold only a long on its symbol reduces that long (a buy while
    only a short is held reduces the short); anything else opens a position on its own side.
    """
    held = {k for k, p in (positions or {}).items() if p.contracts != 0}
    legacy = metadata.get(LEGACY_INTENTS)
    intents = legacy.get("intents") if isinstance(legacy, Mapping) else None
    if not isinstance(intents, Mapping):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for cid, d in sorted(intents.items()):
        name = order_entry_name(cid)
        if name in metadata or not isinstance(d, Mapping):
            continue
        at = d.get("recorded_at") if type(d.get("recorded_at")) is int else now
        base = lc.new_order(
            client_order_id=cid,
            exchange_order_id=d.get("exchange_order_id"),
            origin="local",
            symbol=d["symbol"],
            side=d["side"],
            type=d["type"],
            amount=d["amount"],
            price=d.get("price"),
            reduce_only=_reduces(held, d["symbol"], d["side"]),
            position_side=None,
            epoch=0,
            status="recorded",
            strategy=d.get("strategy"),
            signal=d.get("signal"),
        )
        events: list[dict[str, Any]] = [
            {"v": 1, "type": "order_placed", "at": at, "order": base, "migrated": True},
            {"v": 2, "type": "order_sent", "at": at},
        ]
        state = d.get("state")
        if state == "recorded":
            events.append({"v": 3, "type": "order_status_unknown", "at": now, "reason": "migrated: recorded before the ledger"})
        else:
            events.append({"v": 3, "type": "order_accepted", "at": now, "exchange_order_id": d.get("exchange_order_id")})
            if state == "filled":
                events.append({"v": 4, "type": "order_updated", "at": now, "status": "filled"})
        order = lc.reconstruct(events)
        assert order is not None
        out[name] = {"format": LEDGER_FORMAT, "order": order, "events": events}
    return out


def _reduces(held: set[PositionKey], symbol: str, side: str) -> bool:
    long_, short = (symbol, "long") in held, (symbol, "short") in held
    return (side == "sell" and long_ and not short) or (side == "buy" and short and not long_)


def order_entry(order: Mapping[str, Any], events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"format": LEDGER_FORMAT, "order": dict(order), "events": list(events)}
