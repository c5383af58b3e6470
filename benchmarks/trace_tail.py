"""Where the slowest ``set_position`` calls spend their time: a kernel trace of bench_tail's ``sync`` row (issue 14).

bench_tail prints how slow the tail is and how long its calls waited for a processor; this script says what
they waited *for*. It runs the ``sync`` row of bench_tail (the same state, 24 planted backups, default journal
thresholds, a timed backup every 2 s) under the kernel's tracer (tracefs) and splits the time of the slowest
calls into:

* running -- the bot's thread on a processor;
* runnable -- woken, waiting for a processor, and what held the processors then (a compaction or check worker,
  the bot's other threads (by name), a kernel thread, an idle processor slow to wake);
* asleep, own request in flight -- its record's write on the disk;
* asleep in ``fdatasync``, no request in flight -- waiting for the disk's cache flush to be *issued*: the block
  layer issues it from a per-processor kernel worker (kblockd), which must get that processor first. The
  script also prints how long that worker waited for the processor and what ran meanwhile;
* asleep otherwise (a lock, the interpreter lock).

Needs Linux, root and tracefs (``/sys/kernel/tracing``); it enables the events it needs, and at the end turns
them off, empties the buffer and gives back the buffer's size and ``tracing_on`` as they were. Tracing adds
a little to every call: compare runs of this script with each other (``--no-background``: the control with
no compaction and no timed backup), not with bench_tail's figures.

Run: ``sudo PYTHONPATH=. .venv/bin/python benchmarks/trace_tail.py`` (``--positions``, ``--calls``, ``--share``).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import bench_tail as bt
from bench_journal import position

TRACING = Path("/sys/kernel/tracing")
#: The Python name of each thread this process started (its native id -> name): a trace names only ids.
THREAD_NAMES: dict[int, str] = {}
_run = threading.Thread.run


def _named_run(self: threading.Thread) -> None:
    THREAD_NAMES[threading.get_native_id()] = self.name
    _run(self)


threading.Thread.run = _named_run  # type: ignore[method-assign]  # a benchmark's own process only
EVENTS = ("sched/sched_switch", "sched/sched_wakeup", "block/block_rq_issue", "block/block_rq_complete")
SYSCALLS = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit")  # filtered to the bot's thread
_LINE = re.compile(r"\s*(.+?)-(\d+)\s+\(\s*([\d-]+)\)\s+\[(\d+)\].*?\s(\d+\.\d+): (\w+): (.*)")
_SWITCH = re.compile(r"prev_pid=(\d+) prev_prio=(\d+) prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+) next_prio=(\d+)")
_WAKE = re.compile(r"comm=(.*?) pid=(\d+) prio=(\d+) target_cpu=(\d+)")
_NR = re.compile(r"NR (\d+)")
#: x86_64 numbers of the calls a journal write makes (others are printed by number).
_SYSCALL_NAMES = {1: "write", 18: "pwrite64", 74: "fsync", 75: "fdatasync", 202: "futex"}


class Event:
    __slots__ = ("comm", "cpu", "name", "pid", "rest", "tgid", "ts")

    def __init__(self, m: re.Match[str]) -> None:
        self.comm, pid, tgid, cpu, ts, self.name, self.rest = m.groups()
        self.pid, self.cpu, self.ts = int(pid), int(cpu), float(ts)
        self.tgid = int(tgid) if tgid.strip("-") else 0


def write(name: str, value: str) -> None:
    (TRACING / name).write_text(value)


def record(positions: int, calls: int, background: bool) -> tuple[list[Event], int]:
    """Run the sync row with every call between two trace markers; the events, and the bot thread's id."""
    root = Path(tempfile.mkdtemp(prefix="posstate-trace-", dir=os.environ.get("TMPDIR")))
    me = threading.get_native_id()
    buffer_kb = ""
    try:
        m = bt.prepare(root / "s", positions, "sync", 2.0 if background else 1e9, "process", not background)
        ups = [position(i % positions, 2 + i // positions) for i in range(calls)]
        gc.collect()
        gc.freeze()
        marker = os.open(TRACING / "trace_marker", os.O_WRONLY)
        buffer_kb = (TRACING / "buffer_size_kb").read_text().split()[0]  # given back at the end
        was_on = (TRACING / "tracing_on").read_text().strip()
        write("trace", "")
        write("buffer_size_kb", "262144")
        write("options/record-tgid", "1")
        for e in SYSCALLS:
            write(f"events/{e}/filter", f"common_pid == {me}")
        for e in EVENTS + SYSCALLS:
            write(f"events/{e}/enable", "1")
        write("tracing_on", "1")
        try:
            for p in ups:
                os.write(marker, b"B")
                m.set_position(p)
                os.write(marker, b"E")
        finally:
            write("tracing_on", "0")
            for e in EVENTS + SYSCALLS:
                write(f"events/{e}/enable", "0")
            for e in SYSCALLS:
                write(f"events/{e}/filter", "0")
            os.close(marker)
            m.close()
        text = (TRACING / "trace").read_text()
    finally:
        write("trace", "")
        write("options/record-tgid", "0")
        if buffer_kb:
            write("buffer_size_kb", buffer_kb)  # 256 MiB a processor is not left allocated
            write("tracing_on", was_on)
        gc.unfreeze()
        shutil.rmtree(root, ignore_errors=True)
    events = [Event(m) for m in map(_LINE.match, text.splitlines()) if m]
    return events, me


def who(pid: int, prio: int, bot: int, tgids: dict[int, int]) -> str:
    if pid == 0:
        return "an idle processor"
    if tgids.get(pid) == bot:
        return "the bot's thread " + THREAD_NAMES.get(pid, "(not started by Python)")[:32]
    return f"another process at prio {prio} ({'a worker, nice 19' if prio == 139 else 'nice ' + str(prio - 120)})"


def most(d: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


class Split:
    """One call's time, split as it is walked event by event (the bot's thread's state, the requests in flight)."""

    def __init__(self, start: float, parts: collections.defaultdict[str, float]) -> None:
        self.state, self.since, self.own_io, self.any_io, self.syscall = "running", start, 0, 0, ""
        self.runnable_since = start
        self.parts = parts

    def close(self, t: float) -> None:
        """Count the time since the last change to the state the thread was in."""
        if self.state != "asleep":
            kind = self.state
        elif self.own_io:
            kind = "asleep, own request in flight"
        elif self.any_io == 0:
            kind = f"asleep in {self.syscall}, no request in flight"
        else:
            kind = f"asleep in {self.syscall}, others' I/O"
        self.parts[kind] += t - self.since
        self.since = t


def analyse(events: list[Event], me: int, share: float) -> None:
    tgids = {e.pid: e.tgid for e in events}
    bot = tgids[me]
    calls: list[tuple[int, int]] = []
    begin = None
    for i, e in enumerate(events):
        if e.name == "tracing_mark_write" and e.pid == me:
            if e.rest.startswith("B"):
                begin = i
            elif begin is not None:
                calls.append((begin, i))
                begin = None
    calls.sort(key=lambda c: events[c[0]].ts - events[c[1]].ts)
    slow = calls[: max(1, int(len(calls) * share))]
    times = sorted(events[b].ts - events[a].ts for a, b in calls)
    print(f"{len(calls):,} calls: median {times[len(times) // 2] * 1e3:.3f} ms, max {times[-1] * 1e3:.3f} ms")
    parts: collections.defaultdict[str, float] = collections.defaultdict(float)
    behind: collections.defaultdict[str, float] = collections.defaultdict(float)
    flush_wait: list[float] = []
    flush_behind: collections.defaultdict[str, float] = collections.defaultdict(float)
    running: dict[int, tuple[int, int]] = {}  # cpu -> (pid, prio) on it
    scan_from = 0
    for a, b in sorted(slow):
        for e in events[scan_from:a]:  # who is on each processor when the call starts
            if e.name == "sched_switch" and (s := _SWITCH.search(e.rest)):
                running[e.cpu] = (int(s.group(5)), int(s.group(6)))
        scan_from = b
        call = Split(events[a].ts, parts)
        at_wake: list[tuple[int, int]] = []
        kworker: dict[int, float] = {}  # kblockd worker pid -> when the bot woke it
        for e in events[a : b + 1]:
            if e.name == "sys_enter" and e.pid == me and (n := _NR.search(e.rest)):
                call.close(e.ts)
                call.syscall = _SYSCALL_NAMES.get(int(n.group(1)), f"syscall {n.group(1)}")
            elif e.name == "block_rq_issue":
                call.close(e.ts)
                call.any_io += 1
                call.own_io += e.pid == me
            elif e.name == "block_rq_complete":
                call.close(e.ts)
                call.any_io = max(0, call.any_io - 1)
                call.own_io = max(0, call.own_io - 1)
            elif e.name == "sched_wakeup" and (w := _WAKE.search(e.rest)):
                if int(w.group(2)) == me:
                    call.close(e.ts)
                    if any(pid == me for pid, _ in running.values()):  # woken before it left its processor
                        call.state = "running"
                    else:
                        call.state, at_wake, call.runnable_since = "runnable", list(running.values()), e.ts
                elif e.pid == me and w.group(1).startswith("kworker") and w.group(1).endswith("H"):
                    kworker[int(w.group(2))] = e.ts
            elif e.name == "sched_switch" and (s := _SWITCH.search(e.rest)):
                nxt, prio = int(s.group(5)), int(s.group(6))
                held = running.get(e.cpu)
                running[e.cpu] = (nxt, prio)
                if int(s.group(1)) == me:
                    call.close(e.ts)
                    call.state = "runnable" if s.group(3).startswith("R") else "asleep"
                    if call.state == "runnable":  # preempted: behind what took its processor, and the other's
                        at_wake, call.runnable_since = list(running.values()), e.ts
                if nxt == me:
                    if call.state == "runnable":
                        for pid, pr in at_wake:
                            behind[who(pid, pr, bot, tgids)] += (e.ts - call.runnable_since) / max(1, len(at_wake))
                    call.close(e.ts)
                    call.state = "running"
                if nxt in kworker:
                    flush_wait.append(e.ts - kworker.pop(nxt))
                    if held is not None:
                        flush_behind[who(held[0], held[1], bot, tgids)] += flush_wait[-1]
        call.close(events[b].ts)
    total = sum(parts.values())
    print(f"the slowest {len(slow)} calls ({share:.1%}), {total * 1e3:.1f} ms in all:")
    for kind, t in most(parts):
        print(f"  {kind:<48} {t * 1e3:8.1f} ms  {t / total:5.0%}")
    if behind:
        print(
            f"  runnable until switched in ({sum(behind.values()) * 1e3:.1f} ms of it), behind (what held the processors"
            " when the bot's thread became runnable, shared among them):"
        )
        for k, t in most(behind):
            print(f"    {k:<52} {t * 1e3:8.1f} ms")
    if flush_wait:
        flush_wait.sort()
        print(
            f"  the flush's kernel worker (kblockd), woken by the bot's thread, waited for its processor: "
            f"{len(flush_wait)} times, median {flush_wait[len(flush_wait) // 2] * 1e3:.3f} ms, "
            f"max {flush_wait[-1] * 1e3:.3f} ms"
        )
        for k, t in most(flush_behind):
            print(f"    behind {k:<45} {t * 1e3:8.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=30_000)
    ap.add_argument("--share", type=float, default=0.002, help="the slowest share of the calls to split (0.2%%)")
    ap.add_argument("--no-background", action="store_true", help="the control: no compaction and no timed backup")
    args = ap.parse_args()
    if not sys.platform.startswith("linux") or not (TRACING / "trace_marker").exists() or os.geteuid() != 0:
        print("trace_tail needs Linux, root and tracefs mounted at /sys/kernel/tracing", file=sys.stderr)
        return 2
    events, me = record(args.positions, args.calls, not args.no_background)
    print(f"sync row, {args.positions:,} positions, {'no background work' if args.no_background else 'default background work'}")
    analyse(events, me, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
