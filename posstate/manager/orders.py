"""Idempotent orders: deterministic client order ids, recorded durably before the order is sent.

The id is a hash of strategy, signal and order parameters (no clock, no randomness), so the same decision
after a restart yields the same id, and an exchange that deduplicates client ids refuses a second copy.
:class:`OrderIntents` records each intent in the state file *before* the order is sent; a bot that
restarts after kill -9 asks :meth:`OrderIntents.was_sent` and, instead of sending again, confirms with the
exchange by client id.

Where intents live: in the manager's own state document, as the symbol metadata of the reserved name
``__posstate_orders__`` (see :data:`INTENTS_KEY`). That is deliberate: it needs no schema change, and the
intents share the state file's atomic save, encryption, checksum, backups and journal, and land in the
same atomic write as the positions. A separate file could be out of step with the state after a crash.
The account store refuses and hides names starting with ``__posstate_``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from posstate.core.errors import OrderIntentNotFoundError, SchemaValidationError
from posstate.manager.manager import PositionStateManager
from posstate.model.position import SURROGATE, to_decimal

INTENTS_KEY = "__posstate_orders__"
IntentState = Literal["recorded", "sent", "filled"]
_PREFIX = re.compile(r"[A-Za-z0-9]{0,8}")
MAX_ID_LENGTH = 32


#: Exponents (after trailing zeros are stripped) written in fixed point; others as DIGITS"E"EXPONENT.
_FIXED_POINT_EXPONENTS = range(-100, 101)


def _canonical_decimal(value: Decimal | int | str | float | None, name: str) -> str:
    """One text per number, built exactly from the digits (no Decimal context: nothing rounds, nothing overflows).

    Same number, same text: 1, 1.0 and 1E0 hash alike, and -0 is 0. Different numbers, different texts: a
    context's ``normalize()`` would round a 29th digit away and flush 1E-99999999 to 0. Ordinary values keep
    the fixed-point text earlier versions wrote, so their ids did not change; an exponent beyond +-100 is
    written as ``DIGITS E EXPONENT``, which has an ``E`` and so never equals a fixed-point text.
    """
    if value is None:
        return "-"
    sign, digit_tuple, exponent = to_decimal(value, name).as_tuple()
    assert isinstance(exponent, int)  # to_decimal refuses NaN and infinities
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    if not digits:
        return "0"
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    minus = "-" if sign else ""
    if exponent not in _FIXED_POINT_EXPONENTS:
        return f"{minus}{stripped}E{exponent}"
    if exponent >= 0:
        return minus + stripped + "0" * exponent
    whole, frac = stripped[:exponent], stripped[exponent:]
    return f"{minus}{whole or '0'}.{frac.rjust(-exponent, '0')}"


def make_client_order_id(
    *,
    strategy: str,
    signal: str,
    symbol: str,
    side: str,
    type: str,
    amount: Decimal | int | str | float,
    price: Decimal | int | str | float | None = None,
    prefix: str = "ps",
) -> str:
    """A deterministic client order id: *prefix* + hex of SHA-256 over the canonical parameters.

    At most 32 characters of ``[A-Za-z0-9]`` (accepted by Binance, Bybit, OKX and most others). No
    timestamp: the same (strategy, signal, order) gives the same id in any process, before and after a
    crash. Make *signal* unique per decision (e.g. the candle time and rule that fired).
    """
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise SchemaValidationError(None, "$.prefix", "pattern", f"prefix must be up to 8 letters or digits, got {prefix!r}")
    for name, value in (("strategy", strategy), ("signal", signal), ("symbol", symbol), ("side", side), ("type", type)):
        if not isinstance(value, str) or not value:
            raise SchemaValidationError(None, f"$.{name}", "type", f"{name} must be a non-empty string, got {value!r}")
        if SURROGATE.search(value) is not None:  # not Unicode text: it has no UTF-8 form to hash
            raise SchemaValidationError(None, f"$.{name}", "pattern", f"{name} holds a lone surrogate (not valid Unicode text)")
    amount_text, price_text = _canonical_decimal(amount, "amount"), _canonical_decimal(price, "price")
    parts = (strategy, signal, symbol, side.lower(), type.lower(), amount_text, price_text)
    # Length-prefixed fields: no two different tuples give the same text.
    text = "".join(f"{len(p)}:{p};" for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return prefix + digest[: MAX_ID_LENGTH - len(prefix)]


@dataclass(frozen=True, slots=True)
class OrderIntent:
    """One recorded order. ``state``: ``recorded`` (durable; it may or may not have reached the exchange),
    ``sent`` (the exchange acknowledged it), ``filled``."""

    client_order_id: str
    strategy: str
    signal: str
    symbol: str
    side: str
    type: str
    amount: Decimal
    price: Decimal | None
    state: IntentState
    recorded_at: int
    exchange_order_id: str | None = None

    @classmethod
    def _from_json(cls, cid: str, d: Any) -> OrderIntent:
        """Rebuild a stored intent; one that is not what :meth:`OrderIntents.record` writes (a state file edited by
        hand or by another program) is SchemaValidationError, never a KeyError or decimal error."""
        try:
            if type(d["recorded_at"]) is not int:
                raise TypeError("recorded_at")
            return cls(
                client_order_id=cid,
                strategy=d["strategy"],
                signal=d["signal"],
                symbol=d["symbol"],
                side=d["side"],
                type=d["type"],
                amount=to_decimal(d["amount"], "amount"),
                price=to_decimal(d["price"], "price") if d.get("price") is not None else None,
                state=d["state"],
                recorded_at=d["recorded_at"],
                exchange_order_id=d.get("exchange_order_id"),
            )
        except (KeyError, TypeError, AttributeError, SchemaValidationError) as exc:
            raise SchemaValidationError(
                None,
                f"$.symbol_metadata[{INTENTS_KEY!r}].data.intents[{cid!r}]",
                "type",
                f"stored order intent is not one posstate records ({type(exc).__name__})",
            ) from None


class OrderIntents:
    """Durable order intents in a :class:`PositionStateManager` (see the module docstring).

    Every method that changes an intent is durable when it returns (``manager.save()`` under
    ``durability="snapshot"``; the journal's durabilities make the mutator itself durable). If that write
    fails, the in-memory intents are put back as they were and the error is raised: do not send.

    Typical use::

        cid = make_client_order_id(strategy="grid", signal=f"{candle_ts}:buy1", symbol=s, side="buy",
                                   type="limit", amount=qty, price=px)
        if intents.was_sent(cid):          # recorded before, perhaps by a process that was killed
            confirm_with_exchange(cid)     # e.g. ccxt fetch_order / fetch_open_orders by client id
        else:
            intents.record(strategy="grid", signal=..., symbol=s, side="buy", type="limit", amount=qty, price=px)
            order = exchange.create_order(s, "limit", "buy", qty, px, {"clientOrderId": cid})
            intents.mark_sent(cid, exchange_order_id=order["id"])
    """

    def __init__(self, manager: PositionStateManager, *, clock: Callable[[], float] = time.time) -> None:
        self._manager = manager
        self._clock = clock
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, Any]]:
        data = self._manager.get_symbol_metadata(INTENTS_KEY)
        intents = (data or {}).get("intents", {})
        return intents if isinstance(intents, dict) else {}

    def _store(self, after: dict[str, dict[str, Any]]) -> None:
        m = self._manager
        previous = m.get_symbol_metadata(INTENTS_KEY)
        m.set_symbol_metadata(INTENTS_KEY, {"version": 1, "intents": after})
        try:
            if m.config.durability == "snapshot":
                m.save()
        except BaseException:
            # Not durable: do not let memory claim otherwise.
            if previous is None:
                m.delete_symbol_metadata(INTENTS_KEY)
            else:
                m.set_symbol_metadata(INTENTS_KEY, previous)
            raise

    def record(
        self,
        *,
        strategy: str,
        signal: str,
        symbol: str,
        side: str,
        type: str,
        amount: Decimal | int | str | float,
        price: Decimal | int | str | float | None = None,
        prefix: str = "ps",
    ) -> str:
        """Record the intent durably and return its client order id. Recording again is a no-op."""
        cid = make_client_order_id(
            strategy=strategy, signal=signal, symbol=symbol, side=side, type=type, amount=amount, price=price, prefix=prefix
        )
        with self._lock:
            intents = self._load()
            if cid in intents:
                return cid
            after = dict(intents)
            after[cid] = {
                "strategy": strategy,
                "signal": signal,
                "symbol": symbol,
                "side": side.lower(),
                "type": type.lower(),
                "amount": str(to_decimal(amount, "amount")),
                "price": str(to_decimal(price, "price")) if price is not None else None,
                "state": "recorded",
                "recorded_at": int(self._clock() * 1000),
            }
            self._store(after)
        return cid

    def get(self, client_order_id: str) -> OrderIntent | None:
        with self._lock:
            d = self._load().get(client_order_id)
        return OrderIntent._from_json(client_order_id, d) if d is not None else None

    def was_sent(self, client_order_id: str) -> bool:
        """True once the intent is recorded: from then on the order may have reached the exchange, so the
        bot must not send it as new; it confirms by client id instead (re-sending the same id is refused by
        exchanges that deduplicate client ids)."""
        return self.get(client_order_id) is not None

    def all(self) -> list[OrderIntent]:
        with self._lock:
            intents = self._load()
        found = [OrderIntent._from_json(c, d) for c, d in intents.items()]
        return sorted(found, key=lambda i: (i.recorded_at, i.client_order_id))

    def unconfirmed(self) -> list[OrderIntent]:
        """Intents still ``recorded``: after a restart, confirm each with the exchange."""
        return [i for i in self.all() if i.state == "recorded"]

    def _set_state(self, cid: str, state: IntentState, exchange_order_id: str | None) -> None:
        with self._lock:
            intents = self._load()
            if cid not in intents:
                raise OrderIntentNotFoundError(cid)
            OrderIntent._from_json(cid, intents[cid])  # a stored entry that is not an intent: typed error, not a TypeError
            entry = dict(intents[cid])
            entry["state"] = state
            if exchange_order_id is not None:
                entry["exchange_order_id"] = exchange_order_id
            if entry == intents[cid]:
                return
            after = dict(intents)
            after[cid] = entry
            self._store(after)

    def mark_sent(self, client_order_id: str, *, exchange_order_id: str | None = None) -> None:
        self._set_state(client_order_id, "sent", exchange_order_id)

    def mark_filled(self, client_order_id: str, *, exchange_order_id: str | None = None) -> None:
        self._set_state(client_order_id, "filled", exchange_order_id)

    def forget(self, client_order_id: str) -> bool:
        """Drop an intent (the order was rejected, cancelled or is done with); durable on return."""
        with self._lock:
            intents = self._load()
            if client_order_id not in intents:
                return False
            after = {c: d for c, d in intents.items() if c != client_order_id}
            self._store(after)
            return True
