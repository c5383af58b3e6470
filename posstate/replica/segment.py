"""The segment that continues a snapshot's journal in a replica (issue 14: the ``.next`` segment of a background
compaction whose snapshot never reached the replica), and whose segment it may be after a lease takeover.

A segment's header names the journal it continues (the first 12 bytes of its id) and the last sequence number
before its first record; neither names the records themselves. After a takeover, a stale writer's late segment
(the old holder rotated its journal after the new holder took over, and a PUT in flight uploaded it under the
old epoch) links to the very journal the new holder's records continue, and when the new holder wrote as many
records as the old one had before rotating, it starts right after the chain's last record too. Replaying it
there gives a state no writer ever had: the new holder's records, then the old holder's later ones, without the
old holder's records in between (session 12). So a segment follows the chain only when its writer held every
byte the chain replays: ranges of its epoch or an older one hold them all (:func:`held_by`; a takeover's copy of
the old holder's journal holds the old holder's bytes, its own records do not). Of two segments that qualify, the
newest writer's is replayed (the other is a stale writer's, ignored as every stale object is), never the one
whose id happens to sort first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posstate.core.errors import CorruptStateError
from posstate.journal import format as jf
from posstate.replica import names as _names
from posstate.storage import fileops as fs

Head = Callable[[_names.Range], bytes]  # a range's first bytes (checked against its digest)
Where = Callable[[str], str]  # an object's address, for errors


def held_by(ranges: list[_names.Range], jid: str, base: int, data: bytes, *, floor: tuple[int, int], epoch: int) -> bool:
    """Every byte of *data* (journal *jid* of generation *base* as a restore replays it) is held, from offset 0
    to its end, by ranges of that journal shipped under *epoch* or older (no older than *floor*): a writer of
    *epoch* had exactly these records. Each range is hashed at most once, and none when no range of the journal
    is newer than *epoch*."""
    mine = [r for r in ranges if r.journal_id == jid and r.base_generation == base and r.writer >= floor]
    if not data or all(r.epoch <= epoch for r in mine):
        return True
    reach = {0}
    for r in sorted(mine, key=lambda r: r.start):
        if r.epoch <= epoch and r.start in reach and r.end <= len(data) and _names.digest(data[r.start : r.end]) == r.digest:
            reach.add(r.end)
    return len(data) in reach


def following(
    ranges: list[_names.Range],
    snap: _names.Snapshot,
    journal: dict[str, Any],
    jbytes: bytes,
    sizes: dict[str, int],
    *,
    head: Head,
    where: Where,
) -> list[_names.Range]:
    """The ranges of the segment that continues the snapshot's journal (*journal*: its ``"journal"`` entry;
    *jbytes*: that journal as the restore replays it), or []: a journal of a later generation, shipped under
    the snapshot's epoch or later, whose header (in its first range) links to the snapshot's journal, that
    starts after the chain's last record, and whose writer held the chain's bytes (:func:`held_by`); the newest
    writer's first. Only the first range of each candidate is downloaded (*head*), and only when the
    candidate's ranges and the journal before it are listed at no more than a journal posstate reads (planted
    huge ranges are refused before any byte of them is downloaded)."""
    jid = journal.get("id")
    if not isinstance(jid, str):
        return []
    try:
        prev: jf.JournalHeader | bytes = jf.parse_header(jbytes) if jbytes else bytes.fromhex(jid)
    except (jf.JournalProblem, ValueError):
        return []
    # The segment starts after the last record of the journal (rotation): one starting later follows records
    # the chain lacks (its last range deleted), and replaying it would skip them silently (session 11).
    if isinstance(prev, jf.JournalHeader):
        recs = jf.scan(jbytes, prev).records
        last = recs[-1].seq if recs else prev.base_seq
    else:
        last = int(journal.get("seq", 0))
    groups: dict[str, list[_names.Range]] = {}  # each journal's ranges: one pass over the listing, not one per candidate
    newest: dict[str, tuple[int, int]] = {}
    for r in ranges:
        groups.setdefault(r.journal_id, []).append(r)
        if r.base_generation > snap.generation and r.epoch >= snap.epoch and r.journal_id != jid:
            newest[r.journal_id] = max(newest.get(r.journal_id, r.writer), r.writer)
    held: dict[int, bool] = {}
    for cand in sorted(newest, key=lambda c: (newest[c], c), reverse=True):
        seg = _names.chain(groups[cand], cand, floor=(snap.epoch, 0))
        if not seg:
            continue
        listed = len(jbytes) + max(sum(sizes.get(r.key, 0) for r in seg), seg[-1].end)
        if listed > fs.DEFAULT_MAX_READ_BYTES:
            raise CorruptStateError(
                where(seg[0].folder),
                f"the journal's ranges and the segment after it hold {listed} bytes, more than a journal posstate "
                f"reads ({fs.DEFAULT_MAX_READ_BYTES})",
                next_step="`posstate replica verify` names the objects; restore an older snapshot with --at GENERATION",
            )
        top = max(r.epoch for r in seg)
        if top not in held:
            held[top] = held_by(groups.get(jid, []), jid, snap.generation, jbytes, floor=(snap.epoch, 0), epoch=top)
        if not held[top]:
            continue  # a stale writer's segment: it follows records other than the chain's (session 12)
        try:
            first = jf.parse_header(head(seg[0])[: jf.HEADER_SIZE])
        except jf.JournalProblem:
            continue
        linked = first.follows(prev) if isinstance(prev, jf.JournalHeader) else first.prev_link == prev[: jf.LINK_SIZE]
        ends = first.base_seq == last if isinstance(prev, jf.JournalHeader) else first.base_seq <= last
        if linked and ends and first.id_hex == cand and all(r.base_generation == first.base_generation for r in seg):
            return seg
    return []
