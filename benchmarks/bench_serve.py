"""The cost of serving (issue 18): the bot's write latency with 0 and with 50 connected stream clients, and
the delivery lag to the clients.

The bot is served by ``serve()``: from a server process of its own (the default, ``--mode process``) or from
background threads of the bot's process (``--mode thread``, ``serve(process=False)``); ``--mode both`` runs both.

* manager -- ``PositionStateManager.set_position`` (``durability="sync"``: one fdatasync per call), served by
  the poll thread (``poll_interval`` 0.05 s by default);
* store   -- ``AccountStateStore.set_active_position`` (memory only, microseconds), whose feed puts each
  update on the server's one subscription from the writer's thread (the poll thread drains it).

The disk's ``fdatasync`` changes phase within seconds and the machine's load changes with it, so the two rows
compared are never measured one after the other in long runs. Two ways, both by default (``--how``):

* blocks -- one bot, one server: ROUNDS rounds (``--rounds``, 10) of a block of writes with 0 clients and a
  block with N clients (default 50; which block goes first alternates), CALLS writes per row in all. This
  counts everything serving costs the bot, the load the clients and the server put on the machine included;
* paired -- two bots in one process, each served, N clients on one of them, their writes alternating call by
  call: both see the same instant of the disk and the machine, so only what serving costs inside the bot
  differs (its feeder thread, the frames it sends).

Each write is a different symbol (cycling over 500), RATE writes a second (``--rate``; a bot writes at the
exchange's pace). The clients live in another process (as dashboards do) and note when each
``position.update`` arrives (in a ``batch`` message: one per poll); the lag is that time minus the moment the
write returned (both ``time.time()`` on this machine). A polled source coalesces changes between two polls, so
the manager's clients may see fewer updates than were made (counted as ``seen``).

Prints median and p99 (ms) of each, and the issue's target: with N clients within 5% of 0 clients at the
median and p99 (``met`` or ``MISSED``; this script never fails).

Run: ``PYTHONPATH=. python benchmarks/bench_serve.py`` (``--quick``: 500 writes per row).
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

from runqueue import RunQueue, queued_report

from posstate import AccountStateStore, Position, PositionStateManager, StateConfig
from posstate.core import priority

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


#: ``nice`` of the clients' process (``--clients-nice``): 0 counts their processor time against the bot like
#: any process on its machine; 19 stands for dashboards on other machines (their CPU not the bot's).
CLIENTS_NICE = 0


def start_clients(url: str, n: int, last: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--client", url, str(n), str(last), str(CLIENTS_NICE)],
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


def run_writes(
    write: Callable[[Position], object], calls: int, offset: int, queued: list[float] | None = None
) -> tuple[list[float], dict[int, float]]:
    """*calls* writes at RATE a second: their latencies (ms) and when each returned; the run-queue wait of
    each is added to *queued* (the reads of it are outside the timed call)."""
    took: list[float] = []
    rq = RunQueue()
    done: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(offset, offset + calls):
        if RATE:
            wait = start + (i - offset) / RATE - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        p = position(i)
        q0 = rq()
        t0 = time.perf_counter()
        write(p)
        took.append((time.perf_counter() - t0) * 1000)
        if queued is not None:
            queued.append(rq() - q0)
        done[i + 1] = time.time()
    rq.close()
    return took, done


def _make_bot(bot: str, root: Path) -> tuple[Any, Callable[[Position], object], Callable[[], None]]:
    """A bot of *bot*'s kind holding SYMBOLS positions: (what serves, its write, its close)."""
    if bot == "manager":
        m = PositionStateManager(StateConfig.in_dir(root, durability="sync"), key=KEY)
        m.save_positions([position(i) for i in range(SYMBOLS)])
        return m, m.set_position, m.close
    store = AccountStateStore()
    for i in range(SYMBOLS):
        store.set_active_position(position(i))
    return store, store.set_active_position, lambda: None


def _stream_url(server: Any) -> str:
    return str(server.url).replace("http://", "ws://") + "/api/account/stream"


def _collect(proc: subprocess.Popen[str], done: dict[int, float], out: dict[str, Any]) -> None:
    """Wait for the clients' process and add its lags and counts to *out*."""
    assert proc.stdout is not None
    seen = json.loads(proc.stdout.read())
    proc.wait()
    out["lag"] += [(t - done[c]) * 1000 for per in seen for c, t in per if c in done]
    out["_seen"].append(statistics.mean(len(per) for per in seen) if seen else 0)


def scenario(bot: str, per: int, rounds: int, clients: int, root: Path, poll: float, process: bool = True) -> dict[str, Any]:
    """One bot and one server; ROUNDS rounds of a block of *per* writes with 0 clients and a block with *clients*
    clients (which goes first alternates), so the disk's phases and the machine's load fall on both alike."""
    target, write, close = _make_bot(bot, root / "state")
    zero, loaded = "0 clients", f"{clients} clients"
    out: dict[str, Any] = {"no server": [], zero: [], loaded: [], "lag": [], "_seen": [], "rounds": []}
    out["queued"] = {zero: [], loaded: []}
    offset = SYMBOLS
    try:
        run_writes(write, min(per, 100), offset)  # warm up
        offset += 100
        out["no server"], _ = run_writes(write, per, offset)
        offset += per
        with target.serve(port=0, poll_interval=poll, stream=_stream_options(), process=process) as server:
            for r in range(rounds):
                this: dict[str, list[float]] = {}
                for row in (zero, loaded) if r % 2 == 0 else (loaded, zero):
                    proc = start_clients(_stream_url(server), clients, offset + per) if row == loaded else None
                    took, done = run_writes(write, per, offset, out["queued"][row])
                    offset += per
                    this[row] = took
                    out[row] += took
                    if proc is not None:
                        _collect(proc, done, out)
                med = statistics.median(this[loaded]) / statistics.median(this[zero])
                out["rounds"].append((med, pct(this[loaded], 0.99) / pct(this[zero], 0.99)))
    finally:
        close()
    out["seen"] = statistics.mean(out.pop("_seen"))
    return out


def paired(bot: str, calls: int, clients: int, root: Path, poll: float, process: bool = True) -> dict[str, Any]:
    """Two bots in this process, each served: one with *clients* clients, one with none; their writes alternate
    call by call (which goes first alternates too), so both see the same instant of the disk and the machine.
    What differs is only what serving the clients costs inside the bot (its feeder thread, the frames it sends);
    the load the clients and the server put on the machine falls on both alike (``scenario`` measures that)."""
    a, write_a, close_a = _make_bot(bot, root / "a")
    b, write_b, close_b = _make_bot(bot, root / "b")
    zero, loaded = "0 clients", f"{clients} clients"
    out: dict[str, Any] = {zero: [], loaded: [], "lag": [], "_seen": [], "queued": {zero: [], loaded: []}}
    rq = RunQueue()
    offset = SYMBOLS + 100
    try:
        run_writes(write_a, 100, SYMBOLS)
        run_writes(write_b, 100, SYMBOLS)
        opts = {"port": 0, "poll_interval": poll, "stream": _stream_options(), "process": process}
        with a.serve(**opts) as server_a, b.serve(**opts):
            proc = start_clients(_stream_url(server_a), clients, offset + calls)
            done: dict[int, float] = {}
            start = time.perf_counter()
            clock = time.perf_counter
            for j, i in enumerate(range(offset, offset + calls)):
                if RATE:
                    wait = start + j / RATE - clock()
                    if wait > 0:
                        time.sleep(wait)
                p = position(i)
                for w, row in ((write_a, loaded), (write_b, zero)) if j % 2 == 0 else ((write_b, zero), (write_a, loaded)):
                    q0 = rq()
                    t0 = clock()
                    w(p)
                    out[row].append((clock() - t0) * 1000)
                    out["queued"][row].append(rq() - q0)
                    if row == loaded:
                        done[i + 1] = time.time()
            _collect(proc, done, out)
    finally:
        close_a()
        close_b()
        rq.close()
    out["seen"] = statistics.mean(out.pop("_seen"))
    out["no server"] = []
    return out


def _stream_options() -> Any:
    from posstate import StreamOptions

    return StreamOptions(queue_size=4096)


def report(title: str, res: dict[str, Any], clients: int, calls: int) -> None:
    print(f"\n{title}: write latency (ms)")
    print(f"  {'':<12} {'median':>9} {'p99':>9}")
    for row in ("no server", "0 clients", f"{clients} clients"):
        if res[row]:
            print(f"  {row:<12} {statistics.median(res[row]):>9.4f} {pct(res[row], 0.99):>9.4f}")
    for row, queued in res["queued"].items():
        print(f"  {row:<12} {queued_report(res[row], queued)}")
    base, loaded = res["0 clients"], res[f"{clients} clients"]
    for q, name in ((0.5, "median"), (0.99, "p99")):
        a, b = (statistics.median(base), statistics.median(loaded)) if q == 0.5 else (pct(base, q), pct(loaded, q))
        verdict = "met" if b <= a * 1.05 else "MISSED"
        print(f"  target {name}: {clients} clients within 5% of 0 clients: {b / a:.3f}x {verdict}")
    if res.get("rounds"):
        meds, p99s = zip(*res["rounds"], strict=True)
        print(
            f"  per round, {clients} vs 0 clients: median "
            + " ".join(f"{r:.2f}x" for r in meds)
            + f" (median {statistics.median(meds):.3f}x); p99 "
            + " ".join(f"{r:.2f}x" for r in p99s)
            + f" (median {statistics.median(p99s):.3f}x)"
        )
    lag = res["lag"]
    print(
        f"  delivery lag (ms): median {statistics.median(lag):.2f}, p99 {pct(lag, 0.99):.2f}, max {max(lag):.2f}; "
        f"updates seen per client {res['seen']:.0f} of {calls}"
    )


def main(argv: list[str] | None = None) -> int:
    global RATE, CLIENTS_NICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="writes per row")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--poll", type=float, default=0.05, help="poll_interval of the server (seconds)")
    ap.add_argument("--rate", type=float, default=RATE, help="writes per second (0: as fast as possible)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bot", choices=["manager", "store", "both"], default="both")
    ap.add_argument("--mode", choices=["process", "thread", "both"], default="process", help="where the server runs")
    ap.add_argument("--rounds", type=int, default=10, help="blocks of 0 and of N clients, alternating")
    ap.add_argument("--how", choices=["blocks", "paired", "both"], default="both", help="blocks, paired call by call, or both")
    ap.add_argument(
        "--clients-nice", type=int, default=0, help="clients' nice, and the shortest slice when above 0 (19: as if elsewhere)"
    )
    args = ap.parse_args(argv)
    RATE = args.rate
    CLIENTS_NICE = args.clients_nice
    calls = 500 if args.quick else args.calls
    pace = f"{RATE:g} writes/s" if RATE else "as fast as possible"
    modes = ("thread", "process") if args.mode == "both" else (args.mode,)
    rounds = max(1, args.rounds)
    per = max(1, calls // rounds)
    print(
        f"{calls} writes per row ({pace}), {args.clients} stream clients in another process, poll_interval {args.poll} s, "
        f"server: {' and '.join(modes)}, clients at nice {CLIENTS_NICE}"
    )
    where = {"process": "in a child process", "thread": "in threads of the bot"}
    for bot in ("manager", "store") if args.bot == "both" else (args.bot,):
        for mode in modes:
            if args.how in ("blocks", "both"):
                with tempfile.TemporaryDirectory(dir=os.environ.get("POSSTATE_BENCH_DIR")) as d:
                    res = scenario(bot, per, rounds, args.clients, Path(d), args.poll, process=mode == "process")
                report(f"{bot}, server {where[mode]}, {rounds} alternating blocks of {per} writes", res, args.clients, per)
            if args.how in ("paired", "both"):
                with tempfile.TemporaryDirectory(dir=os.environ.get("POSSTATE_BENCH_DIR")) as d:
                    res = paired(bot, calls, args.clients, Path(d), args.poll, process=mode == "process")
                report(f"{bot}, server {where[mode]}, two bots paired call by call", res, args.clients, calls)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        if int(sys.argv[5]):
            priority.lower(int(sys.argv[5]))  # the nice value and the shortest scheduler slice
        asyncio.run(_clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(main())
