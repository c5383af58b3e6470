"""ExchangeAccountStateStore: accountstate 1.0's exchange account store, durable.

accountstate's ``ExchangeAccountStateStore`` is a pure in-memory reducer: provisional submissions,
per-subject confidence that starts ``unknown``, invariants, position lifecycle epochs; it persists nothing and
tells the bot to record an intent before submitting. This store keeps the same rules and writes everything the
exchange cannot give back into the state file through a :class:`~posstate.PositionStateManager`: the order
lifecycle (intents, submission outcomes, unknown outcomes), fills (de-duplicated by trade id), the event
history, position epochs and balances. Each change is one journal record, durable when the call returns.

After any start, restore or recovery nothing is trusted: :meth:`ready_to_trade` stays False until positions
(:meth:`set_positions`), open orders (:meth:`set_open_orders`) and balances (:meth:`set_balances`) were
reconciled with the exchange and no submission's outcome is unknown. See docs/ACCOUNT.md, "Order ledger".
"""

from __future__ import annotations

from posstate.account.ingest import AccountIngest


class ExchangeAccountStateStore(AccountIngest):
    """A :class:`~posstate.PersistedAccountStateStore` with the durable order ledger, epochs, balances and
    readiness. ``ExchangeAccountStateStore(manager, *, write_through=True, persist_interval=None, clock=time.time)``."""
