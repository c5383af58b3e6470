"""One ledger store per manager: a second ``ExchangeAccountStateStore`` on the same manager would write from a
memory that does not hold the first one's orders (and send one of them again), so it is refused until the first
is closed. Kept apart from ledgerbase.py so the rule stays small and visible."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from posstate.core.errors import LedgerOwnershipError
from posstate.manager.manager import PositionStateManager

_OWNERS: weakref.WeakKeyDictionary[PositionStateManager, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def claim(manager: PositionStateManager, store: Any) -> None:
    """Make *store* the ledger store of *manager*; LedgerOwnershipError while another one is open on it."""
    with _LOCK:
        owner = _OWNERS.get(manager)
        if owner is not None and owner is not store and not owner._closed:
            raise LedgerOwnershipError(
                manager.config.state_path,
                "another ExchangeAccountStateStore is open on this manager (one ledger, one writer); use that one, "
                "or close() it before opening another",
            )
        _OWNERS[manager] = store


def release(manager: PositionStateManager, store: Any) -> None:
    """Forget *store* as the ledger store of *manager* (its construction failed)."""
    with _LOCK:
        if _OWNERS.get(manager) is store:
            del _OWNERS[manager]
