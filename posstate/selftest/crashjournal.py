"""The process the journal crash tests kill: durable updates in ``"sync"`` (or ``"group"``) mode.

Run as ``python -m posstate.selftest.crashjournal DIR [--updates N] [--max-records R] [--mode sync|group]
[--threads T] [--crash-update U --crash-at K --crash-when before|after] [--probe]`` with the key in
``POSSTATE_KEY``. Update *i* sets one position (:func:`update_position`); the child prints ``pending T I``
before the call and ``ack T I`` once it returns (T: the thread number, 0 in sync mode). A small
``journal_max_records`` makes compactions happen. With ``--crash-at`` the child installs ``HarnessOps``
during update *U* only and SIGKILLs itself before or after the *K*-th mutating file operation of that update
(an append: write + fdatasync; a rotation: its segment starts in the spare or is created). ``--probe`` prints
the mutating operations of each update. The parent (:func:`journal_matrix`, :func:`journal_soak`) then opens a
fresh manager and requires, for each thread, exactly the last acknowledged update or the one in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey
from posstate.selftest.crashchild import _child_env
from posstate.selftest.harness import MUTATING, Action, Fault, HarnessOps, copy_tree
from posstate.storage import fileops as _fileops

#: Symbols a single-threaded run cycles through (update i sets symbol i % len).
CYCLE = 5
#: The name the background compaction's thread starts with (posstate/manager/compaction.py).
BG_THREAD = "posstate-compact"


def update_position(thread: int, i: int) -> Position:
    """The position update number *i* of *thread* sets (deterministic; contracts encode *i*)."""
    sym = f"J{i % CYCLE}/USDT" if thread == 0 else f"G{thread}/USDT"
    return Position(
        symbol=sym,
        side="long",
        contracts=Decimal(i) / Decimal(100),
        entry_price=Decimal(1000 + i) / Decimal(8),
        timestamp=1_700_000_000_000 + i,
    )


def counter_of(p: Position) -> int:
    return int(p.contracts * 100)


def expected_positions(last: int) -> dict[PositionKey, Position]:
    """The single-threaded state after updates 1..*last*: each symbol holds its latest update."""
    out: dict[PositionKey, Position] = {}
    for i in range(max(1, last - CYCLE + 1), last + 1):
        p = update_position(0, i)
        out[p.key] = p
    return out


def counters(positions: Mapping[PositionKey, Position]) -> dict[int, int]:
    """Thread -> last update found. Thread 0: the highest counter over the J symbols (single-threaded)."""
    out: dict[int, int] = {}
    for (sym, _side), p in positions.items():
        t = 0 if sym.startswith("J") else int(sym[1:].split("/")[0])
        out[t] = max(out.get(t, 0), counter_of(p))
    return out


def config(state_dir: Path | str, *, mode: str = "sync", max_records: int = 6, **kw: Any) -> StateConfig:
    return StateConfig.in_dir(state_dir, backup_interval=1e9, durability=mode, journal_max_records=max_records, **kw)


# ----------------------------------------------------------------------------------------------- the child
def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    say = threading.Lock()
    ops: HarnessOps | None = None
    bg: HarnessOps | None = None  # the background compaction's operations (issue 14), for the whole run
    if args.crash_at:
        action: Action = "crash_after" if args.crash_when == "after" else "crash_before"
        fault = Fault(at=args.crash_at, action=action, ops=MUTATING)
        if args.crash_bg:
            bg = HarnessOps(fault=fault, thread_prefix=BG_THREAD)
        else:
            ops = HarnessOps(fault=fault, counting=False, skip_thread_prefix=BG_THREAD)
    elif args.probe_bg:
        bg = HarnessOps(thread_prefix=BG_THREAD)
    with contextlib.ExitStack() as stack:
        if bg is not None:
            stack.enter_context(_fileops.use(bg))
        _updates(args, out, say, ops)
    if args.probe_bg and bg is not None:
        out.write("ops 0 " + ",".join(op.name for op in bg.ops if op.name in MUTATING) + "\n")
    return 0


def _updates(args: argparse.Namespace, out: Any, say: threading.Lock, ops: HarnessOps | None) -> None:
    with PositionStateManager(config(args.dir, mode=args.mode, max_records=args.max_records, compaction=args.compaction)) as m:
        start = counters(m.load_positions())

        def line(text: str) -> None:
            with say:
                out.write(text + "\n")
                out.flush()

        def worker(t: int) -> None:
            i = start.get(t, 0)
            n = 0
            while args.updates == 0 or n < args.updates:
                n += 1
                i += 1
                line(f"pending {t} {i}")
                if ops is not None and n == args.crash_update:
                    ops.counting = True
                    with _fileops.use(ops):
                        m.set_position(update_position(t, i))
                    ops.counting = False
                elif args.probe:
                    probe = HarnessOps(skip_thread_prefix=BG_THREAD)
                    jid = m._journal.journal_id
                    with _fileops.use(probe):
                        m.set_position(update_position(t, i))
                    line(f"ops {n} " + ",".join(op.name for op in probe.ops if op.name in MUTATING))
                    if m._journal.journal_id != jid:  # this update started a new segment (a rotation)
                        line(f"segment {n}")
                else:
                    m.set_position(update_position(t, i))
                line(f"ack {t} {i}")

        if args.threads <= 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(1, args.threads + 1)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posstate.selftest.crashjournal")
    parser.add_argument("dir")
    parser.add_argument("--updates", type=int, default=0, help="stop after N updates per thread (0: forever)")
    parser.add_argument("--max-records", type=int, default=6)
    parser.add_argument("--mode", choices=("sync", "group"), default="sync")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--crash-update", type=int, default=1)
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--crash-when", choices=("before", "after"), default="before")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--crash-bg", action="store_true", help="count --crash-at in the background compaction's operations")
    parser.add_argument("--probe-bg", action="store_true", help="print the background compaction's operations at the end")
    parser.add_argument("--compaction", choices=("process", "thread"), default="process")
    return _run(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------- the parent
@dataclass(frozen=True, slots=True)
class Reported:
    """What a child printed: per thread the last acknowledged update and the one in flight."""

    acked: dict[int, int]
    pending: dict[int, int]
    ops: dict[int, list[str]]
    segments: frozenset[int] = frozenset()  # probed updates that started a segment (issue 14.3: spare = an append's ops)


def parse_lines(lines: list[str]) -> Reported:
    acked: dict[int, int] = {}
    pending: dict[int, int] = {}
    ops: dict[int, list[str]] = {}
    segments: set[int] = set()
    for text in lines:
        parts = text.split()
        if len(parts) == 3 and parts[0] in ("ack", "pending"):
            t, i = int(parts[1]), int(parts[2])
            if parts[0] == "ack":
                acked[t] = i
                pending.pop(t, None)
            else:
                pending[t] = i
        elif len(parts) in (2, 3) and parts[0] == "ops":
            ops[int(parts[1])] = parts[2].split(",") if len(parts) == 3 else []
        elif len(parts) == 2 and parts[0] == "segment":
            segments.add(int(parts[1]))
    return Reported(acked, pending, ops, frozenset(segments))


@dataclass(frozen=True, slots=True)
class JournalCase:
    """One kill and what a fresh manager found: per thread, the update loaded and the allowed ones."""

    label: str
    allowed: dict[int, tuple[int, ...]]  # thread -> (last acked, in flight)
    loaded: dict[int, int] | None
    error: str | None
    exact: bool = True  # single-threaded: the whole state equals the one for that update

    @property
    def ok(self) -> bool:
        if self.loaded is None or not self.exact:
            return False
        return all(self.loaded.get(t, 0) in allowed for t, allowed in self.allowed.items()) and set(self.loaded) <= set(
            self.allowed
        )


def run_child(
    state_dir: Path, *, key: bytes, updates: int, max_records: int = 6, extra: tuple[str, ...] = ()
) -> tuple[int, Reported]:
    cmd = [
        sys.executable,
        "-m",
        "posstate.selftest.crashjournal",
        str(state_dir),
        "--updates",
        str(updates),
        "--max-records",
        str(max_records),
    ]
    proc = subprocess.run([*cmd, *extra], env=_child_env(key), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"journal crash child failed unexpectedly (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.returncode, parse_lines(proc.stdout.splitlines())


def check_after_kill(
    state_dir: Path, *, key: bytes, label: str, before: Mapping[int, int], rep: Reported, mode: str, max_records: int
) -> JournalCase:
    """Load with a fresh manager; each thread must show its last ack (or what it had before) or the one in flight."""
    threads = set(before) | set(rep.acked) | set(rep.pending)
    allowed: dict[int, tuple[int, ...]] = {}
    for t in threads:
        acked = rep.acked.get(t, before.get(t, 0))
        allowed[t] = (acked, rep.pending[t]) if t in rep.pending else (acked,)
    try:
        with PositionStateManager(config(state_dir, mode=mode, max_records=max_records), key=key) as m:
            positions = m.load_positions()
    except PosStateError as exc:
        return JournalCase(label, allowed, None, f"{type(exc).__name__}: {exc}")
    loaded = counters(positions)
    exact = True
    if mode == "sync" and threads <= {0}:
        exact = positions == expected_positions(loaded.get(0, 0))
    return JournalCase(label, allowed, loaded, None, exact)


def probe_updates(base: Path, work: Path, *, key: bytes, updates: int, max_records: int) -> Reported:
    """The mutating operations of each update a child makes from a copy of *base* (deterministic)."""
    d = work / "probe"
    copy_tree(base, d)
    _, rep = run_child(d, key=key, updates=updates, max_records=max_records, extra=("--probe",))
    shutil.rmtree(d)
    return rep


def journal_matrix(
    work: Path,
    *,
    key: bytes,
    max_records: int = 6,
    warmup: int = 9,
    which: tuple[str, ...] = ("append", "compaction"),
    only: frozenset[int] | None = None,
) -> dict[str, list[JournalCase]]:
    """SIGKILL before and after every mutating operation of an append update and of a compacting update.

    A base directory is warmed up with *warmup* updates (a snapshot and a journal with records); the probe
    finds, from a copy of it, the first update that only appends and the first that compacts. Each case
    starts from a fresh copy; the child acks the updates before the chosen one, then dies inside it.
    """
    base = work / "base"
    run_child(base, key=key, updates=warmup, max_records=max_records)
    with PositionStateManager(config(base, max_records=max_records), key=key) as m:
        before = counters(m.load_positions())
    rep = probe_updates(base, work, key=key, updates=max_records + 2, max_records=max_records)
    probed = rep.ops
    starts = rep.segments | {n for n, names in probed.items() if "replace" in names}
    picks = {
        "append": next(n for n in sorted(probed) if n not in starts),
        "compaction": min(starts),
    }
    out: dict[str, list[JournalCase]] = {}
    for kind, how in (("background", "thread"), ("background-process", "process")):
        if kind in which:  # the in-process compaction's steps, or the install steps of a worker's snapshot
            out[kind] = _background_cases(base, work, key=key, before=before, max_records=max_records, only=only, how=how)
    for kind in (k for k in which if not k.startswith("background")):
        u = picks[kind]
        n_ops = len(probed[u])
        cases: list[JournalCase] = []
        for k in range(1, n_ops + 1):
            if only is not None and k not in only:
                continue
            for when in ("before", "after"):
                d = work / f"{kind}-k{k}-{when}"
                copy_tree(base, d)
                extra = ("--crash-update", str(u), "--crash-at", str(k), "--crash-when", when)
                rc, rep = run_child(d, key=key, updates=u, max_records=max_records, extra=extra)
                if rc == 0:
                    raise RuntimeError(f"{kind} update {u}: operation {k} of {n_ops} was never reached")
                label = f"{kind} update: kill {when} op {k} ({probed[u][k - 1]})"
                cases.append(
                    check_after_kill(d, key=key, label=label, before=before, rep=rep, mode="sync", max_records=max_records)
                )
                shutil.rmtree(d)
        out[kind] = cases
    return out


def _background_cases(
    base: Path, work: Path, *, key: bytes, before: dict[int, int], max_records: int, only: frozenset[int] | None, how: str
) -> list[JournalCase]:
    """SIGKILL before and after every mutating operation of a background compaction (issue 14), while the
    child keeps updating (or, late operations, while close() waits for it). *how*: ``compaction=`` of the
    child (``"process"``: the manager's own steps, installing the snapshot its worker wrote)."""
    updates = max_records + 2
    d = work / f"probe-bg-{how}"
    shutil.copytree(base, d)
    _, rep = run_child(d, key=key, updates=updates, max_records=max_records, extra=("--probe-bg", "--compaction", how))
    shutil.rmtree(d)
    names = rep.ops.get(0, [])
    cases: list[JournalCase] = []
    for k in range(1, len(names) + 1):
        if only is not None and k not in only:
            continue
        for when in ("before", "after"):
            d = work / f"background-{how}-k{k}-{when}"
            shutil.copytree(base, d)
            extra = ("--crash-bg", "--crash-at", str(k), "--crash-when", when, "--compaction", how)
            rc, rep = run_child(d, key=key, updates=updates, max_records=max_records, extra=extra)
            if rc == 0:
                raise RuntimeError(f"background compaction: operation {k} of {len(names)} was never reached")
            label = f"background compaction ({how}): kill {when} op {k} ({names[k - 1]})"
            cases.append(check_after_kill(d, key=key, label=label, before=before, rep=rep, mode="sync", max_records=max_records))
            shutil.rmtree(d)
    return cases


def journal_soak(
    state_dir: Path,
    *,
    key: bytes,
    kills: int,
    mode: str = "sync",
    threads: int = 1,
    max_records: int = 6,
    seed: int = 0,
    max_delay: float = 0.004,
) -> list[JournalCase]:
    """Start the child, let it ack a few updates, SIGKILL it at a random moment; load; repeat *kills* times."""
    rng = random.Random(seed)
    cases: list[JournalCase] = []
    known: dict[int, int] = {}
    for n in range(kills):
        cmd = [
            sys.executable,
            "-m",
            "posstate.selftest.crashjournal",
            str(state_dir),
            "--updates",
            "0",
            "--max-records",
            str(max_records),
        ]
        cmd += ["--mode", mode, "--threads", str(threads)]
        proc = subprocess.Popen(cmd, env=_child_env(key), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        lines: list[str] = []
        want = rng.randint(1, 3 * max_records)
        acks = 0
        while acks < want:
            text = proc.stdout.readline()
            if not text:
                break
            lines.append(text)
            acks += text.startswith("ack ")
        time.sleep(rng.uniform(0, max_delay))  # the kill lands at a random moment of the next update(s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        lines.extend(proc.stdout.read().splitlines())  # through the same buffered reader (see crashchild.soak)
        proc.stdout.close()
        rep = parse_lines(lines)
        case = check_after_kill(
            state_dir, key=key, label=f"{mode} soak kill {n}", before=known, rep=rep, mode=mode, max_records=max_records
        )
        cases.append(case)
        if case.loaded is None:
            break  # the next round would start from an unknown state
        known = dict(case.loaded)
    return cases


__all__ = [
    "JournalCase",
    "Reported",
    "check_after_kill",
    "config",
    "counters",
    "expected_positions",
    "journal_matrix",
    "journal_soak",
    "parse_lines",
    "probe_updates",
    "run_child",
    "update_position",
]


if __name__ == "__main__":
    sys.exit(main())
