"""Restore anywhere: rebuild a state directory from a replica, verifying every object on the way. The checks
that decide whether a snapshot's chain can be restored (:func:`gap_after`, :func:`read_chain`,
:func:`posstate.replica.chains.newer_than`) are shared with ``verify.py``, so verify never passes a chain
this module refuses.

A restore takes the newest snapshot (the highest fencing epoch first, then the highest generation; or the
newest at or before ``--at``), checks its bytes against the digest in its name and decrypts it with the key
(AES-GCM: the bucket cannot forge one), then the journal ranges of the journal it names, chained from offset 0
(:func:`posstate.replica.names.chain`), each checked against its digest, and all of them replayed with the key
(every record authenticated and chained to the one before). Anything that fails is an error naming the
object: nothing is written then. The files are written as posstate writes every file, then read back as a
load would (snapshot + journal) before the restore reports success.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from posstate.core.config import StateConfig
from posstate.core.errors import CorruptStateError, StateNotFoundError
from posstate.journal import format as jf
from posstate.journal.current import read_current
from posstate.journal.files import blank_file, next_path
from posstate.journal.records import read_records
from posstate.replica import chains as _chains
from posstate.replica import names as _names
from posstate.replica import segment as _segment
from posstate.replica.chains import journal_chain, newer_than
from posstate.replica.client import ReplicaClient
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

log = logging.getLogger("posstate")


@dataclass(frozen=True, slots=True)
class RestoreResult:
    url: str
    state_file: str
    snapshot: str
    snapshot_generation: int
    generation: int
    records: int
    objects: int
    bytes: int
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _where(client: ReplicaClient, key: str) -> str:
    return f"{client.url.rstrip('/')}/{key}"


_OLDER = "do not use this object; restore an older snapshot with `posstate replica restore --at GENERATION`"


def fetch(client: ReplicaClient, key: str, want: str) -> bytes:
    data = client.get(key)
    if _names.digest(data) != want:
        raise CorruptStateError(
            _where(client, key),
            "content differs from the SHA-256 in its name (changed or damaged after upload)",
            next_step=_OLDER,
        )
    return data


def fetch_range(client: ReplicaClient, r: _names.Range) -> bytes:
    """A journal range, checked against its digest and against the size its name gives (end - start)."""
    data = fetch(client, r.key, r.digest)
    if len(data) != r.end - r.start:
        raise CorruptStateError(
            _where(client, r.key), f"holds {len(data)} bytes, its name says {r.end - r.start}", next_step=_OLDER
        )
    return data


def load_snapshot(
    client: ReplicaClient, snap: _names.Snapshot, options: _statefile.ReadOptions
) -> tuple[bytes, _statefile.Loaded]:
    """Download, check and decrypt one snapshot (WrongKeyError, CorruptStateError, ... name the object)."""
    data = fetch(client, snap.key, snap.digest)
    loaded = _statefile.parse(data, path=Path(_where(client, snap.key)), options=options)
    if loaded.state.generation != snap.generation:
        raise CorruptStateError(
            _where(client, snap.key), f"holds generation {loaded.state.generation}, its name says {snap.generation}"
        )
    return data, loaded


class Beyond(NamedTuple):
    """What lies past a chain's end (:func:`_beyond`)."""

    end: int  # the chain's end offset
    low: tuple[int, int]  # the oldest writer (epoch, session) of its last range's bytes
    after: list[_names.Range]  # its journal's ranges by a writer no older than *low* that end past *end*


class Refusal(NamedTuple):
    """Why a restore refuses a snapshot's chain, and the object that shows it (verify names both)."""

    reason: str
    culprit: _names.Range


def _beyond(ranges: list[_names.Range], snap: _names.Snapshot, chain: list[_names.Range], jid: str | None) -> Beyond:
    """The chain's end, the oldest writer of its last range's bytes, and its journal's ranges by a writer no
    older than that one that end beyond it."""
    end = chain[-1].end if chain else 0
    low = (snap.epoch, 0)
    if jid and chain:  # the oldest writer of the last range's bytes (a copy under a higher name hides nothing)
        last = chain[-1]
        low = min(
            r.writer
            for r in ranges
            if r.journal_id == jid and (r.start, r.end, r.digest) == (last.start, last.end, last.digest) and r.writer >= low
        )
    after = [
        r for r in ranges if r.journal_id == jid and r.base_generation == snap.generation and r.writer >= low and r.end > end
    ]
    return Beyond(end, low, after if jid else [])


def gap_after(
    ranges: list[_names.Range], snap: _names.Snapshot, chain: list[_names.Range], jid: str | None, data: bytes | None = None
) -> Refusal | None:
    """Why the chain ends early (None: it does not): a range of its journal by a writer no older than its last
    one lies beyond its end, so one there is missing. Superseded ranges of older sessions are not a gap; nor,
    with *data* (the chain's bytes), copies of them (:func:`posstate.replica.names.rewritten`)."""
    if (lost := _chains.stranded(ranges, chain, floor=(snap.epoch, 0))) is not None:  # a takeover's copy cut off
        return Refusal(*lost)
    if (skipped := _names.rewritten(ranges, chain, floor=(snap.epoch, 0), data=data)) is not None:
        return Refusal(
            f"journal range at byte {skipped.start:016x} missing: a newer writer rewrote from there ({skipped.key})", skipped
        )
    end, _, after = _beyond(ranges, snap, chain, jid)
    if not after:
        return None
    return Refusal(
        f"journal range at byte {end:016x} missing: the replica holds later ranges ({after[0].key}) but none starting there",
        after[0],
    )


def orphan_error(client: ReplicaClient, newer: _names.Range, snap: _names.Snapshot) -> CorruptStateError:
    return CorruptStateError(
        _where(client, newer.folder),
        f"journal of generation {newer.base_generation} without its snapshot (deleted, or not listed yet): "
        f"the newest snapshot listed, generation {snap.generation}, is older than the replica's state",
        next_step=f"retry later; to restore that older state anyway: `posstate replica restore --at {snap.generation}`",
    )


def read_chain(
    client: ReplicaClient,
    ranges: list[_names.Range],
    snap: _names.Snapshot,
    chain: list[_names.Range],
    loaded: _statefile.Loaded,
    sizes: dict[str, int],
    options: _statefile.ReadOptions,
) -> tuple[list[_names.Range], bytes, list[tuple[jf.RawRecord, list[Any]]], Refusal | None]:
    """The chain read as a restore reads it: its listed size bounded (a chain of planted ranges is never
    downloaded into memory), each range checked, every record authenticated (errors name the object); the
    older epochs' chain instead when it continues a takeover's copy (:func:`posstate.replica.chains.extend`);
    and a range of its journal inside it whose bytes differ from the chain's there (another history renamed
    under its writer's name), or a gap in the older chain, which fails a restore unless :func:`gap_after`
    already refused it. Returns the ranges used, their bytes, their records and that refusal."""

    def load(used: list[_names.Range]) -> tuple[bytes, list[tuple[jf.RawRecord, list[Any]]]]:
        # each range must hold end - start bytes (fetch_range): its name bounds it, whatever the listing says
        listed = max(sum(sizes.get(r.key, 0) for r in used), used[-1].end if used else 0)
        if listed > fs.DEFAULT_MAX_READ_BYTES:
            raise CorruptStateError(
                _where(client, used[0].folder),
                f"the journal's ranges hold {listed} bytes, more than a journal posstate reads ({fs.DEFAULT_MAX_READ_BYTES})",
                next_step="`posstate replica verify` names the objects; restore an older snapshot with --at GENERATION",
            )
        return load_journal(client, used, loaded, options)

    jbytes, records = load(chain)
    used, jbytes, records = _chains.extend(
        ranges, chain, jbytes, records, floor=(snap.epoch, 0), load=load, where=_where(client, snap.key)
    )
    if used is not chain:  # the older epochs' chain: its own gaps, and ranges that are neither it nor a copy
        return used, jbytes, records, gap_after(ranges, snap, used, used[0].journal_id, data=jbytes)
    if (skipped := _names.rewritten(ranges, chain, floor=(snap.epoch, 0), data=jbytes)) is None:
        return chain, jbytes, records, None
    return chain, jbytes, records, Refusal(f"journal range {skipped.key} holds other bytes than the chain there", skipped)


def load_journal(
    client: ReplicaClient, chain: list[_names.Range], loaded: _statefile.Loaded, options: _statefile.ReadOptions
) -> tuple[bytes, list[tuple[jf.RawRecord, list[Any]]]]:
    """The snapshot's journal as the chain of its ranges: downloaded, checked, every record authenticated."""
    jid = (loaded.state.journal or {}).get("id")
    if not chain:
        return b"", []
    data, header, records = _read_ranges(client, chain, options)
    where = Path(_where(client, chain[0].folder))
    if header.id_hex != jid or header.base_generation != loaded.state.generation:
        raise CorruptStateError(where, f"journal {header.id_hex} does not follow snapshot generation {loaded.state.generation}")
    return data, records


def following_chain(
    client: ReplicaClient,
    ranges: list[_names.Range],
    snap: _names.Snapshot,
    loaded: _statefile.Loaded,
    jbytes: bytes,
    sizes: dict[str, int],
) -> list[_names.Range]:
    """The ranges of the segment that continues the snapshot's journal, or [] (:func:`posstate.replica.segment.following`:
    issue 14's ``.next`` segment; never a stale writer's late one after a takeover, session 12)."""
    return _segment.following(
        ranges,
        snap,
        loaded.state.journal or {},
        jbytes,
        sizes,
        head=lambda r: fetch(client, r.key, r.digest),
        where=lambda key: _where(client, key),
    )


def load_segment(
    client: ReplicaClient, seg: list[_names.Range], jbytes: bytes, loaded: _statefile.Loaded, options: _statefile.ReadOptions
) -> tuple[bytes, list[tuple[jf.RawRecord, list[Any]]]]:
    """The segment :func:`following_chain` found: downloaded, checked, every record authenticated."""
    if not seg:
        return b"", []
    data, _, records = _read_ranges(client, seg, options)
    return data, records


def _read_ranges(
    client: ReplicaClient, ranges: list[_names.Range], options: _statefile.ReadOptions
) -> tuple[bytes, jf.JournalHeader, list[tuple[jf.RawRecord, list[Any]]]]:
    """Download *ranges* (each checked against its digest), join them, authenticate every record; a damaged
    record is named by the object that holds it."""
    data = b"".join(fetch_range(client, r) for r in ranges)
    where = Path(_where(client, ranges[0].folder))
    header, records, sc = read_records(data, path=where, keyring=options.keyring, require_encryption=options.require_encryption)
    if sc.bad_offset is not None:
        bad = next(r for r in ranges if r.start <= sc.bad_offset < r.end)
        raise CorruptStateError(_where(client, bad.key), f"record at byte {sc.bad_offset} is damaged ({sc.bad_reason})")
    if sc.good_end != len(data):  # ranges are cut at record ends: bytes past the last record (zeros) are planted
        bad = next(r for r in ranges if r.start <= sc.good_end < r.end)
        raise CorruptStateError(
            _where(client, bad.key), f"no whole record from byte {sc.good_end} to its end ({bad.end})", next_step=_OLDER
        )
    return data, header, records


def _cut(
    data: bytes, records: list[tuple[jf.RawRecord, list[Any]]], at_generation: int | None, at_time: datetime | None
) -> tuple[bytes, int, bool]:
    """*data* cut before the first record past ``--at``: (bytes, records kept, whether none was cut)."""
    kept = 0
    for rec, ops in records:
        revs = [int(op.json["rev"]) for op in ops]
        if (at_generation is not None and max(revs, default=0) > at_generation) or (
            at_time is not None and rec.time_ms > at_time.timestamp() * 1000
        ):
            return data[: rec.offset], kept, False
        kept += 1
    return data, kept, True


def _reaches(records: list[tuple[jf.RawRecord, list[Any]]], at_generation: int | None, beyond: Beyond) -> bool:
    """The last of *records* makes exactly generation *at_generation*, and every range past the gap (*beyond*) is
    the chain's last writer's and starts past its end, so the missing ones continue its records."""
    if at_generation is None or not records or any(r.writer != beyond.low or r.start < beyond.end for r in beyond.after):
        return False
    return max((int(op.json["rev"]) for op in records[-1][1]), default=0) == at_generation


def choose(
    client: ReplicaClient, snaps: list[_names.Snapshot], *, at_generation: int | None, at_time: datetime | None
) -> _names.Snapshot:
    cands = [s for s in snaps if at_generation is None or s.generation <= at_generation]
    if at_time is not None:
        from posstate.storage import container as _container

        stamp = at_time.timestamp() * 1000
        for s in reversed(cands):
            head = _container.parse_header(fetch(client, s.key, s.digest))
            if head.written_at_ms <= stamp:
                return s
        cands = []
    if not cands:
        raise StateNotFoundError(
            client.url,
            what="snapshot in the replica" + (" at or before that point" if at_generation is not None or at_time else ""),
            next_step="list what the replica holds with `posstate replica list`",
        )
    newest = max(s.order[0] for s in cands)  # the newest fencing epoch, then its newest generation
    return max((s for s in cands if s.epoch == newest), key=lambda s: (s.generation, s.session))


def gap_error(client: ReplicaClient, snap: _names.Snapshot, gap: str) -> CorruptStateError:
    return CorruptStateError(
        _where(client, snap.key),
        gap,
        next_step="retry later; to restore the state before the gap: `posstate replica restore --at GENERATION` "
        "(a generation before it; `posstate replica verify` names the ranges)",
    )


def restore(
    client: ReplicaClient,
    config: StateConfig,
    *,
    options: _statefile.ReadOptions,
    at_generation: int | None = None,
    at_time: datetime | None = None,
    replace: bool = False,
) -> RestoreResult:
    """Rebuild *config*'s state directory from the replica. The directory must hold no state file or journal
    (``replace``: move them to quarantine first; the lease takeover does)."""
    nxt = next_path(config.journal_path)
    existing = [p for p in (config.state_path, config.journal_path, nxt, config.bak_path) if fs.exists(p)]
    existing = [p for p in existing if p != nxt or not blank_file(p)]  # a blank spare (issue 14.3) holds nothing
    if existing and not replace:
        raise CorruptStateError(
            existing[0],
            "the state directory is not empty",
            next_step="restore into an empty directory (--state-dir)",
            kind="exists",
        )
    objects = client.list()
    sizes = {o.key: o.size for o in objects}
    snaps, ranges, _ = _names.split(sizes)
    latest = at_generation is None and at_time is None  # after a takeover that died: not a stale writer's late one
    snap = (latest and _chains.taken_over(snaps, ranges)) or choose(
        client, _chains.before_takeover(snaps, ranges), at_generation=at_generation, at_time=at_time
    )
    data, loaded = load_snapshot(client, snap, options)
    chain = journal_chain(ranges, snap, loaded)
    jid = (loaded.state.journal or {}).get("id")
    gap = gap_after(ranges, snap, chain, jid)
    if gap is not None and latest:
        raise gap_error(client, snap, gap.reason)
    chain, jbytes, records, other = read_chain(client, ranges, snap, chain, loaded, sizes, options)
    if other is not None and gap is None:
        raise gap_error(client, snap, other.reason)
    seg = following_chain(client, ranges, snap, loaded, jbytes, sizes) if gap is None else []
    if latest and (newer := newer_than(ranges, snap, seg)) is not None:
        raise orphan_error(client, newer, snap)
    nbytes, nrecords = load_segment(client, seg, jbytes, loaded, options)
    used = 1 + len(chain) + len(seg)
    kept = nkept = 0
    jbytes, kept, whole = _cut(jbytes, records, at_generation, at_time)
    if other is not None and len(jbytes) > other.culprit.start:  # --at past where the newer writer's history began
        raise gap_error(client, snap, f"journal range {other.culprit.key}: another history from there (its first range missing)")
    if whole:
        if gap is not None and not _reaches(records, at_generation, _beyond(ranges, snap, chain, jid)):
            raise gap_error(client, snap, gap.reason)
        nbytes, nkept, _ = _cut(nbytes, nrecords, at_generation, at_time)
    fs.ensure_dir(config.state_dir)
    for p in existing:
        _atomic.move_aside(p, config.quarantine_dir, label="before-replica-restore")
    # The journal first, the state file last: a restore killed in between leaves a journal without its
    # state file, which no manager opens (loud), never a state file that opens without the journal's changes.
    if jbytes and kept:
        _atomic.write_file(config.journal_path, jbytes)
    if nbytes and nkept:  # replayed after the journal, as a load replays an unfinished compaction's segments
        _atomic.write_file(next_path(config.journal_path), nbytes)
    _atomic.write_file(config.state_path, data)
    current = read_current(config, options)
    if current.error is not None:
        raise current.error
    return RestoreResult(
        url=client.url,
        state_file=str(config.state_path),
        snapshot=snap.key,
        snapshot_generation=snap.generation,
        generation=current.generation,
        records=current.applied,
        objects=used,
        bytes=len(data) + (len(jbytes) if kept else 0) + (len(nbytes) if nkept else 0),
        epoch=snap.epoch,
    )
