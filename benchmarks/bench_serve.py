"""The cost of serving (issue 18): the bot's write latency with 0 and with 50 connected stream clients, and
the delivery lag to the clients.

Two bots, each served by ``serve()``: from a server process of its own (the default, ``--mode process``) or
from background threads of the bot's process (``--mode thread``, ``serve(process=False)``); ``--mode both``
interleaves the two in one run (ROUNDS rounds, each running both modes one after the other, CALLS/ROUNDS
writes per row each time) so a busy machine affects both alike:

* manager -- ``PositionStateManager.set_position`` (``durability="sync"``: one fdatasync per call), served by
  the poll thread (``poll_interval`` 0.05 s by default);
* store   -- ``AccountStateStore.set_active_position`` (memory only, microseconds), whose feed puts each
  update on the server's one subscription from the writer's thread (the poll thread drains it).

Each runs CALLS writes (a different symbol each time, cycling over 500) three ways: no server, a server with
0 clients, a server with N clients (default 50). The clients live in another process (as dashboards do) and
note when each ``position.update`` arrives (in a ``batch`` message: one per poll); the lag is that time
minus the moment the write returned (both ``time.time()`` on this machine). A polled source coalesces
changes between two polls, so the manager's clients may see fewer updates than were made (counted as
``seen``).

Prints median and p99 (ms) of each, and the issue's target: with N clients within 5% of 0 clients at the
median and p99 (``met`` or ``MISSED``; this script never fails).

Run: ``PYTHONPATH=. python benchmarks/bench_serve.py`` (``--quick``: 500 calls; ``--mode both``: compare).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate import AccountStateStore, Position, PositionStateManager, StateConfig

KEY = bytes(range(32))
SYMBOLS = 500


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def position(i: int) -> Position:
    return Position(symbol=f"S{i % SYMBOLS:03d}/USDT", side="long", contracts=Decimal(i + 1), entry_price=Decimal(100))


# ------------------------------------------------------------------------------------------ clients
async def _clients(url: str, n: int, last: int) -> None:
    from websockets.asyncio.client import connect

    seen: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    conns = [await connect(url, max_queue=None) for _ in range(n)]
    for ws in conns:
        await ws.recv()  # the snapshot
    print("ready", flush=True)

    async def one(k: int) -> None:
        ws = conns[k]
        while True:
            msg = json.loads(await ws.recv())
            if msg["topic"] == "batch":
                now = time.time()
                for m in msg["messages"]:
                    if m["topic"] == "position.update" and m["position"]:
                        c = int(m["position"]["contracts"])
                        seen[k].append((c, now))
                        if c == last:
                            return
            elif msg["topic"] == "heartbeat":
                await ws.send('{"type":"heartbeat"}')
            elif msg["topic"] == "resync":
                return

    await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(n))), 600)
    for ws in conns:
        await ws.close()
    print(json.dumps(seen), flush=True)


def start_clients(url: str, n: int, last: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--client", url, str(n), str(last)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


# ------------------------------------------------------------------------------------------ bots
#: Writes per second (0: as fast as the writer goes). A bot writes at the exchange's pace, not in a loop.
RATE = 200.0


def run_writes(write: Callable[[Position], object], calls: int, offset: int) -> tuple[list[float], dict[int, float]]:
    took: list[float] = []
    done: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(offset, offset + calls):
        if RATE:
            wait = start + (i - offset) / RATE - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        p = position(i)
        t0 = time.perf_counter()
        write(p)
        took.append((time.perf_counter() - t0) * 1000)
        done[i + 1] = time.time()
    return took, done


def scenario(bot: str, calls: int, clients: int, root: Path, poll: float, process: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if bot == "manager":
        m = PositionStateManager(StateConfig.in_dir(root / "state", durability="sync"), key=KEY)
        m.save_positions([position(i) for i in range(SYMBOLS)])
        target: Any = m
        write: Callable[[Position], object] = m.set_position
    else:
        store = AccountStateStore()
        for i in range(SYMBOLS):
            store.set_active_position(position(i))
        target, write = store, store.set_active_position
    offset = SYMBOLS
    try:
        run_writes(write, min(calls, 100), offset)  # warm up
        offset += 100
        out["no server"], _ = run_writes(write, calls, offset)
        offset += calls
        with target.serve(port=0, poll_interval=poll, stream=_stream_options(), process=process) as server:
            out["0 clients"], _ = run_writes(write, calls, offset)
            offset += calls
            url = server.url.replace("http://", "ws://") + "/api/account/stream"
            proc = start_clients(url, clients, offset + calls)
            took, done = run_writes(write, calls, offset)
            out[f"{clients} clients"] = took
            assert proc.stdout is not None
            seen = json.loads(proc.stdout.read())
            proc.wait()
        lags = [(t - done[c]) * 1000 for per in seen for c, t in per if c in done]
        out["lag"] = lags
        out["seen"] = statistics.mean(len(per) for per in seen) if seen else 0
    finally:
        if bot == "manager":
            m.close()
    return out


def _stream_options() -> Any:
    from posstate import StreamOptions

    return StreamOptions(queue_size=4096)


def report(bot: str, res: dict[str, Any], clients: int, calls: int) -> None:
    print(f"\n{bot}: write latency (ms)")
    print(f"  {'':<12} {'median':>9} {'p99':>9}")
    for row in ("no server", "0 clients", f"{clients} clients"):
        print(f"  {row:<12} {statistics.median(res[row]):>9.4f} {pct(res[row], 0.99):>9.4f}")
    base, loaded = res["0 clients"], res[f"{clients} clients"]
    for q, name in ((0.5, "median"), (0.99, "p99")):
        a, b = (statistics.median(base), statistics.median(loaded)) if q == 0.5 else (pct(base, q), pct(loaded, q))
        verdict = "met" if b <= a * 1.05 else "MISSED"
        print(f"  target {name}: {clients} clients within 5% of 0 clients: {b / a:.3f}x {verdict}")
    lag = res["lag"]
    print(
        f"  delivery lag (ms): median {statistics.median(lag):.2f}, p99 {pct(lag, 0.99):.2f}, max {max(lag):.2f}; "
        f"updates seen per client {res['seen']:.0f} of {calls}"
    )


def main(argv: list[str] | None = None) -> int:
    global RATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--poll", type=float, default=0.05, help="poll_interval of the server (seconds)")
    ap.add_argument("--rate", type=float, default=RATE, help="writes per second (0: as fast as possible)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bot", choices=["manager", "store", "both"], default="both")
    ap.add_argument("--mode", choices=["process", "thread", "both"], default="process", help="where the server runs")
    ap.add_argument("--rounds", type=int, default=2, help="with --mode both: rounds, each running both modes")
    args = ap.parse_args(argv)
    RATE = args.rate
    calls = 500 if args.quick else args.calls
    pace = f"{RATE:g} writes/s" if RATE else "as fast as possible"
    modes = ("thread", "process") if args.mode == "both" else (args.mode,)
    rounds = max(1, args.rounds) if args.mode == "both" else 1
    per = max(1, calls // rounds)
    print(
        f"{calls} writes per row ({pace}), {args.clients} stream clients in another process, poll_interval {args.poll} s, "
        f"server: {' and '.join(modes)}" + (f" (interleaved: {rounds} rounds of {per} writes per row)" if rounds > 1 else "")
    )
    for bot in ("manager", "store") if args.bot == "both" else (args.bot,):
        merged: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
        ratios: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                with tempfile.TemporaryDirectory(dir=os.environ.get("POSSTATE_BENCH_DIR")) as d:
                    res = scenario(bot, per, args.clients, Path(d), args.poll, process=mode == "process")
                base, loaded = res["0 clients"], res[f"{args.clients} clients"]
                ratios[mode].append((statistics.median(loaded) / statistics.median(base), pct(loaded, 0.99) / pct(base, 0.99)))
                into = merged[mode]
                for k, v in res.items():
                    if isinstance(v, list):
                        into.setdefault(k, []).extend(v)
                    else:
                        into.setdefault("_seen", []).append(v)
        for mode in modes:
            res = merged[mode]
            res["seen"] = statistics.mean(res.pop("_seen"))
            report(
                f"{bot}, server {'in a child process' if mode == 'process' else 'in threads of the bot'}", res, args.clients, per
            )
            if rounds > 1:
                meds, p99s = zip(*ratios[mode], strict=True)
                print(
                    f"  per round, {args.clients} vs 0 clients: median "
                    + " ".join(f"{r:.2f}x" for r in meds)
                    + f" (median {statistics.median(meds):.3f}x); p99 "
                    + " ".join(f"{r:.2f}x" for r in p99s)
                    + f" (median {statistics.median(p99s):.3f}x)"
                )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(_clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(main())
