"""The machinery of :class:`~posstate.account.store.AccountStateStore`: the snapshot swap (copy-on-write,
one lock for writers), the update feed, store events and the pending-persist counter. The store's parts
(orders, metadata, positions and balances) build on :class:`StoreCore`.
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
from posstate.account.types import EMPTY, AccountSnapshot, AccountUpdate, PersistTicket, is_reserved, thaw_json
from posstate.core.errors import InvalidArgumentError, SchemaValidationError

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


class StoreCore:
    """Snapshot, lock, feed, events and pending persist of an account store (see posstate/account/store.py)."""

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
            known = ", ".join(sorted(STORE_EVENTS))
            raise InvalidArgumentError(f"unknown store event {event!r}", next_step=f"use one of: {known}")
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
