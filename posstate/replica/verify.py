"""``replica verify``: read and check every object of a replica, like ``restic check --read-data``.

Each snapshot is decrypted, the chain of its journal ranges and the segment after it (issue 14) replayed with
the key, each other range checked against its digest. A snapshot's chain is checked with the functions the
restore uses (:mod:`posstate.replica.restore`), so whatever makes ``replica restore`` refuse a chain is a
not-ok row here, naming the object and what to do: a gap in the chain, a range of the chain's own writer with
other bytes than the chain (another history renamed under its name), or, for the snapshot a restore would pick,
journals newer than it (its successor deleted). Not replayed here: the records onto the snapshot (a restore
reads back the directory it wrote).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from posstate.core.errors import PosStateError
from posstate.replica import chains as _chains
from posstate.replica import names as _names
from posstate.replica import restore as _restore
from posstate.replica.client import ReplicaClient
from posstate.storage import statefile as _statefile

Row = dict[str, Any]


class _Read(NamedTuple):
    """What reading one snapshot's chain found (:meth:`_Checker.read`)."""

    records: int  # records of the chain
    differs: _restore.Refusal | None  # a range of its writer with other bytes (read_chain)
    seg: list[_names.Range]  # the segment after it
    seg_records: int
    seg_error: str | None  # why the segment after it fails
    error: str | None  # why the chain fails (then nothing else was read)
    used: list[_names.Range]  # the ranges read: the chain, or the older epochs' chain that continues it


class _Checker:
    """One verify run over one listing: the rows so far and the ranges already reported."""

    def __init__(self, client: ReplicaClient, options: _statefile.ReadOptions) -> None:
        objects = client.list()
        self.client, self.options = client, options
        self.sizes = {o.key: o.size for o in objects}
        self.snaps, self.ranges, self.other = _names.split(o.key for o in objects)
        self.rows: list[Row] = []
        self.used: set[str] = set()
        self._last: tuple[tuple[Any, ...], _Read] | None = None

    def add(self, key: str, ok: bool, reason: str) -> None:
        """One row; a range reported once is not reported again (as merely unused)."""
        if key not in self.used:
            self.rows.append({"key": key, "ok": ok, "reason": reason})
            self.used.add(key)

    def read(self, snap: _names.Snapshot, loaded: _statefile.Loaded, chain: list[_names.Range]) -> _Read:
        """*snap*'s chain and the segment after it (issue 14) downloaded and replayed with the key, as a restore
        reads them; once for snapshots that share them (copies of one snapshot under other names, adjacent in
        the listing's order), so planted names never make verify download a chain again and again."""
        journal = loaded.state.journal or {}
        key = (snap.generation, snap.epoch, repr(sorted(journal.items())), tuple(r.key for r in chain))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            used, jbytes, records, differs = _restore.read_chain(
                self.client, self.ranges, snap, chain, loaded, self.sizes, self.options
            )
        except PosStateError as exc:
            out = _Read(0, None, [], 0, None, str(exc), chain)
        else:
            try:
                seg = _restore.following_chain(self.client, self.ranges, snap, loaded, jbytes, self.sizes)
                _, nrecords = _restore.load_segment(self.client, seg, jbytes, loaded, self.options)
                out = _Read(len(records), differs, seg, len(nrecords), None, None, used)
            except PosStateError as exc:
                out = _Read(len(records), differs, [], 0, f"segment after its journal: {exc}", None, used)
        self._last = (key, out)
        return out

    def refused(self, snap: _names.Snapshot, why: _restore.Refusal) -> None:
        """A not-ok row for the snapshot (the restore's error: what is wrong, what to do) and one for the range
        that shows it."""
        self.rows.append({"key": snap.key, "ok": False, "reason": str(_restore.gap_error(self.client, snap, why.reason))})
        reason = (
            f"`posstate replica restore` of generation {snap.generation} refuses because of this range: {why.reason}; "
            "to restore the state before it: `posstate replica restore --at GENERATION`"
        )
        self.add(why.culprit.key, False, reason)

    def fenced(self, snap: _names.Snapshot, loaded: _statefile.Loaded, chain: list[_names.Range]) -> None:
        """A not-ok row when *snap*'s own journal was shipped only under older epochs than its name's: a restore
        of it uses none of those ranges (fencing) and gives it without their records. A takeover that shipped
        the state it restored under its epoch and stopped before its journal leaves this, and so does a snapshot
        renamed under a higher epoch; the files cannot tell those records from a stale writer's late ones."""
        jid = (loaded.state.journal or {}).get("id")
        old = [r for r in self.ranges if r.journal_id == jid and r.base_generation == snap.generation and r.epoch < snap.epoch]
        if chain or not old:
            return
        reason = (
            f"its journal's ranges were shipped only under an older epoch than its own ({snap.epoch}; {old[0].key}"
            f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}): a restore of it uses none of them and gives "
            f"generation {snap.generation} without their records; find out whether the writer of epoch {snap.epoch} "
            "stopped right after taking over (those records were acknowledged) or the snapshot was renamed"
        )
        self.rows.append({"key": snap.key, "ok": False, "reason": reason})

    def snapshot(self, snap: _names.Snapshot, picked: _names.Snapshot | None) -> None:
        """*snap*, its journal's chain and the segment after it, checked as a restore of it checks them."""
        try:
            _, loaded = _restore.load_snapshot(self.client, snap, self.options)
        except PosStateError as exc:
            self.rows.append({"key": snap.key, "ok": False, "reason": str(exc)})
            return
        self.rows.append({"key": snap.key, "ok": True, "reason": f"generation {snap.generation}, epoch {snap.epoch}"})
        chain = _chains.journal_chain(self.ranges, snap, loaded)
        self.fenced(snap, loaded, chain)
        gap = _restore.gap_after(self.ranges, snap, chain, (loaded.state.journal or {}).get("id"))
        if gap is not None:
            self.refused(snap, gap)
        got = self.read(snap, loaded, chain)
        if got.error is not None:
            for r in chain:
                self.add(r.key, False, got.error)
            return
        if got.seg_error is not None:
            self.rows.append({"key": snap.key, "ok": False, "reason": got.seg_error})
        for r in got.seg:
            self.add(r.key, True, f"segment after the journal of generation {snap.generation}, {got.seg_records} records")
        if got.differs is not None and gap is None:
            self.refused(snap, got.differs)
        if snap == picked and (newer := _chains.newer_than(self.ranges, snap, got.seg)) is not None:
            self.rows.append({"key": snap.key, "ok": False, "reason": str(_restore.orphan_error(self.client, newer, snap))})
            self.add(
                newer.key, False, f"`posstate replica restore` refuses because of this range: {newer.folder} has no snapshot"
            )
        for r in got.used:
            self.add(r.key, True, f"journal of generation {snap.generation}, {got.records} records")


def verify(client: ReplicaClient, *, options: _statefile.ReadOptions) -> list[Row]:
    """Read and check every object: each snapshot decrypted, each journal replayed; one row per object (a
    snapshot whose chain a restore refuses also gets a not-ok row saying why)."""
    check = _Checker(client, options)
    picked: _names.Snapshot | None = None
    try:  # no snapshot: a restore has nothing to restore from, so neither is this replica all ok
        picked = _chains.taken_over(check.snaps, check.ranges) or _restore.choose(
            client, _chains.before_takeover(check.snaps, check.ranges), at_generation=None, at_time=None
        )
    except PosStateError as exc:
        check.rows.append({"key": _names.SNAPSHOTS, "ok": False, "reason": f"`posstate replica restore` refuses: {exc}"})
    for snap in check.snaps:
        check.snapshot(snap, picked)
    for r in check.ranges:
        if r.key in check.used:
            continue
        try:
            _restore.fetch_range(client, r)
            check.add(r.key, True, "not used by any restore (superseded, or its snapshot is gone)")
        except PosStateError as exc:
            check.add(r.key, False, str(exc))
    check.rows.extend({"key": k, "ok": False, "reason": "not a name posstate writes (ignored by restore)"} for k in check.other)
    return check.rows
