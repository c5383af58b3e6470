"""Which journal ranges make a snapshot's journal, beyond the names alone: a lease takeover's copy of the journal
it restored (docs/REPLICATION.md, "Takeovers that stop midway").

A writer that takes the lease restores the replica's journal and ships it again under its own epoch, byte for
byte, cut where its own batches end (not where the old holder's did), then its snapshot. When it dies after
some of those ranges, :func:`posstate.replica.names.chain` follows its newer epoch and stops where its copy
stops: the old holder's ranges for the rest are older, exactly what a stale writer's late ones look like by
name. Their bytes tell them apart: :func:`extend` uses the older epochs' chain instead when every range of a
newer epoch in that journal holds the same bytes as it there (a verbatim copy of its start). A stale writer's
late range begins where the new holder's own records begin in the journal, so a newer range there holds other
bytes and the older chain is not used; and a bucket writer without the key gains nothing it lacks already (it
can name a copy of any range under any epoch; every record is still authenticated and chained at restore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from posstate.core.errors import CorruptStateError
from posstate.journal import format as jf
from posstate.replica import names as _names
from posstate.storage import statefile as _statefile

Records = list[tuple[jf.RawRecord, list[Any]]]
Load = Callable[[list[_names.Range]], tuple[bytes, Records]]

#: How many older epochs' chains :func:`extend` reads to continue one chain: a takeover that died midway
#: leaves one each; copies planted under falling epochs, one record longer each, would make it one per record.
MAX_OLDER_CHAINS = 8


def journal_chain(ranges: list[_names.Range], snap: _names.Snapshot, loaded: _statefile.Loaded) -> list[_names.Range]:
    """The ranges of the journal the snapshot names, shipped under its fencing epoch or later (a stale
    writer's late objects of an older epoch are never used), as their names chain them."""
    jid = (loaded.state.journal or {}).get("id")
    if not jid:
        return []
    return [r for r in _names.chain(ranges, str(jid), floor=(snap.epoch, 0)) if r.base_generation == snap.generation]


def newer_than(ranges: list[_names.Range], snap: _names.Snapshot, seg: list[_names.Range]) -> _names.Range | None:
    """A journal range of a later generation than *snap* shipped under its epoch or later (and no older than
    the newest epoch of any range: a stale writer's late journal after a takeover is not the replica's state),
    outside the segment *seg* that continues its journal: the snapshot it follows (shipped before it) is gone
    from the listing, so *snap* is not the newest state."""
    skip = {s.journal_id for s in seg}
    low = max([snap.epoch, *(r.epoch for r in ranges)])
    return next((r for r in ranges if r.journal_id not in skip and r.base_generation > snap.generation and r.epoch >= low), None)


def _takeover(snaps: Sequence[_names.Snapshot], ranges: Sequence[_names.Range]) -> tuple[int, int] | None:
    """(epoch, generation) of a takeover that died before shipping its snapshot: the newest epoch of journal
    ranges newer than every snapshot, and the generation its ranges follow. None when there are none."""
    if not snaps or not (newer := [r for r in ranges if r.epoch > max(s.epoch for s in snaps)]):
        return None
    epoch = max(r.epoch for r in newer)
    return epoch, min(r.base_generation for r in newer if r.epoch == epoch)


def taken_over(snaps: Sequence[_names.Snapshot], ranges: Sequence[_names.Range]) -> _names.Snapshot | None:
    """The snapshot a restore of the newest state starts from when journal ranges of a newer epoch than every
    snapshot's exist (a takeover that died before shipping its snapshot): the newest, by epoch, of the
    generation those ranges' journal follows. None when there are none (or no such snapshot). Picking the
    newest snapshot by name instead would take a stale writer's late snapshot (an older epoch, a later
    generation, saved after the takeover) over the new holder's shipped records."""
    if (found := _takeover(snaps, ranges)) is None:
        return None
    epoch, base = found
    return max((s for s in snaps if s.generation == base and s.epoch <= epoch), key=lambda s: s.order, default=None)


def before_takeover(snaps: Sequence[_names.Snapshot], ranges: Sequence[_names.Range]) -> list[_names.Snapshot]:
    """The snapshots a restore ``--at`` may pick: after a takeover that died before shipping its snapshot, not
    those of a later generation than the one its journal follows (a stale writer's late snapshots, saved after
    the takeover: picked by name, ``--at`` at or past one gave the old holder's history instead of the new
    holder's shipped records, session 12)."""
    found = _takeover(snaps, ranges)
    return [s for s in snaps if found is None or s.generation <= found[1]]


def older(ranges: Sequence[_names.Range], used: Sequence[_names.Range], *, floor: tuple[int, int]) -> list[list[_names.Range]]:
    """The chains of *used*'s journal by the writers of epochs older than the newest in *used* (and no older
    than *floor*) that reach past *used*'s end: for each such epoch, newest first, the chain of the ranges of
    that epoch and older ones (each chain once). One chain over all of them is not enough: a chain by names
    never goes back to an older writer whose cuts differ, so a second takeover's partial copy (epoch 2, cut
    elsewhere than the first holder's ranges) would hide the first holder's chain that goes further. With more
    than :data:`MAX_OLDER_CHAINS` older epochs, only the newest of them and the oldest are tried."""
    if not used:
        return []
    top, end = max(r.epoch for r in used), used[-1].end
    jid, base = used[0].journal_id, used[0].base_generation
    mine = [r for r in ranges if r.epoch < top and r.journal_id == jid and r.base_generation == base and r.writer >= floor]
    out: list[list[_names.Range]] = []
    epochs = sorted({r.epoch for r in mine}, reverse=True)
    # each epoch's chain costs a pass over the ranges: planted ranges under thousands of epochs would make it
    # quadratic (a hang), so only the newest few and the oldest (the holder whose journal it is) are tried
    for epoch in [*epochs[:MAX_OLDER_CHAINS], *epochs[-1:]] if len(epochs) > MAX_OLDER_CHAINS else epochs:
        alt = _names.chain([r for r in mine if r.epoch <= epoch], jid, floor=floor)
        if alt and alt[-1].end > end and alt not in out:
            out.append(alt)
    return out


def not_a_copy(
    ranges: Sequence[_names.Range], used: Sequence[_names.Range], data: bytes, *, floor: tuple[int, int]
) -> _names.Range | None:
    """The first range of *used*'s journal, of an epoch newer than every range of *used*, whose bytes are not
    *data*'s there (None: every such range is a copy of a part of *data*)."""
    top = max(r.epoch for r in used)
    jid, base = used[0].journal_id, used[0].base_generation
    newer = [r for r in ranges if r.journal_id == jid and r.base_generation == base and r.writer >= floor and r.epoch > top]
    return next(
        (
            r
            for r in sorted(newer, key=lambda r: r.start)
            if r.end > len(data) or _names.digest(data[r.start : r.end]) != r.digest
        ),
        None,
    )


def stranded(
    ranges: Sequence[_names.Range], used: Sequence[_names.Range], *, floor: tuple[int, int]
) -> tuple[str, _names.Range] | None:
    """Why *used* ends early, and the range that shows it: a range of its journal of an older epoch than the
    newest in *used* (no older than *floor*) ends past its end while the older epochs' chain does not reach
    there (the range that joins a takeover's copy to the old holder's later ranges is missing). None when the
    older chain reaches past *used* (then :func:`extend` used it, or it is another history)."""
    if not used or older(ranges, used, floor=floor):
        return None
    top, end = max(r.epoch for r in used), used[-1].end
    jid, base = used[0].journal_id, used[0].base_generation
    past = [
        r
        for r in ranges
        if r.journal_id == jid and r.base_generation == base and r.writer >= floor and r.epoch < top and r.end > end
    ]
    if not past:
        return None
    lost = min(past, key=lambda r: r.start)
    return f"journal range at byte {end:016x} missing: an older epoch's ranges continue the journal past it ({lost.key})", lost


def extend(
    ranges: Sequence[_names.Range],
    used: list[_names.Range],
    data: bytes,
    records: Records,
    *,
    floor: tuple[int, int],
    load: Load,
    where: str,
) -> tuple[list[_names.Range], bytes, Records]:
    """*used* (a chain by names, read as *data* and *records*), or the older epochs' chain of its journal that
    continues it: read with *load* (every record authenticated; its errors name the object, and stop the
    restore), used when *data* is its start and every newer epoch's range of the journal is a copy of its bytes
    (a takeover that stopped midway). Each step goes to strictly older epochs and strictly further; at most
    :data:`MAX_OLDER_CHAINS` chains are read (planted copies under many epochs, each a little longer, would make it
    read the journal once per record)."""
    loads = 0
    while True:
        for alt in older(ranges, used, floor=floor):
            if (loads := loads + 1) > MAX_OLDER_CHAINS:
                raise CorruptStateError(
                    where,
                    f"more than {MAX_OLDER_CHAINS} older epochs' chains of journal {alt[0].journal_id} continue its "
                    "chain (takeovers that died midway leave one each; copies planted in the bucket, more)",
                    next_step="`posstate replica verify` names the ranges; restore an older snapshot with --at GENERATION",
                )
            more, recs = load(alt)
            if more.startswith(data) and not_a_copy(ranges, alt, more, floor=floor) is None:
                used, data, records = alt, more, recs
                break
        else:  # none continues it (another history from where they differ: the newer epoch's wins)
            return used, data, records
