"""Benchmark (issue 14.3, session 14): what a bot's writer thread waits while another thread calls
``create_backup()`` or ``prune_old_backups()``.

Run from the repository root::

    python benchmarks/bench_explicit.py                      # 100,000 positions, 3 rounds
    python benchmarks/bench_explicit.py --positions 10000    # smaller, faster

A writer thread calls ``set_position`` in a loop ("sync" durability, keys cycling) while the main thread runs
one explicit operation. Each round runs it twice, interleaved: *held*, the way it ran before session 14 (the
calling thread holds the manager's lock across it: ``with m._lock: m.create_backup()`` takes the old path, a
save under the lock), and *outside*, the call as it is now. The prune's rows start from a freshly opened
manager each time with 24 backups no verdict file vouches for (a cold cache: every backup is checked fully).
The table prints, per operation and way, the operation's time and the writer's slowest call and call count
while it ran (medians over the rounds), and the floor: the writer's slowest call over the same number of calls
with no operation running, measured in the same round. Nothing asserts: it prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup.ledger import verdicts_path

KEY = bytes(range(32))
BACKUPS = 24


def _pos(i: int, contracts: int) -> Position:
    return Position(symbol=f"S{i:06d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def _open(d: Path) -> PositionStateManager:
    # Retention keeps every backup (all within keep_within): a prune here only verifies.
    cfg = StateConfig.in_dir(d, durability="sync", backup_interval=1e9, max_backups=100, keep_within=1e9)
    return PositionStateManager(cfg, key=KEY)


class Writer:
    """set_position in a loop on its own thread; the durations of the calls made while a window is open."""

    def __init__(self, m: PositionStateManager, n: int) -> None:
        self._m, self._n = m, n
        self._stop = threading.Event()
        self._target: list[float] | None = None  # the open window's list of durations
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            target = self._target  # a call counts for the window open when it began (or, if none, when it ended)
            t0 = time.perf_counter()
            self._m.set_position(_pos(i % self._n, i % 7 + 1))
            dt = time.perf_counter() - t0
            target = target if target is not None else self._target
            if target is not None:
                target.append(dt)
            i += 1

    @contextlib.contextmanager
    def window(self) -> Iterator[list[float]]:
        calls: list[float] = []
        self._target = calls
        try:
            yield calls
        finally:
            self._target = None

    def floor(self, count: int) -> float:
        """The slowest of *count* calls with nothing else running."""
        with self.window() as calls:
            while len(calls) < count:
                time.sleep(0.005)
        return max(calls[:count])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _plant(m: PositionStateManager) -> None:
    """BACKUPS backups of the current state, as hard links of one (each is checked fully by a cold prune)."""
    first = m.create_backup()
    for k in range(2, BACKUPS + 1):
        os.link(first.path, first.path.with_name(f"{first.path.stem}_{k}.json"))


def _measure(w: Writer, op: Callable[[], object]) -> tuple[float, float, int]:
    with w.window() as calls:
        t0 = time.perf_counter()
        op()
        took = time.perf_counter() - t0
        seen, until = len(calls), time.monotonic() + 5
        while len(calls) == seen and time.monotonic() < until:  # the call the operation held up ends in the window
            time.sleep(0.001)
    return took, max(calls, default=0.0), len(calls)


def run(positions: int, rounds: int, *, freeze: bool = True) -> dict[tuple[str, str], list[tuple[float, float, int, float]]]:
    rows: dict[tuple[str, str], list[tuple[float, float, int, float]]] = {}
    d = Path(tempfile.mkdtemp(prefix="posstate-bench-explicit-"))
    try:
        with _open(d) as m:
            m.batch_save_positions([_pos(i, 1) for i in range(positions)])
            _plant(m)
        for _ in range(rounds):
            for way in ("held", "outside"):
                m = _open(d)
                m.load_positions()
                if freeze:
                    gc.freeze()  # as README, Speed, advises a bot holding a large state (bench_tail does the same)
                w = Writer(m, positions)
                try:
                    ops: list[tuple[str, Callable[[], object]]] = [
                        ("prune_old_backups", m.prune_old_backups),  # first: the cache is cold
                        ("create_backup", m.create_backup),
                    ]
                    for name, call in ops:
                        fn = call if way == "outside" else _held(m, call)
                        took, slowest, count = _measure(w, fn)
                        floor = w.floor(max(count, 50))
                        rows.setdefault((name, way), []).append((took, slowest, count, floor))
                finally:
                    w.stop()
                    m.close()
                    gc.unfreeze()
                for extra in sorted(m.config.backup_path.glob("positions_*.json"))[BACKUPS:]:
                    extra.unlink()  # the next round starts from the same 24 backups
                verdicts_path(m.config).unlink(missing_ok=True)  # a cold cache again
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


def _held(m: PositionStateManager, call: Callable[[], object]) -> Callable[[], object]:
    def held() -> object:
        with m._lock:  # the way before session 14: the manager's lock across the whole call
            return call()

    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-gc-freeze", action="store_true", help="leave gc.freeze() out after each load")
    args = ap.parse_args()
    rows = run(args.positions, args.rounds, freeze=not args.no_gc_freeze)
    print(f"{args.positions:,} positions, sync, {args.rounds} rounds (medians); the writer's slowest call vs its floor")
    print(f"{'operation':<18} {'way':<8} {'op ms':>9} {'writer calls':>12} {'slowest ms':>11} {'floor ms':>9} {'ratio':>7}")
    for (name, way), got in rows.items():
        took = statistics.median(g[0] for g in got) * 1000
        slowest = statistics.median(g[1] for g in got) * 1000
        count = statistics.median(g[2] for g in got)
        floor = statistics.median(g[3] for g in got) * 1000
        print(f"{name:<18} {way:<8} {took:>9.1f} {count:>12.0f} {slowest:>11.2f} {floor:>9.2f} {slowest / floor:>6.1f}x")


if __name__ == "__main__":
    main()
