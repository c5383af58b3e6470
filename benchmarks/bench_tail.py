"""The tail of ``set_position``: does any call pay for a compaction, a backup or pruning? (issue 14)

For states of 1,000 and 100,000 positions this runs, in one process:

* sync  -- ``durability="sync"``: CALLS consecutive ``set_position`` calls on one thread (keys cycling), with
  the default journal thresholds (so the journal passes ``journal_max_records`` several times) and a short
  ``backup_interval`` (so several timed backups fall due) while 24 backups already exist;
* group -- the same with ``durability="group"`` and 4 threads (each its own keys), every call timed in its
  own thread;
* group x4 in blocks -- the same group calls, and its floor x4, in alternating blocks (``--rounds``, 10) rather
  than call by call; ``--modes`` picks among sync, group and blocks (all three by default);
* floor -- a bare append + ``fdatasync`` of as many bytes as one journal record, on an O_APPEND file on the
  same file system: what one durable change cannot go below. Each sync row is **paired** with it call by call
  (one floor call beside each ``set_position``, which goes first alternating), so the disk's phase and the
  background work fall on both alike;
* floor x4 -- the same appends from 4 threads sharing each ``fdatasync`` as group commit does (leader and
  followers), with no state: what a group-mode call cannot go below. Each group thread pairs its calls with it.

Both floors are also measured alone first, while no manager (and no background thread) exists: a paired floor's
ratio to them shows what the machine did meanwhile. So is ``floor x4 own syncs``: the issue's floor (an append +
``fdatasync`` per call) taken literally by 4 threads, each call syncing for itself. Group commit's floor above is
the stricter of the two for a group row; the one-thread floor is no floor for 4 threads at all.

After each row's setup the script calls ``gc.freeze()`` (``--no-gc-freeze``: not), as the README advises a bot
holding a large state, and prints the full garbage collections that fell in each row.

Prints median, p99, p99.9 and max (ms) of each, a row's ratios to its paired floor, and the targets of issue
14: the slowest ``set_position`` at 100,000 positions within 2x the slowest paired floor operation, and p99.9
within 1.5x the paired floor's p99.9 (both modes; the group rows also against the sync row's one-thread floor,
measured just before, not interleaved). Tests never assert times; this script does not fail either, it prints
``met`` or ``MISSED``.

``--compaction process,thread`` runs the sync and group rows once per ``StateConfig(compaction=...)``,
interleaved in the same run (rows ``sync/process``, ``sync/thread``, ...); the default is the default
(``process``: the compaction's O(state) work in a worker process).

Run: ``PYTHONPATH=. python benchmarks/bench_tail.py`` (``--quick``: 12,000 calls, enough for one compaction).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_journal import pct, position  # the same positions and percentiles as the journal benchmark
from runqueue import RunQueue, queued_report

from posstate import PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.storage import fileops as fs

KEY = bytes(range(32))
THREADS = 4


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p99": pct(values, 0.99),
        "p99.9": pct(values, 0.999),
        "max": max(values),
    }


#: ``--no-background``: journal thresholds no row reaches (no compaction) and no timed backup, so the rows
#: show the tail without any background work: the control for what that work costs the calls.
QUIET = {"journal_max_records": 10**7, "journal_max_bytes": 1 << 30}


def prepare(
    d: Path,
    n: int,
    mode: str,
    backup_interval: float,
    compaction: str = "process",
    quiet: bool = False,
    unverified: bool = False,
) -> PositionStateManager:
    """A state of *n* positions with 24 backups already on disk (oldest first, an hour apart), made and verified
    by the bot before it restarted (its verdict file holds them); *unverified*: backups it never checked (copied
    in), so its first prune checks all 24."""
    extra: dict[str, Any] = dict(QUIET) if quiet else {}
    cfg = StateConfig.in_dir(d, durability=mode, backup_interval=backup_interval, compaction=compaction, **extra)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([position(i, 1) for i in range(n)])
        m.wait_for_backups()  # the first timed backup runs in the background: let it finish before adding ours
        state = m._state.copy()
        cache = _background.service(m._files).cache
        now = time.time()
        for k in range(24):
            _backups.write_backup(
                state,
                backup_dir=cfg.backup_path,
                keyring=m._write_keyring,
                compression_level=cfg.compression_level,
                options=m._read,
                now=now - 3600 * (24 - k),
                remember=None if unverified else cache.before_check,
            )
        cache.keep()  # what the prune after each of them would have written
    m = PositionStateManager(cfg, key=KEY)
    m.load_positions()
    m._files.last_backup_at = None
    return m


class Floor:
    """The floor of one durable change: append the bytes of one journal record to an ``O_APPEND`` file and
    ``fdatasync`` it, nothing else."""

    def __init__(self, path: Path, record_bytes: int) -> None:
        self.fd = fs.open_(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.data = os.urandom(record_bytes)

    def call(self) -> None:
        os.write(self.fd, self.data)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class GroupFloor(Floor):
    """The floor of ``group`` mode: threads append the same bytes and share each ``fdatasync`` the way
    posstate's group commit does (one leader syncs everything written so far, the others wait), in plain
    Python with no state. A group-mode call waits for a sync already running when it wrote, then for its
    own, and its threads share one interpreter lock: the one-thread floor cannot show either."""

    def __init__(self, path: Path, record_bytes: int) -> None:
        super().__init__(path, record_bytes)
        self.cond = threading.Condition()
        self.written = self.durable = 0
        self.syncing = False

    def call(self) -> None:
        with self.cond:
            os.write(self.fd, self.data)
            self.written += 1
            seq = self.written
        while True:
            with self.cond:
                while self.syncing and self.durable < seq:
                    self.cond.wait()
                if self.durable >= seq:
                    return
                self.syncing = True
                target = self.written
            try:
                os.fdatasync(self.fd)
            finally:
                with self.cond:
                    self.syncing = False
                    self.durable = max(self.durable, target)
                    self.cond.notify_all()


def timed_pairs(
    ups: list[Any],
    set_position: Callable[[Any], object],
    floor: Floor | None,
    out: list[float],
    fout: list[float],
    waits: Waits | None = None,
) -> None:
    """Time each ``set_position`` and, when *floor* is given, one floor call beside it: the two alternate call
    by call (which goes first alternates too), so both see the same phase of the disk and the same background
    work. The disk's ``fdatasync`` changes phase within seconds; rows measured one after another do not.
    With *waits*, each call's run-queue wait (ms, read outside the timed call) goes to its list, in order."""
    clock = time.perf_counter
    rq = RunQueue() if waits is not None else None

    def floor_call() -> None:
        q0 = rq() if rq else 0.0
        t0 = clock()
        floor.call()  # type: ignore[union-attr]
        fout.append(clock() - t0)
        if rq and waits is not None:
            waits.floor.append(rq() - q0)

    for j, p in enumerate(ups):
        if floor is not None and j % 2 == 0:
            floor_call()
        q0 = rq() if rq else 0.0
        t0 = clock()
        set_position(p)
        out.append(clock() - t0)
        if rq and waits is not None:
            waits.method.append(rq() - q0)
        if floor is not None and j % 2 == 1:
            floor_call()
    if rq:
        rq.close()


class Waits:
    """The run-queue waits (ms) of a row's calls and of its floor's, in the order of their timings."""

    def __init__(self) -> None:
        self.method: list[float] = []
        self.floor: list[float] = []

    @classmethod
    def joined(cls, parts: list[Waits]) -> Waits:
        out = cls()
        for w in parts:
            out.method += w.method
            out.floor += w.floor
        return out


def children_cpu() -> float:
    """Processor seconds of this process's reaped children (the compaction and backup-check workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_sync(
    m: PositionStateManager, n: int, calls: int, floor: Floor | None = None, waits: Waits | None = None
) -> tuple[list[float], list[float]]:
    ups = [position(i % n, 2 + i // n) for i in range(calls)]
    out: list[float] = []
    fout: list[float] = []
    timed_pairs(ups, m.set_position, floor, out, fout, waits)
    return out, fout


def run_group(
    m: PositionStateManager, n: int, calls: int, floor: Floor | None = None, waits: Waits | None = None
) -> tuple[list[float], list[float]]:
    per = calls // THREADS
    results: list[list[float]] = [[] for _ in range(THREADS)]
    fresults: list[list[float]] = [[] for _ in range(THREADS)]
    parts = [Waits() for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        keys = [i for i in range(n) if i % THREADS == t]
        ups = [position(keys[j % len(keys)], 2 + j // len(keys)) for j in range(per)]
        start.wait()
        timed_pairs(ups, m.set_position, floor, results[t], fresults[t], parts[t] if waits is not None else None)

    run_threads(worker)
    if waits is not None:
        joined = Waits.joined(parts)
        waits.method, waits.floor = joined.method, joined.floor
    return [x for r in results for x in r], [x for r in fresults for x in r]


def run_group_blocks(
    m: PositionStateManager, n: int, calls: int, floor: Floor, rounds: int, waits: Waits | None = None
) -> tuple[list[float], list[float]]:
    """``group`` mode with its floor in alternating blocks, not call by call: ROUNDS rounds of a block of
    group calls (THREADS threads) and a block of floor-x4 calls (which goes first alternates). Paired call by
    call, each thread's floor call waits behind the manager's syncs in flight and the other way round (8
    calls in flight on one disk); in blocks the two sides' calls never overlap, while the manager's background
    work goes on in both (``--no-background`` shows that work's share of the tail)."""
    per = max(1, calls // rounds // THREADS)
    results: list[list[float]] = [[] for _ in range(THREADS)]
    fresults: list[list[float]] = [[] for _ in range(THREADS)]
    done = [0] * THREADS
    mparts, fparts = [Waits() for _ in range(THREADS)], [Waits() for _ in range(THREADS)]
    # Every thread's changes are built here, before any block: built after a block's barrier (O(n) per thread
    # at 100,000 positions, some 6 ms holding the interpreter lock), they delayed the calls of the threads
    # already timing, on the manager's side only.
    keys = [[i for i in range(n) if i % THREADS == t] for t in range(THREADS)]
    planned = [[position(keys[t][j % len(keys[t])], 2 + j // len(keys[t])) for j in range(rounds * per)] for t in range(THREADS)]

    def block(fn: Callable[[int, int], None]) -> None:
        start = threading.Barrier(THREADS)

        def worker(t: int) -> None:
            start.wait()
            fn(t, per)

        run_threads(worker)

    def manager_block(t: int, k: int) -> None:
        ups = planned[t][done[t] : done[t] + k]
        done[t] += k
        timed_pairs(ups, m.set_position, None, results[t], [], mparts[t] if waits is not None else None)

    def floor_block(t: int, k: int) -> None:
        timed_pairs([None] * k, lambda _: floor.call(), None, fresults[t], [], fparts[t] if waits is not None else None)

    for r in range(rounds):
        for fn in (manager_block, floor_block) if r % 2 == 0 else (floor_block, manager_block):
            block(fn)
    if waits is not None:  # a floor block's calls are timed as "method" calls of timed_pairs
        waits.method = Waits.joined(mparts).method
        waits.floor = Waits.joined(fparts).method
    return [x for r in results for x in r], [x for r in fresults for x in r]


def run_threads(worker: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_floor(d: Path, calls: int, record_bytes: int) -> list[float]:
    """The floor alone: *calls* floor calls on one thread."""
    floor = Floor(d / "floor-alone.bin", record_bytes)
    out: list[float] = []
    try:
        timed_pairs([None] * calls, lambda _: floor.call(), None, out, [])
    finally:
        floor.close()
    return out


def run_group_floor(d: Path, calls: int, record_bytes: int, *, shared: bool = True) -> list[float]:
    """The group floor alone: THREADS threads, *calls* group-floor calls in all. ``shared=False``: the
    issue's floor taken literally by THREADS threads, each call its own append + ``fdatasync``."""
    floor = GroupFloor(d / "floor-group-alone.bin", record_bytes) if shared else Floor(d / "floor-own-alone.bin", record_bytes)
    results: list[list[float]] = [[] for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        start.wait()
        timed_pairs([None] * (calls // THREADS), lambda _: floor.call(), None, results[t], [])

    try:
        run_threads(worker)
    finally:
        floor.close()
    return [x for r in results for x in r]


def record_bytes(m: PositionStateManager) -> int:
    before = m._journal.size
    m.set_position(position(0, 999_999))
    return max(64, m._journal.size - before)


def probe_record_bytes(d: Path) -> int:
    """The size of one journal record, from a one-position state (the same as at any size), closed again."""
    cfg = StateConfig.in_dir(d, durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([position(0, 1)])
        m.set_position(position(0, 2))
        return record_bytes(m)


class FullCollections:
    """Count the interpreter's full garbage collections (generation 2) and their longest pause while a row runs:
    one holds the interpreter lock for every thread, 40-180 ms at 100,000 positions, whatever the call."""

    def __init__(self) -> None:
        self.count, self.longest, self._t0 = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count += 1
            self.longest = max(self.longest, time.perf_counter() - self._t0)


def ms(v: float) -> str:
    return f"{v * 1e3:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12,000 calls per method and size")
    ap.add_argument("--calls", type=int, default=None)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--backup-interval", type=float, default=None, help="seconds (default: a few backups fall due)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temp dir)")
    ap.add_argument("--compaction", default="process", help="process,thread: the rows once per StateConfig(compaction=)")
    ap.add_argument(
        "--modes",
        default="sync,group,blocks",
        help="sync,group,blocks: which rows to run (blocks: group mode and its floor in alternating blocks)",
    )
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the blocks row")
    ap.add_argument(
        "--no-background",
        action="store_true",
        help="the control: no compaction and no timed backup during the rows (what background work costs the calls)",
    )
    ap.add_argument(
        "--unverified-backups",
        action="store_true",
        help="the 24 backups were never checked by the bot (copied in): its first prune checks them all",
    )
    ap.add_argument("--no-compaction", action="store_true", help="journal thresholds no row reaches (timed backups go on)")
    ap.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the state's objects to the collector (by default gc.freeze() after the setup, as docs advise a bot)",
    )
    args = ap.parse_args()
    hows = [h.strip() for h in args.compaction.split(",") if h.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]

    def tag(how: str) -> str:
        return f"/{how}" if len(hows) > 1 else ""

    calls = args.calls or (12_000 if args.quick else 30_000)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="posstate-tail-", dir=args.dir))
    # (size, row name, stats, the stats its ratios are to, or None)
    rows: list[tuple[int, str, dict[str, float], dict[str, float] | None]] = []
    targets: list[tuple[str, bool]] = []
    collections: list[str] = []
    background: list[str] = []
    waited: list[str] = []  # the run-queue wait of each row's calls (what part of a slow call was the scheduler)
    try:
        for n in sizes:
            interval = args.backup_interval if args.backup_interval is not None else 2.0
            interval = 1e9 if args.no_background else interval
            # The floors alone first, while no manager (and so no background thread) exists.
            size = probe_record_bytes(root / f"probe-{n}")
            alone = stats(run_floor(root / f"probe-{n}", calls, size))
            galone = stats(run_group_floor(root / f"probe-{n}", calls, size))
            oalone = stats(run_group_floor(root / f"probe-{n}", calls, size, shared=False))
            rows += [(n, "floor alone", alone, None), (n, f"floor x{THREADS} alone", galone, None)]
            rows += [(n, f"floor x{THREADS} own syncs alone", oalone, None)]
            sync_paired: dict[str, dict[str, float]] = {}
            for mode in modes:
                for how in hows:
                    d = root / f"{mode}-{how}-{n}"
                    quiet = args.no_background or args.no_compaction
                    m = prepare(d, n, "sync" if mode == "sync" else "group", interval, how, quiet, args.unverified_backups)
                    blocks = " in blocks" if mode == "blocks" else ""
                    name = f"sync{tag(how)}" if mode == "sync" else f"group x{THREADS}{blocks}{tag(how)}"
                    fname = "floor" if mode == "sync" else f"floor x{THREADS}"
                    floor = (Floor if mode == "sync" else GroupFloor)(root / f"probe-{n}" / f"floor-{mode}-{how}.bin", size)
                    full = FullCollections()
                    waits = Waits()
                    kids = children_cpu()
                    counts = {"compactions": 0, "backups": 0}
                    m.on(
                        "stateSaved",
                        lambda e, c=counts: c.__setitem__("compactions", c["compactions"] + bool(e.get("background"))),
                    )
                    m.on("backupCreated", lambda e, c=counts: c.__setitem__("backups", c["backups"] + 1))
                    if not args.no_gc_freeze:  # what the README advises a bot holding a large state
                        gc.collect()
                        gc.freeze()
                    gc.callbacks.append(full)
                    try:
                        if mode == "blocks":
                            vals, fvals = run_group_blocks(m, n, calls, floor, max(1, args.rounds), waits)
                        else:
                            vals, fvals = (run_sync if mode == "sync" else run_group)(m, n, calls, floor, waits)
                    finally:
                        gc.callbacks.remove(full)
                        gc.unfreeze()
                        floor.close()
                        m.close()  # reaps the kept compaction worker: its time is counted below
                        shutil.rmtree(d, ignore_errors=True)
                    background.append(
                        f"{name} @ {n:,}: {children_cpu() - kids:.2f} s of the workers' processor time "
                        f"({counts['compactions']} background compactions, {counts['backups']} backups)"
                    )
                    collections.append(f"{name} @ {n:,}: {full.count} full collection(s), longest {full.longest * 1e3:.1f} ms")
                    st, fst = stats(vals), stats(fvals)
                    pname = f"  {fname}, {'blocks' if blocks else 'paired'}"
                    for who, took, queued in ((name, vals, waits.method), (pname.strip(), fvals, waits.floor)):
                        if queued:
                            report = queued_report([t * 1e3 for t in took], queued, 0.001, "calls")
                            waited.append(f"{who} @ {n:,}: {report}")
                    rows += [(n, name, st, fst), (n, pname, fst, alone if mode == "sync" else galone)]
                    if mode == "sync":
                        sync_paired[how] = fst
                    if n != max(sizes):
                        continue
                    targets.append(
                        (
                            f"{name} @ {n:,}: max {ms(st['max'])} ms <= 2x {pname.strip()} max {ms(fst['max'])} ms",
                            st["max"] <= 2 * fst["max"],
                        )
                    )
                    targets.append(
                        (
                            f"{name} @ {n:,}: p99.9 {ms(st['p99.9'])} ms <= 1.5x {pname.strip()} p99.9 {ms(fst['p99.9'])} ms",
                            st["p99.9"] <= 1.5 * fst["p99.9"],
                        )
                    )
                    if mode != "sync" and how in sync_paired:  # the target: the one-thread floor
                        one = sync_paired[how]
                        for k, bound in (("max", 2.0), ("p99.9", 1.5)):
                            targets.append(
                                (
                                    f"{name} @ {n:,}: {k} {ms(st[k])} ms <= {bound}x the one-thread floor {k} "
                                    f"{ms(one[k])} ms (paired with sync{tag(how)}, measured in an earlier row: not interleaved)",
                                    st[k] <= bound * one[k],
                                )
                            )
            shutil.rmtree(root / f"probe-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"set_position tail, {calls:,} calls per row (ms; a method's ratio is to the floor paired with it call by")
    print("call, or in alternating blocks for a blocks row; a floor's ratio to the same floor measured alone before")
    print("any manager existed)")
    print(f"{'positions':>10} {'method':<30} {'median':>15} {'p99':>15} {'p99.9':>15} {'max':>17}")
    for n, name, st, f in rows:
        cells = []
        for k in ("median", "p99", "p99.9", "max"):
            r = f"{st[k] / f[k]:5.2f}x" if f else "      "
            cells.append(f"{st[k] * 1e3:8.3f} {r}")
        print(f"{n:>10,} {name:<30} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {cells[3]:>17}")
    print(f"full garbage collections during the rows ({'gc.freeze() off' if args.no_gc_freeze else 'after gc.freeze()'}):")
    for line in collections:
        print(f"  {line}")
    print("background work (the worker processes' processor time per row, reaped at close):")
    for line in background:
        print(f"  {line}")
    print("run-queue wait (/proc/thread-self/schedstat: how long the slowest calls were runnable but not running):")
    for line in waited:
        print(f"  {line}")
    print("targets (issue 14; against the floor of the same row: paired call by call, or in blocks for a blocks row):")
    for text, ok in targets:
        print(f"  {'met   ' if ok else 'MISSED'} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
