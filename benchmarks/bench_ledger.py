"""Benchmark (issue 17): what one order-ledger call costs the bot's thread, per durability.

Run from the repository root::

    python benchmarks/bench_ledger.py                 # 100 orders of 10 fills each, encrypted
    python benchmarks/bench_ledger.py --orders 500    # a bigger ledger (snapshot mode grows with it)

Each order goes through record_order_intent, record_order_sent, record_order_accepted, --fills fills and one
replayed fill (de-duplicated: nothing is written). The table prints the median time of each call per
durability and the size of one order's entry. Nothing here asserts: it prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from posstate import ExchangeAccountStateStore, Fill, PositionStateManager, StateConfig


def run(durability: str, orders: int, fills: int) -> tuple[dict[str, float], int]:
    times: dict[str, list[float]] = {"intent": [], "sent": [], "accepted": [], "fill": [], "replayed fill": []}
    clock = time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StateConfig.in_dir(Path(tmp), durability=durability, backup_interval=1e9)
        with PositionStateManager(cfg, key=b"k" * 32) as m:
            s = ExchangeAccountStateStore(m)
            key = ""
            for i in range(orders):
                t0 = clock()
                key = s.record_order_intent(
                    strategy="bench", signal=str(i), symbol="BTC/USDT:USDT", side="buy", type="limit", amount=fills, price="1"
                ).key
                t1 = clock()
                s.record_order_sent(key)
                t2 = clock()
                s.record_order_accepted(key, exchange_order_id=f"e{i}")
                t3 = clock()
                times["intent"].append(t1 - t0)
                times["sent"].append(t2 - t1)
                times["accepted"].append(t3 - t2)
                for j in range(fills):
                    t0 = clock()
                    s.apply_fill(Fill(trade_id=f"{i}-{j}", order_id=f"e{i}", price=Decimal("1.5"), amount=Decimal(1)))
                    times["fill"].append(clock() - t0)
                t0 = clock()
                s.apply_fill(Fill(trade_id=f"{i}-0", order_id=f"e{i}", price=Decimal("1.5"), amount=Decimal(1)))
                times["replayed fill"].append(clock() - t0)
            size = len(orjson.dumps(m.get_symbol_metadata("__posstate_order__" + key)))
            s.close()
    return {k: statistics.median(v) for k, v in times.items()}, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=100)
    p.add_argument("--fills", type=int, default=10)
    args = p.parse_args()
    names = ["intent", "sent", "accepted", "fill", "replayed fill"]
    print(f"{'durability':<10} " + " ".join(f"{n:>14}" for n in names) + f" {'entry bytes':>12}")
    for durability in ("sync", "group", "snapshot"):
        medians, size = run(durability, args.orders, args.fills)
        print(f"{durability:<10} " + " ".join(f"{medians[n] * 1e3:>11.2f} ms" for n in names) + f" {size:>12}")


if __name__ == "__main__":
    main()
