"""In-process reliability checks of the write-ahead journal (``durability="sync"``): power-loss replay of
an append, of a compaction and of the very first update, I/O faults at each operation of an append and of a
compaction, and damage to a journal file.

Used by ``tests/test_reliability_journal_*.py`` and ``benchmarks/reliability.py``; the process-crash side
is :mod:`posstate.selftest.crashjournal`. The workload is :func:`posstate.selftest.crashjournal.update_position`: update *i*
sets one position, so the state after updates 1..*i* is :func:`~posstate.selftest.crashjournal.expected_positions`.
"""

from __future__ import annotations

import random
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from posstate.core.errors import OutcomeUnknownError, PersistenceError, PosStateError
from posstate.journal import format as jf
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey
from posstate.selftest.crashjournal import BG_THREAD, config, counters, expected_positions, update_position
from posstate.selftest.harness import Fault, HarnessOps, Op, copy_tree
from posstate.selftest.replay import CrashState, crash_states, materialize, snapshot
from posstate.storage import fileops as _fileops

Positions = dict[PositionKey, Position]


def warm(state_dir: Path, *, key: bytes, kind: str, max_records: int = 6, at_least: int = 3) -> int:
    """Make *state_dir* a sync-mode state whose next update is an append (*kind* "append") or compacts
    ("compaction"), after at least *at_least* updates; return the number of updates made. *kind* "first"
    leaves it empty: the next update is the very first (the first snapshot, then the first journal)."""
    if kind == "first":
        return 0
    with PositionStateManager(config(state_dir, max_records=max_records), key=key) as m:
        i = counters(m.load_positions()).get(0, 0)
        while True:
            due = m._journal.records >= max_records  # what Journal.prepare() checks
            if i >= at_least and due == (kind == "compaction"):
                return i
            i += 1
            m.set_position(update_position(0, i))


# ----------------------------------------------------------------------------------------------- power loss
@dataclass(frozen=True, slots=True)
class RecordedUpdate:
    """One recorded update: the directory before it, its operations, the descriptors already open, and
    the states before and after."""

    root: Path
    before: dict[str, bytes]
    ops: list[Op]
    open_fds: dict[int, tuple[str, bool]]
    old: Positions
    new: Positions
    returned: bool  # the update returned (it was acknowledged)

    def states(self) -> Iterator[CrashState]:
        return crash_states(self.before, self.ops, self.root, open_fds=self.open_fds)


def record_update(state_dir: Path, *, key: bytes, kind: str, max_records: int = 6, fault: Fault | None = None) -> RecordedUpdate:
    """Warm *state_dir* up (see :func:`warm`), then record the next update (optionally with a fault)."""
    warm(state_dir, key=key, kind=kind, max_records=max_records)
    ops = HarnessOps(keep_data=True, fault=fault, counting=False, uncounted_thread_prefix=BG_THREAD)
    with _fileops.use(ops), PositionStateManager(config(state_dir, max_records=max_records), key=key) as m:
        old = m.load_positions()
        i = counters(old).get(0, 0) + 1
        before = snapshot(state_dir)
        mark = len(ops.ops)
        open_fds = ops.open_files()
        ops.counting = True
        try:
            m.set_position(update_position(0, i))
            returned = True
        except PersistenceError:
            returned = False
        ops.counting = False
        recorded = list(ops.ops[mark:])
    return RecordedUpdate(state_dir, before, recorded, open_fds, old, expected_positions(i), returned)


SYNC_OPS = frozenset({"fsync", "fdatasync", "fsync_dir"})


def sync_sites(ops: list[Op], root: Path) -> list[int]:
    """The syncs of an update whose removal a replay of that update can notice, as 1-based counts among
    SYNC_OPS (for ``Fault(action="skip", ops=SYNC_OPS)``). Left out: syncs of files outside *root* itself
    (a timed backup's: the load of the acked state does not read it), and a directory fsync followed by
    another one in the same update (the later one persists every earlier directory operation too, since
    metadata reaches the disk in order; only a replay of a save on its own can notice it, as the snapshot
    families do)."""
    syncs = [op for op in ops if op.name in SYNC_OPS and not op.thread.startswith(BG_THREAD)]  # counted ones only
    out = []
    for k, op in enumerate(syncs, 1):
        if op.name == "fsync_dir":
            if not any(o.name == "fsync_dir" for o in syncs[k:]):
                out.append(k)
        elif op.path is not None and Path(op.path).parent == root:
            out.append(k)
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    state: CrashState
    result: str  # "old", "new", "error" or "other"
    detail: str = ""

    @property
    def lost(self) -> bool:
        return self.result in ("error", "other") or (self.state.complete and self.result != "new")


def load_state(state: CrashState, into: Path, *, key: bytes, old: Positions, new: Positions) -> Outcome:
    """Materialize *state* in the empty directory *into*, load it in sync mode with a fresh manager, classify."""
    materialize(state, into)
    try:
        with PositionStateManager(config(into), key=key) as m:
            got = m.load_positions()
    except PosStateError as exc:
        return Outcome(state, "error", f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(into, ignore_errors=True)
    if got == old:
        return Outcome(state, "old")
    if got == new:
        return Outcome(state, "new")
    return Outcome(state, "other", f"{len(got)} positions")


def replay(rec: RecordedUpdate, work: Path, *, key: bytes) -> list[Outcome]:
    return [load_state(st, work / f"c{i}", key=key, old=rec.old, new=rec.new) for i, st in enumerate(rec.states())]


# ----------------------------------------------------------------------------------------------- I/O faults
@dataclass(frozen=True, slots=True)
class FaultResult:
    outcome: str  # "failed", "succeeded" or "wrong-error: ..."
    fired: bool
    detected: bool  # a PersistenceError (or success), memory right, disk the acked or the in-flight state
    recovered: bool  # ... and the next update succeeded, a fresh manager loads it, no temp left
    lost: bool
    detail: str = ""


def _temps(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".positions.json")]


def fault_case(base: Path, d: Path, *, key: bytes, fault: Fault, max_records: int = 6) -> FaultResult:
    """One fault during an update made from a copy of *base* (see module docstring for the promises)."""
    copy_tree(base, d)
    cfg = config(d, max_records=max_records)
    m = PositionStateManager(cfg, key=key)
    try:
        old = m.load_positions()
        i = counters(old).get(0, 0) + 1
        new = expected_positions(i)
        ops = HarnessOps(fault=fault, skip_thread_prefix=BG_THREAD)  # the update's own operations (issue 14)
        outcome = "succeeded"
        with _fileops.use(ops):
            try:
                m.set_position(update_position(0, i))
            except PersistenceError as exc:
                # outcome_unknown: the update may be on disk; the bot was told, and the next load reports it.
                outcome = "unknown" if exc.outcome_unknown else "failed"
            except Exception as exc:  # anything else breaks the promise of a typed error
                outcome = f"wrong-error: {type(exc).__name__}: {exc}"
        memory = m.get_positions()
        memory_ok = memory == (new if outcome == "succeeded" else old)
        job = m._bg_job  # a background compaction the update started (issue 14): copy the directory once it is done
        if job is not None:
            job.done.wait(60)
        copy = d.with_name(d.name + "-disk")  # the manager holds the lock: load a copy of what is on disk
        copy_tree(d, copy)
        try:
            with PositionStateManager(config(copy, max_records=max_records), key=key) as m2:
                disk = m2.load_positions()
            disk_ok = disk == new or (disk == old and outcome != "succeeded")
            disk_note = "" if disk == memory or outcome == "unknown" else "disk holds the failed (in-flight) update"
        except PosStateError as exc:
            disk_ok, disk_note = False, f"{type(exc).__name__}: {exc}"
        shutil.rmtree(copy)
        # The fault clears: the same manager takes the next update (after an unknown outcome it refuses,
        # and a reopened one loads what is on disk and reports the update in doubt).
        try:
            if outcome == "unknown":
                try:
                    m.set_position(update_position(0, i + 1))
                except OutcomeUnknownError:
                    pass
                else:
                    raise PersistenceError(d, operation="update", reason="accepted a change after an unknown outcome")
                m.close()
                m = PositionStateManager(cfg, key=key)
                memory = m.load_positions()
                report = m.last_recovery
                if report is None or not report.unknown_outcomes:
                    raise PersistenceError(d, operation="load", reason="the update in doubt was not reported")
            m.set_position(update_position(0, i + 1))
            final = m.get_positions()
            next_ok = final == {**memory, update_position(0, i + 1).key: update_position(0, i + 1)}
        except PosStateError as exc:
            next_ok, final = False, {}
            disk_note += f"; next update failed: {exc}"
    finally:
        m.close()
    with PositionStateManager(cfg, key=key) as m3:
        reloaded = m3.load_positions()  # journal temps are swept at load, snapshot temps at open
        after_ok = _temps(d) == [] and reloaded == final
    detected = outcome in ("failed", "succeeded", "unknown") and memory_ok and disk_ok
    shutil.rmtree(d)
    return FaultResult(
        outcome, ops.fired > 0, detected, detected and next_ok and after_ok, not disk_ok or not after_ok, disk_note
    )


def ops_of_update(work: Path, *, key: bytes, kind: str, counted: frozenset[str], max_records: int = 6) -> tuple[Path, int]:
    """Warm a base directory for *kind* and count the operations (among *counted*) its next update makes."""
    base = work / f"base-{kind}"
    warm(base, key=key, kind=kind, max_records=max_records)
    probe = work / f"probe-{kind}"
    copy_tree(base, probe)
    with PositionStateManager(config(probe, max_records=max_records), key=key) as m:
        i = counters(m.load_positions()).get(0, 0) + 1
        ops = HarnessOps(skip_thread_prefix=BG_THREAD)
        with _fileops.use(ops):
            m.set_position(update_position(0, i))
    shutil.rmtree(probe)
    return base, sum(op.name in counted for op in ops.ops)


# ----------------------------------------------------------------------------------------------- damage
@dataclass(frozen=True, slots=True)
class JournalFile:
    """A state directory (snapshot + journal) whose journal holds updates 1..records, all acknowledged."""

    files: dict[str, bytes]
    journal: bytes  # the header and the records (the file goes on with *padding* zero bytes)
    records: int
    boundaries: tuple[int, ...]  # byte offsets where a record ends (a cut there leaves a valid journal)
    prefixes: tuple[Positions, ...] = field(default=())  # the state after 0..records updates
    padding: int = 0  # the zeros written ahead of the next record, after the last one


def journal_file(state_dir: Path, *, key: bytes, size: int = 2048) -> JournalFile:
    """Make a journal of about *size* bytes (whole records) over its snapshot (the empty state)."""
    with PositionStateManager(config(state_dir, max_records=10_000), key=key) as m:
        m.load_positions()
        i = 0
        while True:
            i += 1
            m.set_position(update_position(0, i))
            if m._journal.size >= size:
                break
        end = m._journal.size
    files = snapshot(state_dir)
    raw = files["positions.json.journal"]
    data = raw[:end]
    assert not any(raw[end:]), "the file goes on with zeros only"
    boundaries = _boundaries(data)
    assert len(boundaries) == i and boundaries[-1] == len(data), (boundaries, i, len(data))
    prefixes = tuple(expected_positions(k) if k else {} for k in range(i + 1))
    return JournalFile(files, data, i, (jf.HEADER_SIZE, *boundaries), prefixes, len(raw) - end)


def _boundaries(data: bytes) -> tuple[int, ...]:
    """End offset of each record, read from the frame lengths."""
    out = []
    pos = jf.HEADER_SIZE
    while pos + jf.FRAME_HEAD <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        pos += jf.FRAME_HEAD + n
        out.append(pos)
    return tuple(out)


def journal_damage(jfile: JournalFile, *, bit_step: int = 1, seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(family, label, damaged journal file): every *bit_step*-th single-bit flip of the records; bit flips
    in the zeros after them; every truncation length that cuts inside the header or a record, both as a
    shorter file and as a record torn over the zeros (the rest of the file still zeros); every cut at a
    record boundary (a valid shorter journal: reported apart, as is a cut whose last bytes are all zeros,
    which carry nothing of the next record, and zeros over a record's tail that was all zeros already); each
    record's length field changed with its CRC recomputed (raised past the end, raised, lowered; issue 12.13);
    and garbage written after the last record (zeros written there are no damage: they are what the file holds
    anyway)."""
    data = jfile.journal
    pad = bytes(jfile.padding)
    for bit in range(0, len(data) * 8, bit_step):
        buf = bytearray(data)
        buf[bit // 8] ^= 1 << (bit % 8)
        yield "bit-flip", f"bit {bit}", bytes(buf) + pad
    if pad:
        for bit in range(0, len(pad) * 8, max(1, len(pad) * 8 // (64 if bit_step > 1 else 1024))):
            buf = bytearray(pad)
            buf[bit // 8] ^= 1 << (bit % 8)
            yield "bit-flip in the zeros written ahead", f"bit {bit}", data + bytes(buf)
    cuts = set(jfile.boundaries)
    for n in range(len(data)):
        start = max(b for b in (0, *jfile.boundaries) if b <= n)
        family = "cut at a record boundary" if n in cuts or (start >= jf.HEADER_SIZE and not any(data[start:n])) else "truncation"
        yield family, f"length {n}", data[:n]
        if pad:
            # Zeros over the rest of a record whose remaining bytes were zeros anyway: the file is byte for
            # byte the cut at the record's end (seen in CI: a record whose last byte was 0x00).
            end = min((b for b in jfile.boundaries if b > n), default=len(data))
            zeroed = family if any(data[n:end]) else "cut at a record boundary"
            yield zeroed, f"length {n}, then zeros", data[:n] + bytes(len(data) - n) + pad
    # Issue 12.13: each record's length field changed without the key (its CRC recomputed), the record's
    # checksum kept or rewritten too: a whole record hides behind it, so damage, never a torn tail.
    size = len(data) + len(pad)
    for i, (start, end) in enumerate(zip(jfile.boundaries, jfile.boundaries[1:], strict=False)):
        own = end - start - jf.FRAME_HEAD
        for label, length, rewrite in (
            ("raised past the end of the file", size - start, False),
            ("raised by 100", own + 100, False),
            ("lowered by 10", own - 10, False),
            ("raised past the end, checksum rewritten", size - start, True),
        ):
            if length > jf.BODY_FIXED:
                yield "length field changed", f"record {i + 1}: {label}", _changed_length(data + pad, start, length, rewrite)
    rnd = random.Random(seed)
    last = data[jfile.boundaries[-2] :]
    for label, extra in (
        ("newline", b"\n"),
        ("one 0x01 byte", b"\1"),
        ("64 random bytes", rnd.randbytes(64)),
        ("4096 random bytes", rnd.randbytes(4096)),
        ("the last record again", last),
        ("the whole journal again", data),
    ):
        yield "appended", label, data + extra + pad[len(extra) :]


def _changed_length(data: bytes, at: int, length: int, rewrite: bool) -> bytes:
    field = length.to_bytes(4, "big")
    check = b"\xa5" * 4 if rewrite else data[at + 8 : at + 12]
    return data[:at] + field + zlib.crc32(field).to_bytes(4, "big") + check + data[at + 12 :]


@dataclass(frozen=True, slots=True)
class DamageResult:
    detected: bool  # reported: stateCorrupted / stateRepaired event, last_recovery, or a typed error
    recovered: bool  # loaded the full acknowledged state
    invented: bool  # loaded something that was never acknowledged (or a non-PosStateError)
    records: int | None  # how many of the acknowledged records the loaded state holds
    detail: str = ""
    damage: bool = False  # reported as damage (last_recovery, stateCorrupted, a typed error), not a torn tail cut


def load_damaged(jfile: JournalFile, damaged: bytes, into: Path, *, key: bytes) -> DamageResult:
    """Write the state directory with the damaged journal into *into*, load it with a fresh manager."""
    materialize(CrashState(0, True, {**jfile.files, "positions.json.journal": damaged}, "damaged"), into)
    events: list[str] = []
    try:
        with PositionStateManager(config(into, max_records=10_000), key=key) as m:
            m.on("stateCorrupted", lambda _payload: events.append("stateCorrupted"))
            m.on("stateRepaired", lambda _payload: events.append("stateRepaired"))
            got = m.load_positions()
            reported = bool(events) or m.last_recovery is not None
            damage = "stateCorrupted" in events or m.last_recovery is not None
    except PosStateError as exc:
        return DamageResult(True, False, False, None, f"{type(exc).__name__}: {exc}", damage=True)
    except Exception as exc:
        return DamageResult(False, False, True, None, f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(into, ignore_errors=True)
    k = next((n for n, p in enumerate(jfile.prefixes) if p == got), None)
    return DamageResult(reported, k == jfile.records, k is None, k, ",".join(events), damage=damage)


__all__ = [
    "DamageResult",
    "FaultResult",
    "JournalFile",
    "Outcome",
    "RecordedUpdate",
    "fault_case",
    "journal_damage",
    "journal_file",
    "load_damaged",
    "load_state",
    "ops_of_update",
    "record_update",
    "replay",
    "sync_sites",
    "warm",
]
