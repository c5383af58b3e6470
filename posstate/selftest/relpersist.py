"""Persistent faults: from the *k*-th file operation of an update on, every operation fails, the rollback
path included (a disk that turned read-only or keeps returning EIO), until the process ends; then a
manager opens the directory on a healthy disk.

The promise checked (issue 12.8): it loads what the callers were told. Every update that returned is
there; no update that raised a :class:`~posstate.PersistenceError` without ``outcome_unknown`` comes back;
an update whose outcome was told unknown may be there or not. Used by ``benchmarks/reliability.py``
(family ``pfaults``) and ``tests/test_reliability_bench.py``; the updates are those of
:mod:`posstate.selftest.reljournal` (journal modes) and :mod:`posstate.selftest.crashchild` (a snapshot save).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError, PosStateError
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey
from posstate.selftest.crashchild import save_step, workload
from posstate.selftest.crashjournal import BG_THREAD, config, counters, update_position
from posstate.selftest.harness import MUTATING_AND_READS, Fault, HarnessOps, copy_tree
from posstate.selftest.reljournal import warm
from posstate.storage import fileops as _fileops

Positions = dict[PositionKey, Position]

#: The updates covered, as (kind, durability): "save" is a snapshot-mode save of a whole new set of
#: positions; "append" and "compaction" are one set_position in a journal mode.
KINDS: tuple[tuple[str, str], ...] = (
    ("save", "snapshot"),
    ("append", "sync"),
    ("append", "group"),
    ("compaction", "sync"),
    ("compaction", "group"),
)
#: How the process goes on after the failed update, before a manager opens the directory on a healthy
#: disk: "crash" dies at once (the directory is copied as it is); "close" retries with the next update and
#: closes the manager, while every file operation still fails.
ENDINGS = ("crash", "close")


@dataclass(frozen=True, slots=True)
class PersistentResult:
    """What one persistent fault did (see :func:`persistent_fault_case`)."""

    outcomes: tuple[str, ...]  # per attempt: "succeeded", "failed", "unknown", "refused" or "wrong-error: ..."
    fired: bool
    memory_ok: bool  # after each attempt whose outcome is known, memory holds what the caller was told
    loaded: str  # on the healthy disk: "told" (what the callers were told, or an outcome told unknown), else what

    @property
    def unknown(self) -> bool:
        """An attempt was told its outcome is unknown (``PersistenceError.outcome_unknown``)."""
        return "unknown" in self.outcomes

    @property
    def lost(self) -> bool:
        """An acknowledged update missing, an update reported failed (outcome known) loaded, a load error
        on the healthy disk, an error that is not a PosStateError, or a fault that never fired."""
        return not self.fired or self.loaded != "told" or any(o.startswith("wrong-error") for o in self.outcomes)

    @property
    def detected(self) -> bool:
        return not self.lost and self.memory_ok


def _config(d: Path, kind: str, mode: str, max_records: int) -> StateConfig:
    if kind == "save":
        return StateConfig.in_dir(d, backup_interval=1e9, durability="snapshot")
    return config(d, mode=mode, max_records=max_records)


def _attempts(m: PositionStateManager, kind: str) -> tuple[Positions, list[Callable[[], object]]]:
    """Load; return the positions and the two updates a case tries (the update under test, then the bot's
    next update, tried while the disk still fails)."""
    old = m.load_positions()
    if kind == "save":
        return old, [lambda: m.save_positions(workload(3)[0]), lambda: m.save_positions(workload(4)[0])]
    i = counters(old).get(0, 0)
    return old, [lambda: m.set_position(update_position(0, i + 1)), lambda: m.set_position(update_position(0, i + 2))]


def _would_be(kind: str, base: Positions, attempt: int, first: int) -> Positions:
    """The positions once attempt number *attempt* (0 or 1) succeeded on top of *base*."""
    if kind == "save":
        return {p.key: p for p in workload(3 + attempt)[0]}
    p = update_position(0, first + attempt)
    return {**base, p.key: p}


def persistent_base(work: Path, *, key: bytes, kind: str, mode: str, max_records: int = 6) -> tuple[Path, int]:
    """A warmed-up directory whose next update is *kind* in *mode*, and how many operations (among
    MUTATING_AND_READS) that update makes on a healthy disk."""
    base = work / f"base-{kind}-{mode}"
    if kind == "save":
        with PositionStateManager(_config(base, kind, mode, max_records), key=key) as m:
            m.load_positions()
            save_step(m, 1)
            save_step(m, 2)
    else:
        warm(base, key=key, kind=kind, max_records=max_records)
    probe = work / f"probe-{kind}-{mode}"
    copy_tree(base, probe)
    ops = HarnessOps(skip_thread_prefix=BG_THREAD)
    with PositionStateManager(_config(probe, kind, mode, max_records), key=key) as m:
        _, attempts = _attempts(m, kind)
        with _fileops.use(ops):
            attempts[0]()
    shutil.rmtree(probe)
    return base, sum(op.name in MUTATING_AND_READS for op in ops.ops)


def _attempt(call: Callable[[], object]) -> str:
    try:
        call()
    except PersistenceError as exc:
        return "unknown" if getattr(exc, "outcome_unknown", False) else "failed"
    except PosStateError as exc:
        # After an outcome told unknown the manager refuses changes until it is reopened.
        return "refused" if type(exc).__name__ == "OutcomeUnknownError" else "failed"
    except Exception as exc:  # anything else breaks the promise of a typed error
        return f"wrong-error: {type(exc).__name__}: {exc}"
    return "succeeded"


def persistent_fault_case(
    base: Path, d: Path, *, key: bytes, kind: str, mode: str, at: int, errno: int, ending: str, max_records: int = 6
) -> PersistentResult:
    """From a copy of *base*, every counted file operation from the *at*-th on fails with *errno*, from the
    update (*kind*, *mode*) until the process ends (*ending*); then a fresh manager opens the directory on
    a healthy disk and must load what the callers were told."""
    copy_tree(base, d)
    crashed = d.with_name(d.name + "-crash")
    # The background compaction's operations (issue 14) are not counted (their order against the caller's
    # varies) but fail as well once the fault has started.
    ops = HarnessOps(fault=Fault(at=at, errno=errno, persistent=True, ops=MUTATING_AND_READS), uncounted_thread_prefix=BG_THREAD)
    outcomes: list[str] = []
    memory_ok = True
    m = PositionStateManager(_config(d, kind, mode, max_records), key=key)
    try:
        told, attempts = _attempts(m, kind)
        first = counters(told).get(0, 0) + 1
        allowed = [told]  # the states the disk may hold; the first is what the callers were told
        with _fileops.use(ops):
            for n, call in enumerate(attempts[: 1 if ending == "crash" else 2]):
                would_be = _would_be(kind, allowed[0], n, first)
                outcome = _attempt(call)
                outcomes.append(outcome)
                if outcome == "succeeded":
                    allowed = [would_be]
                elif outcome == "unknown":
                    allowed.append(would_be)
                if outcome in ("succeeded", "failed", "refused") and "unknown" not in outcomes:
                    memory_ok = memory_ok and m.get_positions() == allowed[0]
            if ending == "close":
                m.close()  # never raises: a snapshot it cannot write at close is logged
        target = d
        if ending == "crash":  # the process dies here; the next one starts on what the disk holds
            job = m._bg_job  # not in the middle of a background attempt's rename
            if job is not None:
                job.done.wait(60)
            copy_tree(d, crashed)
            target = crashed
    finally:
        m.close()
    try:
        with PositionStateManager(_config(target, kind, mode, max_records), key=key) as m2:
            got = m2.load_positions()
        if got in allowed:
            loaded = "told"
        elif got == _would_be(kind, told, 0, first):
            loaded = "the update reported failed came back"
        else:
            loaded = f"another state ({len(got)} positions)"
    except PosStateError as exc:
        loaded = f"error: {type(exc).__name__}: {exc}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(crashed, ignore_errors=True)
    return PersistentResult(tuple(outcomes), ops.fired > 0, memory_ok, loaded)


__all__ = ["ENDINGS", "KINDS", "PersistentResult", "persistent_base", "persistent_fault_case"]
