"""Which journal file belongs to a snapshot, and what can be read from journal files without a key (ids,
record times, leftover temps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from posstate.core.errors import (
    CorruptStateError,
)
from posstate.journal import format as jf
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)


def journal_file(path: Path, legacy: Path | None, snapshot_journal: dict[str, Any] | None) -> Path:
    """The one place that decides which journal file a load of the snapshot naming *snapshot_journal* reads
    (every reader and writer asks here): *path* (``positions.json.journal``) or the old name *legacy*
    (``positions.journal``, posstate up to 0.1.0).

    Whichever file's header names the snapshot's journal id is the one: the old name only then (another state
    file of the directory, ``positions.dat``, used the same old name). If both name it, the one holding
    records past the snapshot's sequence number; if both do, neither can be chosen without losing
    acknowledged records: CorruptStateError(kind="journal") naming both files. Otherwise *path*.
    Reads headers only, and the records (keyless frames) only when both headers name the snapshot's journal.
    """
    if legacy is None or snapshot_journal is None or not fs.exists(legacy):
        return path
    want = snapshot_journal.get("id")
    if _file_id(legacy) != want:
        return path
    if _file_id(path) != want:
        return legacy  # the new name is missing, damaged, or an older journal: the old name holds the snapshot's
    snap_seq = int(snapshot_journal.get("seq", 0))
    ahead = [p for p in (path, legacy) if _last_framed_seq(p) > snap_seq]
    if len(ahead) == 2:
        raise CorruptStateError(
            path,
            f"both {path.name} and {legacy.name} are journal {want} and both hold records past the snapshot "
            f"(sequence {snap_seq}); neither can be replayed without dropping the other's",
            next_step=f"keep the one the bot last wrote and move the other ({path} or {legacy}) out of the directory",
            kind="journal",
        )
    return ahead[0] if ahead else path


def next_path(path: Path) -> Path:
    """Where the segment a rotation starts is written (``positions.json.journal.next``) while the background
    compaction that will hold the segment before it runs; renamed over *path* once that snapshot is durable."""
    return path.with_name(path.name + ".next")


def is_blank(data: bytes) -> bool:
    """True when *data* (a ``.next`` file's bytes) is all zeros, or empty: a spare segment prepared ahead of time
    and not used yet (posstate/journal/spare.py), or what a crash during its preparation left. No header parses,
    so no reader takes it for a segment; it holds no record (the first record's ``pwrite`` writes the header too,
    and its ``fdatasync`` makes both durable). Removed, never quarantined: there is nothing in it to keep."""
    return data.count(0) == len(data)


#: The most zeros a spare holds after its header: room for the records of a segment of the default
#: ``journal_max_bytes`` (4 MiB), so that no record of it writes zeros ahead on the caller's thread.
SPARE_ZEROS_MAX = 4 * 1024 * 1024
#: The largest blank spare a journal prepares or a crash during its preparation leaves: the header and at most
#: :data:`SPARE_ZEROS_MAX` zeros (``JournalSpare._spare_zeros`` is at most that). A larger all-zero file is not
#: one (and deciding so must not read up to a gigabyte, on the caller's thread at a rotation): it is kept aside.
BLANK_MAX = jf.HEADER_SIZE + SPARE_ZEROS_MAX


def blank_file(path: Path) -> bool:
    """The regular file at *path* is a blank spare: at most :data:`BLANK_MAX` bytes and :func:`is_blank`
    (False if it is missing, larger, not a regular file, a symlink or unreadable: then it is no spare).
    The header's place is read first: a segment (up to ``BLANK_MAX`` bytes too, once started in a spare) or a
    journal is told apart by it without reading up to 4 MiB."""
    try:
        if not is_blank(fs.read_file(path, jf.HEADER_SIZE, max_size=BLANK_MAX)):
            return False
        return is_blank(fs.read_file(path, max_size=BLANK_MAX))
    except OSError:
        return False


def header_of(path: Path) -> jf.JournalHeader | None:
    """The parsed header of the journal at *path* (None: missing, unreadable, or not a journal header)."""
    try:
        return jf.parse_header(fs.read_file(path, jf.HEADER_SIZE))
    except (OSError, jf.JournalProblem):
        return None


def segment_chain(path: Path, legacy: Path | None, snapshot_journal: dict[str, Any] | None) -> list[Path]:
    """The journal files a load replays after the snapshot, in order (issue 14): the file that holds the
    snapshot's journal (:func:`journal_file`, or the ``.next`` segment when a compaction finished but did
    not yet rename it), then the ``.next`` segment when its header links to that one. Reads headers only;
    the caller checks the sequence numbers across the files."""
    first = journal_file(path, legacy, snapshot_journal)
    nxt = next_path(path)
    want = (snapshot_journal or {}).get("id")
    nh = header_of(nxt) if fs.exists(nxt) else None
    if nh is None:
        return [first]
    if want is not None and nh.id_hex == want:
        return [nxt]
    fh = header_of(first)
    if fh is not None and nh.follows(fh):
        return [first, nxt]
    if fh is None and want is not None and nh.prev_link == bytes.fromhex(want)[: jf.LINK_SIZE]:
        return [first, nxt]  # the snapshot's journal has no file (no record past it): the segment follows it
    return [first]


def gap_after_missing(snapshot_journal: dict[str, Any] | None, segment: Path, base_seq: int) -> str | None:
    """The snapshot's own journal file is missing and *segment* (linked to its id) starts at *base_seq*: the
    reason to report when that is past the snapshot's sequence number (the missing file held acknowledged
    records the segment does not), else None. Replaying the segment onto the snapshot would skip them."""
    snap = snapshot_journal or {}
    snap_seq = int(snap.get("seq", 0))
    if base_seq <= snap_seq:
        return None
    span = f"record {snap_seq + 1}" if base_seq == snap_seq + 1 else f"records {snap_seq + 1}-{base_seq}"
    return (
        f"the snapshot's journal {snap.get('id')} is missing, and segment {segment.name} starts after record "
        f"{base_seq}: {span} (acknowledged) are missing"
    )


def journal_files_of(path: Path, legacy: Path | None, snapshot_journals: Sequence[dict[str, Any] | None]) -> list[Path]:
    """The journal files on disk that belong to this state file, for moving aside (recovery, repair, restore):
    *path* if it exists, the ``.next`` segment unless it is a blank spare (:func:`is_blank`), and the old name
    *legacy* when :func:`journal_file` picks it for any of *snapshot_journals* (only then is it ours, not
    another state file's)."""
    found = [p for p in (path, next_path(path)) if fs.exists(p)]
    found = [p for p in found if p == path or not blank_file(p)]  # a blank spare holds nothing: it stays
    if legacy is not None and any(journal_file(path, legacy, j) == legacy for j in snapshot_journals if j is not None):
        found.append(legacy)
    return found


def _file_id(path: Path) -> str | None:
    """The journal id in the header of the file at *path* (None: missing, unreadable or not a journal)."""
    try:
        return _header_id(fs.read_file(path, jf.HEADER_SIZE))
    except OSError:
        return None


def _last_framed_seq(path: Path) -> int:
    """The sequence number of the last intact frame at *path* (keyless; 0 when none can be read)."""
    try:
        data = fs.read_file(path)
        header = jf.parse_header(data)
    except (OSError, jf.JournalProblem):
        return 0
    records = jf.scan(data, header).records
    return records[-1].seq if records else 0


def record_times(*paths: Path | None) -> dict[int, int]:
    """Sequence number -> time (ms) of every record the journals at *paths* frame, read-only and keyless.

    For the stale-backup guard and recovery's threshold: an acknowledged change is as new as its record. The
    times are not authenticated here (a forged later time can only make a backup look older, i.e. refuse
    more restores). Anything unreadable gives what could be read, or nothing.
    """
    times: dict[int, int] = {}
    segs = [next_path(p) for p in paths[:1] if p is not None]
    for path in (*paths, *segs):  # the journal's name, the old name (posstate up to 0.1.0), the next segment
        if path is None:
            continue
        try:
            jf.parse_header(fs.read_file(path, jf.HEADER_SIZE))  # (a blank spare: 96 bytes read, not 4 MiB)
            data = fs.read_file(path)
            header = jf.parse_header(data)
        except (OSError, jf.JournalProblem):
            continue
        for rec in jf.scan(data, header).records:
            if rec.kind != jf.KIND_FOLD:  # a fold record is not a change (journal/fold.py)
                times[rec.seq] = max(rec.time_ms, times.get(rec.seq, 0))
    return times


def _header_id(data: bytes) -> str | None:
    try:
        return jf.parse_header(data).id_hex
    except jf.JournalProblem:
        return None


def _temp_seq(data: bytes, snap_id: str | None) -> int:
    """The sequence number of the record in a journal-creation temp, counted only when the temp's header
    parses and names the snapshot's journal *snap_id* and the number is one a header may name (at most
    ``jf.MAX_BASE``); else 0. Nothing authenticates a temp (anyone can plant one): it may only keep the
    sequence moving forward within what a snapshot holds, never past it. (With a random nonce per record
    the bump is no longer what keeps a nonce unique; it keeps sequence numbers from being handed out twice.)"""
    try:
        header = jf.parse_header(data)
    except jf.JournalProblem:
        return 0
    if snap_id is None or header.id_hex != snap_id:
        return 0
    start = jf.HEADER_SIZE + header.frame_head
    if len(data) < start + 8:
        return 0
    seq = int.from_bytes(data[start : start + 8], "big")
    return seq if seq <= jf.MAX_BASE else 0
