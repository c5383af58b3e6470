"""The names of the objects in a replica: what each holds, read from its key without downloading it.

* ``snapshots/<generation:20>-<epoch:10>-<session:10>-<sha256:32>.pss``: a state file, byte for byte.
* ``journal/<base generation:20>-<journal id:32>/<start:16x>-<end:16x>-<epoch:10>-<session:10>-<sha256:32>.psj``:
  bytes ``start`` to ``end`` of that journal file (``start`` 0 includes its header), cut at record boundaries.
* ``lease.json``: the writer's lease (docs/REPLICATION.md, "One writer").
* ``epochs/<epoch:10>``: empty, written by each writer that takes the lease, so the next epoch is above it even
  when that writer shipped nothing before its lease object was deleted.

Every object is immutable once written (a name is never reused for other bytes: the digest is part of it).
*epoch* is the fencing epoch of the writer that shipped it (0 without a lease); *session* counts the writer's
starts, so a restart that re-ships a range after a power loss supersedes the range it replaces. The digest
lets a listing be compared with the local files without a download; it proves nothing about who wrote the
bytes (anyone with write access to the bucket can name an object): the key does, at restore.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SNAPSHOTS = "snapshots/"
JOURNAL = "journal/"
LEASE = "lease.json"
EPOCHS = "epochs/"

_SNAP = re.compile(r"snapshots/(\d{20})-(\d{10})-(\d{10})-([0-9a-f]{32})\.pss")
_EPOCH = re.compile(r"epochs/(\d{10})")
_RANGE = re.compile(r"journal/(\d{20})-([0-9a-f]{32})/([0-9a-f]{16})-([0-9a-f]{16})-(\d{10})-(\d{10})-([0-9a-f]{32})\.psj")


#: The highest epoch or session a name may carry: a name above it is not one posstate writes (one planted
#: with 9999999999 would otherwise push the writer's next counter past the ten digits of a name).
MAX_COUNTER = 999_999_999


def next_counter(highest: int, *, url: str, what: str) -> int:
    """*highest* + 1, or ReplicaError when that is past :data:`MAX_COUNTER` (loud, never a name that no
    longer parses)."""
    from posstate.core.errors import ReplicaError

    if highest + 1 > MAX_COUNTER:
        raise ReplicaError(
            url,
            f"the next {what} would be {highest + 1}, past the {MAX_COUNTER} a name can hold (an object planted with it?)",
            next_step="remove the objects or the lease record with that number (`posstate replica list`), then retry",
        )
    return highest + 1


def digest(data: bytes) -> str:
    """The 128-bit SHA-256 prefix that names *data*."""
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    epoch: int
    session: int
    digest: str

    @property
    def key(self) -> str:
        return f"{SNAPSHOTS}{self.generation:020d}-{self.epoch:010d}-{self.session:010d}-{self.digest}.pss"

    @property
    def order(self) -> tuple[int, int, int]:
        """Newest last: a later fencing epoch wins over any generation of an older one."""
        return (self.epoch, self.generation, self.session)


@dataclass(frozen=True, slots=True)
class Range:
    base_generation: int
    journal_id: str
    start: int
    end: int
    epoch: int
    session: int
    digest: str

    @property
    def folder(self) -> str:
        return f"{JOURNAL}{self.base_generation:020d}-{self.journal_id}/"

    @property
    def key(self) -> str:
        return f"{self.folder}{self.start:016x}-{self.end:016x}-{self.epoch:010d}-{self.session:010d}-{self.digest}.psj"

    @property
    def writer(self) -> tuple[int, int]:
        return (self.epoch, self.session)


def epoch_key(epoch: int) -> str:
    return f"{EPOCHS}{epoch:010d}"


def epoch_marks(keys: Iterable[str]) -> list[int]:
    """The epochs of the ``epochs/`` marks among *keys*."""
    return [int(m[1]) for m in map(_EPOCH.fullmatch, keys) if m and int(m[1]) <= MAX_COUNTER]


def parse(key: str) -> Snapshot | Range | None:
    """What the object *key* holds, or None for a name posstate never writes (ignored, reported by verify)."""
    m = _SNAP.fullmatch(key)
    if m:
        if max(int(m[2]), int(m[3])) > MAX_COUNTER:
            return None
        return Snapshot(int(m[1]), int(m[2]), int(m[3]), m[4])
    m = _RANGE.fullmatch(key)
    if m:
        start, end = int(m[3], 16), int(m[4], 16)
        if end <= start or max(int(m[5]), int(m[6])) > MAX_COUNTER:
            return None
        return Range(int(m[1]), m[2], start, end, int(m[5]), int(m[6]), m[7])
    return None


def split(keys: Iterable[str]) -> tuple[list[Snapshot], list[Range], list[str]]:
    """Snapshots (oldest first), journal ranges (by journal, then offset) and the names that are neither."""
    snaps: list[Snapshot] = []
    ranges: list[Range] = []
    other: list[str] = []
    for key in keys:
        found = parse(key)
        if isinstance(found, Snapshot):
            snaps.append(found)
        elif isinstance(found, Range):
            ranges.append(found)
        elif key != LEASE and not _EPOCH.fullmatch(key):
            other.append(key)
    snaps.sort(key=lambda s: s.order)
    ranges.sort(key=lambda r: (r.base_generation, r.journal_id, r.start, r.writer))
    return snaps, ranges, other


def chain(ranges: Sequence[Range], journal_id: str, *, floor: tuple[int, int] = (0, 0)) -> list[Range]:
    """The ranges of journal *journal_id* a restore uses, in order: from offset 0, at each offset the range of
    the newest writer (epoch, then session) no older than the one before it. A stale writer's range (an
    older epoch) is never used after a newer writer's, nor one older than *floor*; a gap ends the chain."""
    by_start: dict[int, list[Range]] = {}
    for r in ranges:
        if r.journal_id == journal_id and r.writer >= floor:
            by_start.setdefault(r.start, []).append(r)
    out: list[Range] = []
    off, low = 0, floor
    while True:
        cands = [r for r in by_start.get(off, ()) if r.writer >= low]
        if not cands:
            return out
        best = max(cands, key=lambda r: (r.writer, r.end))
        out.append(best)
        # The same bytes under several writers' names (a takeover ships them again; a bucket attacker can copy
        # a range under a higher session or epoch): the oldest of those writers bounds what may follow, so a
        # copy never hides the ranges its original's writer shipped after it.
        low = min(r.writer for r in cands if r.end == best.end and r.digest == best.digest)
        off = best.end


def rewritten(
    ranges: Sequence[Range], used: Sequence[Range], *, floor: tuple[int, int] = (0, 0), data: bytes | None = None
) -> Range | None:
    """The first range (lowest offset) of the journal of *used* (a :func:`chain`) that a newer writer than the
    chain's range holding its start shipped there, not a copy of a chain range: that writer rewrote the journal
    from there (records the older one shipped were lost locally, or a restore --at came before them), so the
    chain past its start is an older history, not the replica's newest (the range that began it is missing).
    With *data* (the chain's bytes), also a range of the chain's own writer there whose bytes differ from
    them (another history renamed under that writer's name); a range holding exactly the chain's bytes is a
    copy, never a rewrite (a takeover's, cut where its own batches end: :mod:`posstate.replica.chains`)."""
    if not used:
        return None
    same = {(r.start, r.end, r.digest) for r in used}
    found = [
        r
        for r in ranges
        if r.journal_id == used[0].journal_id
        and r.base_generation == used[0].base_generation
        and r.writer >= floor
        and (r.start, r.end, r.digest) not in same
        and any(u.start <= r.start < u.end and (r.writer > u.writer or _differs(r, u, data)) for u in used)
        and not (data is not None and r.end <= len(data) and digest(data[r.start : r.end]) == r.digest)
    ]
    return min(found, key=lambda r: r.start, default=None)


def _differs(r: Range, u: Range, data: bytes | None) -> bool:
    """*r*, of *u*'s writer, holds other bytes than the chain's *data* there."""
    return data is not None and r.writer == u.writer and r.end <= len(data) and digest(data[r.start : r.end]) != r.digest
