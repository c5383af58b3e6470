"""The order ledger on the command line: ``posstate history --orders [--id ID]`` and the ``ledger`` check of
``posstate validate`` (the invariants a bot's store checks at load, read-only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from posstate.account import ledgerformat
from posstate.cli.base import EXIT_INVALID, CliError, json_out
from posstate.cli.options import Env
from posstate.cli.render import table
from posstate.core.errors import PosStateError
from posstate.model.document import StateData
from posstate.storage.validate import Check

if TYPE_CHECKING:
    from posstate.manager.manager import PositionStateManager

_SHOWN = ("type", "status", "reason", "exchange_order_id", "exchange_filled")


def ledger_entries(state: StateData) -> dict[str, Any]:
    return {n: d for n, d in state.metadata.items() if ledgerformat.is_ledger_entry(n)}


def ledger_check(state: StateData) -> tuple[Check | None, list[dict[str, str]]]:
    """The ``ledger`` line of ``validate``: every invariant, each violation listed (never repaired). None for a
    state without a ledger (no line, as before the ledger existed)."""
    entries = ledger_entries(state)
    if not entries:
        return None, []
    violations = ledgerformat.check(entries, state.positions)
    orders = sum(1 for n in entries if n.startswith(ledgerformat.ORDER_PREFIX))
    if not violations:
        return Check("ledger", True, f"{orders} order{'s' if orders != 1 else ''}, invariants hold"), []
    first = violations[0]
    detail = f"{len(violations)} invariant violation(s); first: {first.code} {first.subject}: {first.detail}"
    return Check("ledger", False, detail), [v.to_dict() for v in violations]


def _detail(event: dict[str, Any]) -> str:
    if "fill" in event:
        f = event["fill"]
        return f"trade {f['trade_id']}: {f['amount']} @ {f['price']} fee {f['fee']} {f.get('fee_currency') or ''}".rstrip()
    if event["type"] in ("order_placed", "order_adopted"):
        o = event["order"]
        price = f" @ {o['price']}" if o.get("price") is not None else ""
        return f"{o['side']} {o['amount']} {o['symbol']} {o['type']}{price} ({o['position_side']}, epoch {o['epoch']})"
    if event["type"] == "order_fills_folded":
        return f"{event['count']} older fills: {event['amount']} for {event['cost']}"
    return ", ".join(f"{k}={event[k]}" for k in _SHOWN if event.get(k) is not None and k != "type")


def print_order_history(env: Env, state: StateData, *, path: Path, order_id: str | None) -> None:
    """Every order event of the state (or of one order), oldest first per order."""
    events = ledgerformat.order_history(ledger_entries(state), order_id)
    if order_id is not None and not events:
        raise CliError(
            f"{path}: no order {order_id!r} in the ledger (key, client order id or exchange id); "
            "list every order with `posstate history --orders`",
            code=1,
        )
    if env.json:
        json_out(events)
        return
    if not events:
        click.echo(f"{path}: no orders in the ledger")
        return
    rows = [[e["order_key"], str(e["v"]), str(e["at"]), e["type"], _detail(e)] for e in events]
    click.echo(f"{path}: {len(events)} order event{'s' if len(events) != 1 else ''}")
    for line in table(("order", "v", "at (ms)", "event", "detail"), rows, right=frozenset({1})):
        click.echo(line)


def keep_newer_orders(m: PositionStateManager, before: dict[str, Any]) -> list[str]:
    """Write back the order-ledger entries the restored backup lacks or holds older (one save); their keys."""
    keep = ledgerformat.carry_orders(before, m.get_all_symbol_metadata())
    if not keep:
        return []
    keys = sorted(e["order"]["key"] for n, e in keep.items() if n != ledgerformat.FORGOTTEN)
    try:
        with m.transaction():
            for name, entry in keep.items():
                m.set_symbol_metadata(name, entry)
        m.save()
    except PosStateError as exc:
        raise CliError(
            f"{exc}; the backup was restored but {len(keys)} ledger orders newer than it ({', '.join(keys)}) could not "
            "be written back: do not start the bot; fix the disk and restore the pre-restore backup",
            code=EXIT_INVALID,
        ) from exc
    return keys
