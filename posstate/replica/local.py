"""What of the local state a replica holds: the local snapshot and journal compared with a listing, by name and
digest only (nothing is downloaded, no key is needed). Shared by the shipper and ``posstate replica status``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from posstate.journal import format as jf
from posstate.journal.files import next_path
from posstate.replica import names as _names
from posstate.storage import container as _container
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")


@dataclass(frozen=True, slots=True)
class LocalFiles:
    """The state file and the journal that follows it, as read now (None: absent or not usable)."""

    snapshot: bytes | None
    generation: int | None
    journal: bytes | None
    header: jf.JournalHeader | None
    records: tuple[jf.RawRecord, ...]
    #: The ``.next`` segment a pending background compaction started (issue 14), linked to ``header``: its
    #: records are acknowledged too, so they are shipped as ranges of their own journal (None: no such file).
    following: Segment | None = None

    @property
    def journal_end(self) -> int:
        """Where the last intact record of the snapshot's journal ends (0: no record)."""
        return self.records[-1].end if self.records else 0


@dataclass(frozen=True, slots=True)
class Segment:
    """A journal segment that continues the snapshot's journal (``positions.json.journal.next``)."""

    journal: bytes
    header: jf.JournalHeader
    records: tuple[jf.RawRecord, ...]


def _read_journal(path: Path) -> tuple[bytes, jf.JournalHeader]:
    """A journal file's bytes and header (OSError, JournalProblem). Its header's bytes are read first: a blank
    spare ``.next`` (issue 14.3: up to 96 B + 4 MiB of zeros) is not read whole at every pass."""
    jf.parse_header(fs.read_file(path, jf.HEADER_SIZE, max_size=None))
    data = fs.read_file(path, max_size=None)
    return data, jf.parse_header(data)


def _following(journal_path: Path, header: jf.JournalHeader) -> Segment | None:
    """The ``.next`` segment when its header links to *header* (read after the journal: it only grows)."""
    try:
        data, nh = _read_journal(next_path(journal_path))
    except (OSError, jf.JournalProblem):
        return None
    if not nh.follows(header):
        return None
    return Segment(data, nh, tuple(jf.scan(data, nh).records))


def _orphan(journal_path: Path, generation: int | None) -> Segment | None:
    """A ``.next`` segment of a later generation while the journal it continues is missing (issue 15 attack):
    its records were acknowledged, but shipping them without the records before would leave a hole in the
    replica. Never shipped; returned so that the lag counts them (``replica status``, ``replicaLagging``); the
    bot's next load reports the damage."""
    if generation is None or fs.exists(journal_path):
        return None
    try:
        data, nh = _read_journal(next_path(journal_path))
    except (OSError, jf.JournalProblem):
        return None
    if nh.base_generation <= generation:
        return None
    return Segment(data, nh, tuple(jf.scan(data, nh).records))


def read_local(state_path: Path, journal_path: Path) -> LocalFiles:
    """Read the state file, then its journal; a journal of another generation than the snapshot is left out
    (an older one is folded into the snapshot; a newer one means a save ran between the two reads)."""
    try:
        snap = fs.read_file(state_path, max_size=None)
        gen: int | None = _container.parse_header(snap).generation
    except (OSError, _container.FormatProblem):
        return LocalFiles(None, None, None, None, ())
    if not _intact(snap):  # damaged on disk: never shipped (a restore would refuse it); the next save replaces it
        log.warning("%s: damaged on disk (checksum); not shipped to the replica", state_path)
        return LocalFiles(None, None, None, None, ())
    for path in (journal_path, next_path(journal_path)):
        # A background compaction that wrote its snapshot but has not renamed ``.next`` over the journal yet
        # (issue 14): the snapshot's journal is ``.next``, of the snapshot's generation.
        try:
            data, header = _read_journal(path)
        except (OSError, jf.JournalProblem):
            continue
        if header.base_generation != gen:
            continue
        if path != journal_path:
            return LocalFiles(snap, gen, data, header, jf.scan(data, header).records)
        break
    else:
        return LocalFiles(snap, gen, None, None, (), _orphan(journal_path, gen))
    return LocalFiles(snap, gen, data, header, jf.scan(data, header).records, _following(journal_path, header))


def _intact(data: bytes) -> bool:
    """The keyless SHA-256 trailer holds (the file is as its writer wrote it)."""
    recorded = _container.checksum_of(data)
    return recorded is not None and hashlib.sha256(data[: -_container.TRAILER_SIZE]).hexdigest() == recorded


@dataclass(frozen=True, slots=True)
class Shipped:
    """How much of :class:`LocalFiles` a listing shows in the replica."""

    snapshot: _names.Snapshot | None  # the replica's copy of the local snapshot, if any
    journal_offset: int  # bytes of the local journal held by a verified chain of ranges from offset 0
    records_behind: int
    oldest_unshipped_ms: int | None  # time of the oldest record (or the snapshot) not in the replica
    following_offset: int = 0  # bytes of the local ``.next`` segment held by the replica (issue 14)

    def lag_seconds(self, now: float | None = None) -> float:
        if self.oldest_unshipped_ms is None:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - self.oldest_unshipped_ms / 1000)


def compare(local: LocalFiles, snaps: Sequence[_names.Snapshot], ranges: Sequence[_names.Range], *, epoch: int = 0) -> Shipped:
    """Compare *local* with a listing (split by :func:`posstate.replica.names.split`). Only objects shipped under
    fencing *epoch* or later count: a writer that took the lease ships what it restored again under its own
    epoch, so a restore never needs an object of an epoch older than its snapshot's."""
    snaps = [s for s in snaps if s.epoch >= epoch]
    snap = None
    oldest: int | None = None
    if local.snapshot is not None:
        d = _names.digest(local.snapshot)
        snap = next((s for s in reversed(snaps) if s.digest == d and s.generation == local.generation), None)
        if snap is None:
            oldest = _container.parse_header(local.snapshot).written_at_ms
    offset = next_offset = 0
    if local.journal is not None and local.header is not None:
        offset = _shipped(local.journal, local.header.id_hex, ranges, epoch)
    behind = [r for r in local.records if r.end > offset]
    if local.following is not None:
        seg = local.following
        next_offset = _shipped(seg.journal, seg.header.id_hex, ranges, epoch)
        behind += [r for r in seg.records if r.end > next_offset]
    if behind:
        first = min(r.time_ms for r in behind)
        oldest = first if oldest is None else min(oldest, first)
    return Shipped(snap, offset, len(behind), oldest, next_offset)


def _shipped(journal: bytes, journal_id: str, ranges: Sequence[_names.Range], epoch: int) -> int:
    """Bytes of *journal* held by a verified chain of its ranges from offset 0."""
    offset = 0
    for r in _names.chain(ranges, journal_id, floor=(epoch, 0)):
        if r.end > len(journal) or _names.digest(journal[r.start : r.end]) != r.digest:
            break
        offset = r.end
    return offset
