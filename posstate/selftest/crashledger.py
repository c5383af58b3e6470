"""The process the order-ledger crash tests kill: it walks one order's life, step by step, and reports each step
it was told is durable (issue 17).

Run as ``python -m posstate.selftest.crashledger DIR [--durability D] [--crash-step S --crash-at K --crash-when
before|after]``. Before step *n* it prints ``pending n``, after the call returns ``ack n`` (flushed lines). With
``--crash-at`` it counts the mutating file operations of step *S* only (:class:`HarnessOps`) and SIGKILLs itself
before or after the *K*-th, so the parent can kill it at every operation of every step; it exits 0 when step
*S* has fewer operations. The parent then opens a new store and compares :func:`observe` with
:func:`expected` for the last acknowledged step or the step in flight.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posstate.account.exchange import ExchangeAccountStateStore
from posstate.core.config import StateConfig
from posstate.manager.manager import PositionStateManager
from posstate.selftest.harness import MUTATING, Action, Fault, HarnessOps
from posstate.storage import fileops as _fileops

BTC = "BTC/USDT:USDT"
#: Two binance-shaped ccxt trades of the entry order (tests/data/ccxt_ledger.json holds the full payloads).
TRADES: list[dict[str, Any]] = [
    {
        "id": "698759",
        "order": "4101559840",
        "symbol": BTC,
        "side": "buy",
        "price": 91000.0,
        "amount": 0.004,
        "fee": {"cost": 0.1456, "currency": "USDT"},
        "timestamp": 1763700001000,
    },
    {
        "id": "698760",
        "order": "4101559840",
        "symbol": BTC,
        "side": "buy",
        "price": 90990.1,
        "amount": 0.006,
        "fee": {"cost": 0.21837624, "currency": "USDT"},
        "timestamp": 1763700002000,
    },
]
BALANCE: dict[str, Any] = {
    "USDT": {"free": 908.9, "used": 91.1, "total": 1000.0},
    "BNB": {"free": 0.5, "used": 0.0, "total": 0.5},
}


def config(state_dir: str | Path, durability: str) -> StateConfig:
    return StateConfig.in_dir(state_dir, encryption=False, backup_interval=1e9, durability=durability)


class _Clock:
    def __init__(self) -> None:
        self.t = 1_763_700_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def _entry(s: ExchangeAccountStateStore) -> str:
    return s.record_order_intent(
        strategy="crash", signal="entry", symbol=BTC, side="buy", type="limit", amount="0.010", price="91000"
    ).key


def _close(s: ExchangeAccountStateStore) -> str:
    return s.record_order_intent(
        strategy="crash", signal="tp", symbol=BTC, side="sell", type="limit", amount="0.010", price="95000", reduce_only=True
    ).key


def steps(
    trades: list[dict[str, Any]], balance: dict[str, Any]
) -> list[tuple[str, Callable[[ExchangeAccountStateStore], object]]]:
    """One order's life and its closing order's, in the order a bot makes the calls."""
    return [
        ("intent", _entry),
        ("sent", lambda s: s.record_order_sent(_entry(s))),
        ("accepted", lambda s: s.record_order_accepted(_entry(s), exchange_order_id="4101559840")),
        ("fill 1", lambda s: s.apply_fill(trades[0])),
        ("fill 1 replayed", lambda s: s.apply_fill(trades[0])),
        ("fill 2", lambda s: s.apply_fill(trades[1])),
        ("close intent", _close),
        ("close sent", lambda s: s.record_order_sent(_close(s))),
        ("close filled", lambda s: s.apply_fill({"id": "c1", "clientOrderId": _close(s), "price": 95000, "amount": 0.01})),
        ("balances", lambda s: s.set_balances(balance)),
    ]


#: What the store holds after each step (before any: nothing): entry status, close status, long contracts,
#: lifecycle (epoch, state), fills of the entry order, balances.
_EXPECTED: list[dict[str, Any]] = [
    {"entry": None, "close": None, "contracts": None, "life": (0, "closed"), "fills": 0, "balances": []},
    {"entry": "recorded", "close": None, "contracts": None, "life": (0, "closed"), "fills": 0, "balances": []},
    {"entry": "sent", "close": None, "contracts": None, "life": (0, "closed"), "fills": 0, "balances": []},
    {"entry": "accepted", "close": None, "contracts": None, "life": (0, "closed"), "fills": 0, "balances": []},
    {"entry": "partially_filled", "close": None, "contracts": "0.004", "life": (1, "open"), "fills": 1, "balances": []},
    {"entry": "partially_filled", "close": None, "contracts": "0.004", "life": (1, "open"), "fills": 1, "balances": []},
    {"entry": "filled", "close": None, "contracts": "0.010", "life": (1, "open"), "fills": 2, "balances": []},
    {"entry": "filled", "close": "recorded", "contracts": "0.010", "life": (1, "open"), "fills": 2, "balances": []},
    {"entry": "filled", "close": "sent", "contracts": "0.010", "life": (1, "closing"), "fills": 2, "balances": []},
    {"entry": "filled", "close": "filled", "contracts": None, "life": (1, "closed"), "fills": 2, "balances": []},
    {"entry": "filled", "close": "filled", "contracts": None, "life": (1, "closed"), "fills": 2, "balances": ["BNB", "USDT"]},
]


def expected(step: int) -> dict[str, Any]:
    """What a restarted store shows after *step* steps were durable: a ``sent`` order is ``unknown`` by then."""
    want = dict(_EXPECTED[step])
    for k in ("entry", "close"):
        if want[k] == "sent":
            want[k] = "unknown"
    return want


def observe(s: ExchangeAccountStateStore) -> dict[str, Any]:
    """The same fields, read from a store (the parent's view after the kill)."""
    by_signal = {o.signal: o for o in s.get_ledger_orders()}
    entry, close = by_signal.get("entry"), by_signal.get("tp")
    p = s.get_active_position(BTC, "long")
    life = s.position_lifecycle(BTC, "long")
    return {
        "entry": entry.status if entry else None,
        "close": close.status if close else None,
        "contracts": str(p.contracts) if p is not None else None,
        "life": (life["epoch"], life["state"]),
        "fills": entry.fill_count if entry else 0,
        "balances": sorted(s.get_balances()),
    }


def _run(args: argparse.Namespace) -> int:
    plan = steps(TRADES, BALANCE)
    ops: HarnessOps | None = None
    if args.crash_at:
        action: Action = "crash_after" if args.crash_when == "after" else "crash_before"
        ops = HarnessOps(fault=Fault(at=args.crash_at, action=action, ops=MUTATING), counting=False)
    out = sys.stdout
    with PositionStateManager(config(args.dir, args.durability)) as m:
        store = ExchangeAccountStateStore(m, clock=_Clock())
        for n, (name, call) in enumerate(plan, start=1):
            out.write(f"pending {n} {name}\n")
            out.flush()
            if ops is not None and n == args.crash_step:
                ops.counting = True
                with _fileops.use(ops):
                    call(store)
                ops.counting = False
            else:
                call(store)
            out.write(f"ack {n} {name}\n")
            out.flush()
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m posstate.selftest.crashledger")
    p.add_argument("dir")
    p.add_argument("--durability", default="sync")
    p.add_argument("--crash-step", type=int, default=0)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--crash-when", choices=("before", "after"), default="before")
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
