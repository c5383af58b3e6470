"""Session 12 attack: a stale writer's late ``.next`` segment after a lease takeover. B takes the lease
(epoch 2), ships the journal it restored and its own records under epoch 2 and dies before its snapshot; the old
holder A (epoch 1), paused with records it never shipped, wakes up, rotates its journal into a ``.next``
segment (a background compaction) and its shipper uploads the segment late, under epoch 1. The segment's header
links to the journal B's records continue, and when B wrote as many records as A had before rotating it starts
at B's last sequence number too: the restore replayed it after B's records, a state no writer ever had (B's
record, then A's later change, without A's change before it), and verify called it all ok. Run against moto's
S3 server over HTTP and against the file client."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from replica_util import client, held, options, pos, rcfg, restore_into
from test_background_compaction import held as gate_held

from posstate import PositionStateManager, StateConfig
from posstate.journal import format as jf
from posstate.journal.files import next_path
from posstate.replica import names as _names
from posstate.replica.shipper import Shipper
from posstate.replica.verify import verify

B_HISTORY = {"S0/USDT": 1, "S1/USDT": 1, "B/USDT": 1}  # what B restored (A's two records) and its own record


@pytest.fixture(params=["file", "s3"])
def replica(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    """The replica's URL and endpoint: a directory, or a bucket of moto's S3 server on 127.0.0.1."""
    if request.param == "file":
        return f"file://{tmp_path}/rep", None
    s3 = request.getfixturevalue("s3_server")
    return s3.bucket(), s3.url


def _shipped_to(cfg: StateConfig) -> tuple[str, int]:
    """The journal B's last record is in (the ``.next`` segment when its change rotated) and where it ends."""
    from posstate.replica.local import read_local

    local = read_local(cfg.state_path, cfg.journal_path)
    if local.following is not None and local.following.records:
        return local.following.header.id_hex, local.following.records[-1].end
    assert local.header is not None and local.records
    return local.header.id_hex, local.records[-1].end


def _takeover_dies(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, url: str, endpoint: str | None, *, b_rotates: bool = False
) -> None:
    """A (epoch 1) ships S0 and S1, is copied to ``late`` (the old holder as it goes on after a pause) and
    paused (for one TTL, in virtual time: tests/lease_time.py); B takes the lease (epoch 2), ships A's journal
    again and writes ``B/USDT``, into that journal or (*b_rotates*) into the ``.next`` segment its first change
    rotates to, ships it and dies before its snapshot (every epoch-2 snapshot upload fails)."""
    from lease_time import lease_time
    from test_replica_lease import _open_when_free

    clock = lease_time(monkeypatch)
    kind = type(client(url, endpoint))
    a = PositionStateManager(rcfg(tmp_path / "a", url, endpoint, replica_lease=True, replica_lease_ttl=2.0), key=key)
    try:
        for symbol in ("S0/USDT", "S1/USDT"):
            a.set_position(pos(symbol))
        assert a.flush_replica(30)
        shutil.copytree(tmp_path / "a", tmp_path / "late")
        a_lease = a._replica.lease  # type: ignore[union-attr]
        assert a_lease is not None
        a_lease._stop.set()  # paused: no more renewals
        clock.skip(2.0)  # ... for one TTL
        real = kind.put
        shipped: list[tuple[str, int]] = []  # (journal, end) of B's ranges
        shipping = threading.Condition()

        def put(self: Any, name: str, data: bytes, **kw: Any) -> Any:
            found = _names.parse(name)
            if isinstance(found, _names.Snapshot) and found.epoch == 2:
                raise OSError(5, "the machine dies here")
            out = real(self, name, data, **kw)
            if isinstance(found, _names.Range) and found.epoch == 2:
                with shipping:
                    shipped.append((found.journal_id, found.end))
                    shipping.notify_all()
            return out

        monkeypatch.setattr(kind, "put", put)
        more = {"journal_max_records": 2} if b_rotates else {}
        cfg = rcfg(tmp_path / "b", url, endpoint, replica_lease=True, replica_lease_ttl=3.0, replica_batch_bytes=1, **more)
        with gate_held(monkeypatch) as gate:
            b, _ = _open_when_free(cfg, key)
            try:
                b.set_position(pos("B/USDT"))
                assert next_path(cfg.journal_path).exists() == b_rotates
                last = _shipped_to(cfg)
                with shipping:  # its journal (and segment) shipped, its snapshot never arrives
                    assert shipping.wait_for(lambda: last in shipped, 30), (last, shipped)
                assert not b.replica_status()["snapshot_shipped"]  # type: ignore[index]
                clock.die(2)
            finally:
                gate.release.set()
                b.close()
        monkeypatch.setattr(kind, "put", real)
        assert a_lease.renew() is False and a_lease.lost  # A wakes: B's lease refuses its renewal, for good
    finally:
        a.close()


@contextlib.contextmanager
def _late(
    tmp_path: Path, url: str, endpoint: str | None, key: bytes, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> Iterator[Any]:
    """The old holder after its pause, its background compaction held (a ``.next`` segment pending): yields its
    manager and a function that runs its shipper's late pass (the one a stale writer's PUTs in flight make:
    epoch 1, A's session)."""
    c = client(url, endpoint)
    session = max(r.session for r in _names.split(o.key for o in c.list())[1] if r.epoch == 1)
    cfg = StateConfig.in_dir(tmp_path / "late", backup_interval=1e9, **kw)

    def ship() -> None:
        shipper = Shipper(c, state_path=cfg.state_path, journal_path=cfg.journal_path, emit=lambda *_: None, epoch=1)
        shipper.session = session
        shipper.start()
        try:
            assert shipper.flush(30)
        finally:
            shipper.close(5)

    with gate_held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        try:
            yield m, ship, gate
        finally:  # the late passes are over: its compaction may finish (close waits up to 30 s for a held one)
            gate.release.set()


def _restored(tmp_path: Path, url: str, endpoint: str | None, key: bytes, name: str = "r", **kw: Any) -> dict[str, int]:
    cfg, _ = restore_into(tmp_path / name, url, endpoint, key, **kw)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        return held(r)


def test_a_stale_writers_late_segment_is_never_spliced_after_the_new_holders_records(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, replica: tuple[str, str | None]
) -> None:
    """session 12 attack: A, paused, wrote LATE1/USDT (sequence 3, never seen by B), then S0 = 999 rotated its
    journal (a ``.next`` segment after sequence 3) and its shipper uploaded both late under epoch 1. B's own
    record is sequence 3 too, so the segment linked and started right after B's chain: the restore gave S0 = 999
    on top of B/USDT without LATE1 (records B never acknowledged, in an order no writer had) and verify said all
    ok. Now the segment is used only when its writer held every byte of the journal it follows (ranges of its
    epoch or older hold them): B's history is restored, and verify agrees."""
    url, endpoint = replica
    _takeover_dies(tmp_path, key, monkeypatch, url, endpoint)
    with _late(tmp_path, url, endpoint, key, monkeypatch, journal_max_records=3) as (m, ship, gate):
        m.set_position(pos("LATE1/USDT", 7))
        m.set_position(pos("S0/USDT", 999))  # passes the threshold: rotates, this record opens .next
        assert gate.entered.wait(60)
        ship()
    c = client(url, endpoint)
    _, ranges, _ = _names.split(o.key for o in c.list())
    late = [r for r in ranges if r.epoch == 1 and r.base_generation > ranges[0].base_generation]
    assert late, "the late segment is in the replica"
    head = jf.parse_header(c.get(late[0].key))
    assert head.base_seq == 3 and head.prev_link == bytes.fromhex(ranges[0].journal_id)[: jf.LINK_SIZE]
    assert _restored(tmp_path, url, endpoint, key) == B_HISTORY
    rows = verify(c, options=options(key))
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    assert all("segment" not in row["reason"] for row in rows if row["key"] == late[0].key), rows


@pytest.mark.parametrize("old_sorts_first", [True, False], ids=["stale-segment-id-first", "stale-segment-id-last"])
def test_of_two_segments_that_continue_the_journal_the_new_holders_is_replayed(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, old_sorts_first: bool
) -> None:
    """session 12 attack: B's first change rotated its journal (a ``.next`` segment after sequence 2, shipped
    under epoch 2); A's late change rotated its own (after sequence 2 too, shipped late under epoch 1). Both link
    to the journal and start after its last record: the restore took the one whose id sorted first, so in half
    the runs A's segment, and then refused B's as a journal without its snapshot. Now the newest writer's
    segment is replayed whatever the ids, A's is ignored as any stale object is, and verify agrees."""
    url = f"file://{tmp_path}/rep"
    _takeover_dies(tmp_path, key, monkeypatch, url, None, b_rotates=True)
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    mine = next(r for r in ranges if r.epoch == 2 and r.base_generation > ranges[0].base_generation)
    real = jf.new_header
    low, high = bytes(16), b"\xff" * 16

    def new_header(*args: Any, **kw: Any) -> jf.JournalHeader:  # A's segment id sorts before / after B's
        if kw.get("prev_id") is not None:
            kw["journal_id"] = low if old_sorts_first else high
        return real(*args, **kw)

    monkeypatch.setattr(jf, "new_header", new_header)
    with _late(tmp_path, url, None, key, monkeypatch, journal_max_records=2) as (m, ship, gate):
        m.set_position(pos("S0/USDT", 999))  # passes the threshold: rotates, this record opens .next
        assert gate.entered.wait(60)
        ship()
    monkeypatch.setattr(jf, "new_header", real)
    _, ranges, _ = _names.split(o.key for o in c.list())
    theirs = next(r for r in ranges if r.epoch == 1 and r.base_generation > ranges[0].base_generation)
    assert (theirs.journal_id < mine.journal_id) == old_sorts_first
    assert _restored(tmp_path, url, None, key) == B_HISTORY
    rows = verify(c, options=options(key))
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


@pytest.mark.parametrize("past", [0, 1], ids=["at-the-late-snapshot", "past-it"])
def test_restore_at_a_generation_never_picks_a_stale_writers_late_snapshot(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, past: int
) -> None:
    """session 12 attack: after the takeover that died before its snapshot, A's compaction finished and A
    uploaded its late snapshot (epoch 1, generation G) and segment. ``restore --at G`` (or later) picked that
    snapshot by its name, the newest at or before G of the newest snapshot epoch, and silently gave A's
    history without B's shipped record; ``restore`` without --at already started from the snapshot B's
    journal follows. Now --at does too: B's history up to G."""
    url = f"file://{tmp_path}/rep"
    _takeover_dies(tmp_path, key, monkeypatch, url, None)
    with _late(tmp_path, url, None, key, monkeypatch, journal_max_records=3) as (m, ship, gate):
        m.set_position(pos("LATE1/USDT", 7))
        m.set_position(pos("S0/USDT", 999))
        assert gate.entered.wait(60)
        ship()
        gate.release.set()
        assert m.compact(wait=True, timeout=60)
        ship()
    snaps, _, _ = _names.split(o.key for o in client(url).list())
    late = max(snaps, key=lambda s: s.generation)
    assert late.epoch == 1 and late.generation > snaps[0].generation
    assert _restored(tmp_path, url, None, key) == B_HISTORY
    assert _restored(tmp_path, url, None, key, "at", at_generation=late.generation + past) == B_HISTORY


def test_planted_segment_candidates_cost_one_pass_over_the_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """session 12 attack: each journal of a later generation is a candidate for the segment after the chain, and
    each candidate's chain was walked over every range of the listing: thousands of planted one-range journals
    made a restore (and verify) quadratic in the listing. Now the ranges are grouped by journal once."""
    from posstate.replica import segment as _segment

    snap = _names.Snapshot(1, 1, 1, "0" * 32)
    planted = [_names.Range(5, f"{i:032x}", 0, 200, 1, 1, "1" * 32) for i in range(2000)]
    walked = [0]
    real = _names.chain

    def chain(ranges: Any, *args: Any, **kw: Any) -> list[_names.Range]:
        walked[0] += len(ranges)
        return real(ranges, *args, **kw)

    monkeypatch.setattr(_segment._names, "chain", chain)
    heads = [0]

    def head(r: _names.Range) -> bytes:
        heads[0] += 1
        return b"\0" * jf.HEADER_SIZE  # not a header: the candidate is skipped

    found = _segment.following(planted, snap, {"id": "f" * 32, "seq": 0}, b"", {}, head=head, where=str)
    assert found == [] and heads[0] == len(planted)
    assert walked[0] <= len(planted), walked[0]
