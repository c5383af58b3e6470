"""The process the crash tests kill: it saves in a loop and reports each save it was told is durable.

Run as ``python -m posstate.selftest.crashchild DIR [--saves N] [--crash-save S --crash-at K --crash-when before|after]``
with the key in ``POSSTATE_KEY``. Before each save it prints ``pending GEN DIGEST``, after it returns
``ack GEN DIGEST`` (one flushed line each). With ``--crash-at`` it installs :class:`HarnessOps` during save
number *S* and SIGKILLs itself before or after the *K*-th mutating file operation of that save, so the
parent can crash it deterministically at every step; without it the parent kills it at random moments.
The parent then loads with a fresh manager and compares :func:`digest` values.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
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
from posstate.selftest.harness import MUTATING, Action, Fault, HarnessOps, copy_tree
from posstate.storage import fileops as _fileops

SYMBOLS = tuple(f"C{n:02d}/USDT:USDT" for n in range(12))


def workload(step: int) -> tuple[list[Position], dict[str, dict[str, Any]]]:
    """The positions and metadata of save number *step* (deterministic; every step differs)."""
    positions = []
    for n, sym in enumerate(SYMBOLS):
        for side in ("long", "short"):
            if (n + step) % 5 == 0 and side == "short":
                continue
            positions.append(
                Position(
                    symbol=sym,
                    side=side,
                    contracts=Decimal(step * 7 + n) / Decimal(100),
                    entry_price=Decimal(1000 + 37 * n + step) / Decimal(8),
                    mark_price=Decimal(2000 + 11 * n * step) / Decimal(16),
                    leverage=Decimal(1 + n % 20),
                    timestamp=1_700_000_000_000 + step * 1000 + n,
                )
            )
    metadata = {
        sym: {"step": step, "entries_long": step + n, "note": f"s{step}-{n}"} for n, sym in enumerate(SYMBOLS[: 4 + step % 5])
    }
    return positions, metadata


def digest(positions: Mapping[PositionKey, Position], metadata: Mapping[str, Mapping[str, Any]]) -> str:
    """One fingerprint of positions and metadata, computed the same way in the child and the parent."""
    h = hashlib.sha256()
    for key in sorted(positions):
        h.update(repr(sorted(positions[key].to_dict().items())).encode())
    h.update(b"|")
    for sym in sorted(metadata):
        h.update(sym.encode() + repr(sorted(metadata[sym].items())).encode())
    return h.hexdigest()[:24]


def workload_digest(step: int) -> str:
    positions, metadata = workload(step)
    return digest({p.key: p for p in positions}, metadata)


@dataclass(frozen=True, slots=True)
class Seen:
    """What a fresh manager loads from a directory."""

    generation: int
    digest: str


def fresh_load(state_dir: Path, *, key: bytes, **config: Any) -> Seen:
    """Open a new manager on *state_dir*, load, and fingerprint what it holds."""
    with PositionStateManager(StateConfig.in_dir(state_dir, **config), key=key) as m:
        positions = m.load_positions()
        return Seen(m.generation, digest(positions, m.get_all_symbol_metadata()))


def save_step(m: PositionStateManager, step: int) -> int:
    """Make the manager's state that of *step* (metadata set, dropped symbols' metadata deleted) and save once."""
    positions, metadata = workload(step)
    for sym in list(m.get_all_symbol_metadata()):
        if sym not in metadata:
            m.delete_symbol_metadata(sym)
    for sym, data in metadata.items():
        m.set_symbol_metadata(sym, data)
    return m.save_positions(positions)


@dataclass(frozen=True, slots=True)
class ChildRun:
    """What a killed child reported: the last acknowledged save and the one in flight (gen, digest)."""

    returncode: int
    acked: tuple[int, str] | None
    pending: tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class CrashCase:
    """One kill and what a fresh manager found afterwards."""

    label: str
    acked: tuple[int, str] | None
    pending: tuple[int, str] | None
    loaded: Seen | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Loaded exactly the last acknowledged save, or the one in flight; nothing older, no error."""
        if self.loaded is None:
            return False
        got = (self.loaded.generation, self.loaded.digest)
        nothing_acked = self.acked is None and got == (0, digest({}, {}))  # before the first save: empty
        return got == self.acked or got == self.pending or nothing_acked


def _child_env(key: bytes) -> dict[str, str]:
    env = dict(os.environ)
    env["POSSTATE_KEY"] = base64.b64encode(key).decode("ascii")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _parse(lines: list[str]) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    acked: tuple[int, str] | None = None
    pending: tuple[int, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("ack", "pending"):
            item = (int(parts[1]), parts[2])
            if parts[0] == "ack":
                acked, pending = item, None
            else:
                pending = item
    return acked, pending


def run_child(
    state_dir: Path, *, key: bytes, saves: int, crash_save: int = 1, crash_at: int = 0, crash_when: str = "before"
) -> ChildRun:
    """Run the child to completion or to its own SIGKILL (deterministic crash at an operation)."""
    cmd = [sys.executable, "-m", "posstate.selftest.crashchild", str(state_dir), "--saves", str(saves)]
    if crash_at:
        cmd += ["--crash-save", str(crash_save), "--crash-at", str(crash_at), "--crash-when", crash_when]
    proc = subprocess.run(cmd, env=_child_env(key), capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"crash child failed unexpectedly (rc {proc.returncode}): {proc.stderr[-2000:]}")
    acked, pending = _parse(proc.stdout.splitlines())
    return ChildRun(proc.returncode, acked, pending)


def check_after_kill(
    state_dir: Path, *, key: bytes, label: str, acked: tuple[int, str] | None, pending: tuple[int, str] | None
) -> CrashCase:
    try:
        seen: Seen | None = fresh_load(state_dir, key=key)
        error = None
    except PosStateError as exc:
        seen, error = None, f"{type(exc).__name__}: {exc}"
    return CrashCase(label, acked, pending, seen, error)


def crash_matrix(
    work: Path, *, key: bytes, warmup: int = 2, max_ops: int = 64, only: frozenset[int] | None = None
) -> list[CrashCase]:
    """SIGKILL before and after every mutating operation of a save.

    With *warmup* > 0 it is a steady-state save (a file and a ``.bak`` exist): each case starts from a copy
    of the same warmed-up directory, the child acks one save, then dies inside the next one at operation
    *k*. With ``warmup=0`` it is the very first save into an empty directory. *only* restricts the kills to
    those operation numbers. Stops when *k* is past the last operation of the save.
    """
    base = work / "base"
    if warmup:
        run_child(base, key=key, saves=warmup)
    saves, crash_save = (2, 2) if warmup else (1, 1)
    cases: list[CrashCase] = []
    for k in range(1, max_ops + 1):
        if only is not None and k not in only:
            if k > max(only):
                break
            continue
        finished = False
        for when in ("before", "after"):
            d = work / f"k{k}-{when}"
            if warmup:
                copy_tree(base, d)
            run = run_child(d, key=key, saves=saves, crash_save=crash_save, crash_at=k, crash_when=when)
            if run.returncode == 0:
                finished = True
                shutil.rmtree(d)
                break
            cases.append(check_after_kill(d, key=key, label=f"kill {when} op {k}", acked=run.acked, pending=run.pending))
            shutil.rmtree(d)
        if finished:
            break
    return cases


def soak(state_dir: Path, *, key: bytes, kills: int, seed: int = 0, max_delay: float = 0.004) -> list[CrashCase]:
    """Start the child, let it ack a few saves, SIGKILL it at a random moment; load; repeat *kills* times."""
    rng = random.Random(seed)
    cases: list[CrashCase] = []
    for i in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-m", "posstate.selftest.crashchild", str(state_dir), "--saves", "0"],
            env=_child_env(key),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        want_acks = rng.randint(1, 4)
        acks = 0
        while acks < want_acks:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            acks += line.startswith("ack ")
        # The kill lands at a random moment of the following save(s): that is the point of the soak.
        time.sleep(rng.uniform(0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # Read the rest through the same buffered reader: communicate() with a timeout reads the raw pipe
        # and would miss lines already buffered by readline() (a "pending" line, say).
        lines.extend(proc.stdout.read().splitlines())
        proc.stdout.close()
        acked, pending = _parse(lines)
        cases.append(check_after_kill(state_dir, key=key, label=f"soak kill {i}", acked=acked, pending=pending))
    return cases


def contend(state_dir: Path, *, attempts: int) -> tuple[list[int], int]:
    """Try *attempts* times to take the lock and increment a counter kept in the state; return (values
    written, refusals). Used by the two-process concurrency test: no write may be lost or interleaved."""
    from posstate.core.errors import StateLockedError

    written: list[int] = []
    refused = 0
    cfg = StateConfig.in_dir(state_dir, backup_interval=1e9, durability="snapshot")
    for _ in range(attempts):
        try:
            m = PositionStateManager(cfg)
        except StateLockedError as exc:
            refused += 1
            sys.stdout.write(f"refused {exc.pid}\n")
            continue
        with m:
            m.load_positions()
            counter = m.get_symbol_metadata("COUNTER") or {"n": 0}
            n = int(counter["n"]) + 1
            m.set_symbol_metadata("COUNTER", {"n": n, "pid": os.getpid()})
            m.save()
        written.append(n)
        sys.stdout.write(f"wrote {n}\n")
    sys.stdout.flush()
    return written, refused


def run_contenders(state_dir: Path, *, key: bytes, processes: int = 2, attempts: int) -> list[str]:
    """Run *processes* contending children at once; return all their output lines."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "posstate.selftest.crashchild", str(state_dir), "--contend", str(attempts)],
            env=_child_env(key),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    lines: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"contender failed (rc {p.returncode}): {err[-2000:]}")
        lines.extend(out.splitlines())
    return lines


def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.contend:
        contend(Path(args.dir), attempts=args.contend)
        return 0
    ops: HarnessOps | None = None
    if args.crash_at:
        action: Action = "crash_after" if args.crash_when == "after" else "crash_before"
        ops = HarnessOps(fault=Fault(at=args.crash_at, action=action, ops=MUTATING), counting=False)
    with PositionStateManager(StateConfig.in_dir(args.dir, backup_interval=1e9, durability="snapshot")) as m:
        m.load_positions()
        start = m.generation
        out.write(f"start {start}\n")
        out.flush()
        n = 0
        while args.saves == 0 or n < args.saves:
            n += 1
            step = start + n
            out.write(f"pending {step} {workload_digest(step)}\n")
            out.flush()
            if ops is not None and n == args.crash_save:
                ops.counting = True
                with _fileops.use(ops):
                    gen = save_step(m, step)
                ops.counting = False
            else:
                gen = save_step(m, step)
            out.write(f"ack {gen} {workload_digest(step)}\n")
            out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posstate.selftest.crashchild")
    parser.add_argument("dir")
    parser.add_argument("--saves", type=int, default=0, help="stop after N saves (0: forever)")
    parser.add_argument("--contend", type=int, default=0, help="contend for the lock N times (concurrency test)")
    parser.add_argument("--crash-save", type=int, default=1)
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--crash-when", choices=("before", "after"), default="before")
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
