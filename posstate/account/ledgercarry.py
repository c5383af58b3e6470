"""Orders kept across a reload: a restore of an older backup, a recovery or a repair under a live
:class:`~posstate.ExchangeAccountStateStore` must not take back an order the store held, since the exchange does
not roll back, and an order forgotten this way would be sent again when its decision is recorded anew.

The store remembers its orders when the manager announces the reload (``remember``), writes those the reloaded
state lacks or holds at an older version at once, inside the reload (``carry_now``: a kill before the bot's next
call loses none), and again at its next ledger call if that failed (``carry_forward``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from posstate.account import ledgerformat
from posstate.core.errors import PosStateError

if TYPE_CHECKING:
    from posstate.account.ledgerbase import LedgerCore

log = logging.getLogger("posstate")


def remember(store: LedgerCore) -> None:
    """Keep the orders *store* holds now. Runs under the manager's lock, without the ledger lock: one dict copy,
    which the GIL makes atomic."""
    held = dict(store._orders)
    entries = {ledgerformat.order_entry_name(k): ledgerformat.order_entry(i["order"], i["events"]) for k, i in held.items()}
    if store._forgotten:
        entries[ledgerformat.FORGOTTEN] = {"format": ledgerformat.LEDGER_FORMAT, "orders": dict(store._forgotten)}
    store._carry = {**store._carry, **entries}  # rebound, never changed in place: the bot's thread may be reading it


def carry_now(store: LedgerCore) -> None:
    """Write the remembered orders the reloaded state lacks, inside the reload (the manager's lock is held by this
    thread; no store lock is taken). A failure leaves them to :func:`carry_forward`."""
    m = store._manager
    try:
        entries = {n: d for n, d in m.get_all_symbol_metadata().items() if ledgerformat.is_ledger_entry(n)}
        keep = ledgerformat.carry_orders(store._carry, entries)
        if keep:
            with m.transaction():
                for name, entry in keep.items():
                    m.set_symbol_metadata(name, entry)
            if m.config.durability == "snapshot":
                m.save()
    except Exception:  # retried by carry_forward() at the next ledger call
        log.exception("could not write back the orders the reloaded state lacks (will retry)")


def carry_forward(store: LedgerCore) -> None:
    """At the first ledger call after a reload: write back (once more if carry_now failed) the remembered orders
    the state lacks or holds older, and take them into memory. Memory holds them even if the write fails (then
    ``ledger`` blocks readiness and the next ledger call retries). Caller holds the ledger lock."""
    entries = {n: d for n, d in store._manager.get_all_symbol_metadata().items() if ledgerformat.is_ledger_entry(n)}
    keep = ledgerformat.carry_orders(store._carry, entries)
    if not keep:
        store._carry = {}
        store._blocked.pop("ledger", None)
        return
    forgotten = keep.pop(ledgerformat.FORGOTTEN, None)
    orders = {e["order"]["key"]: {"order": e["order"], "events": e["events"]} for e in keep.values()}
    store._orders.update(orders)
    try:
        store._write_ledger(orders=orders, forgotten=forgotten["orders"] if forgotten else None)
    except PosStateError as exc:
        store._blocked["ledger"] = "restored_from_backup"
        log.warning("could not write back %d orders the reloaded state lacks (will retry): %s", len(orders), exc)
        return
    store._carry = {}
    store._blocked.pop("ledger", None)
    log.warning("kept %d orders the reloaded state lacked or held older: %s", len(orders), ", ".join(sorted(orders)))
