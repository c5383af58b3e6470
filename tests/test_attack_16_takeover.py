"""Issue 16 attack (session 11): a lease takeover that dies after re-shipping only part of the journal it
restored. The new holder's ranges are a byte-for-byte copy of the start of the old holder's journal; the old
holder's ranges for the rest are still in the replica, and a restore must use them (or refuse), never silently
give fewer records than the replica holds. A stale writer's late ranges that differ from what the new holder
shipped stay out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from replica_util import client, held, options, pos, rcfg, restore_into

from posstate import PositionStateManager, StateConfig
from posstate.replica import names as _names
from posstate.replica.file import FileClient
from posstate.replica.verify import verify

SYMBOLS = [f"S{i}/USDT" for i in range(6)]


def _used(cfg: StateConfig) -> bytes:
    """The journal's bytes up to its last record (the file is longer: zeros written ahead)."""
    from posstate.replica.local import read_local

    local = read_local(cfg.state_path, cfg.journal_path)
    assert local.journal is not None and local.records
    return local.journal[: local.records[-1].end]


def _takeover_dies(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, *, every: int, batch: int, k: int) -> str:
    """Holder A (epoch 1) ships SYMBOLS, flushing after every *every* changes (its ranges hold that many
    records); B takes the lease with ``replica_batch_bytes`` *batch*, restores, re-ships *k* journal ranges
    under epoch 2 and dies (its next upload of epoch 2 fails and it never ships, renews or releases again). A stays
    paused for one TTL in virtual time (tests/lease_time.py), not in real time."""
    from lease_time import lease_time
    from test_replica_lease import _open_when_free

    clock = lease_time(monkeypatch)
    url = f"file://{tmp_path}/rep"
    real = FileClient.put
    # A's journal uploads wait until *every* records are written: its ranges hold that many. Decided on the
    # range's end, not on a flag: a range the shipper cut before the flag changed would slip through (a flake)
    ends: set[int] = set()
    shipped: list[str] = []

    def put(self: FileClient, name: str, data: bytes, **kw: Any) -> Any:
        found = _names.parse(name)
        if isinstance(found, _names.Range) and found.epoch == 1 and found.end not in ends:
            raise OSError(5, "held back by the test")
        if isinstance(found, _names.Range | _names.Snapshot) and found.epoch == 2:
            if not isinstance(found, _names.Range) or len(shipped) >= k:
                clock.die(2)
                raise OSError(5, "the machine dies here")
            shipped.append(name)
        return real(self, name, data, **kw)

    monkeypatch.setattr(FileClient, "put", put)
    a = PositionStateManager(rcfg(tmp_path / "a", url, replica_lease=True, replica_lease_ttl=2.0), key=key)
    try:
        for i, symbol in enumerate(SYMBOLS):
            a.set_position(pos(symbol))
            if (i + 1) % every == 0:
                ends.add(len(_used(a.config)))
                assert a.flush_replica(30)
        ends.add(len(_used(a.config)))
        assert a.flush_replica(30)
        a_lease = a._replica.lease  # type: ignore[union-attr]
        assert a_lease is not None
        a_lease._stop.set()  # paused: no more renewals
        clock.skip(2.0)  # ... for one TTL
        cfg = rcfg(tmp_path / "b", url, replica_lease=True, replica_lease_ttl=3.0, replica_batch_bytes=batch)
        b, _ = _open_when_free(cfg, key)
        b.close()
        monkeypatch.setattr(FileClient, "put", real)
        assert len(shipped) == k, shipped
        ranges = _names.split(o.key for o in client(url).list())[1]
        assert len([r for r in ranges if r.epoch == 1]) == len(SYMBOLS) // every  # A's cuts, as asked
        assert a_lease.renew() is False and a_lease.lost  # A wakes: B's lease refuses its renewal, for good
    finally:
        a.close()
    return url


@pytest.mark.parametrize(
    ("every", "batch", "k"),
    [
        pytest.param(2, 1, 1, id="old-ranges-of-two-records-new-of-one"),
        pytest.param(2, 1, 3, id="new-range-ends-inside-an-old-one"),
        pytest.param(1, 1, 2, id="same-cuts"),
    ],
)
def test_a_takeover_that_dies_after_reshipping_part_of_the_journal_loses_no_record(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, every: int, batch: int, k: int
) -> None:
    """issue 16.4 (session 11 attack): the new holder re-ships the first ranges of the journal it restored under
    its epoch and dies; a restore (the next takeover's too) used to stop at the end of those ranges and silently
    drop the old holder's later records. Now it restores every record the replica holds, and verify agrees."""
    url = _takeover_dies(tmp_path, key, monkeypatch, every=every, batch=batch, k=k)
    cfg, _ = restore_into(tmp_path / "r", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == set(SYMBOLS)
    rows = verify(client(url), options=options(key))
    assert all(row["ok"] for row in rows), rows


def stale_and_new(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> str:
    """A (epoch 1) ships two records, is copied to ``late`` (the old holder as it goes on after a pause) and
    paused (for one TTL, in virtual time: tests/lease_time.py); B takes the lease (epoch 2), ships its journal and
    its own record ``B/USDT`` and dies before its snapshot. Returns the replica's URL."""
    import shutil
    import threading

    from lease_time import lease_time
    from test_replica_lease import _open_when_free

    clock = lease_time(monkeypatch)
    url = f"file://{tmp_path}/rep"
    a = PositionStateManager(rcfg(tmp_path / "a", url, replica_lease=True, replica_lease_ttl=2.0), key=key)
    try:
        for symbol in SYMBOLS[:2]:
            a.set_position(pos(symbol))
        assert a.flush_replica(30)
        shutil.copytree(tmp_path / "a", tmp_path / "late")  # the old holder as it goes on after a pause
        a_lease = a._replica.lease  # type: ignore[union-attr]
        assert a_lease is not None
        a_lease._stop.set()  # paused: no more renewals
        clock.skip(2.0)  # ... for one TTL
        real = FileClient.put
        ends: list[int] = []  # of B's ranges shipped
        shipping = threading.Condition()

        def put(self: FileClient, name: str, data: bytes, **kw: Any) -> Any:
            found = _names.parse(name)
            if isinstance(found, _names.Snapshot) and found.epoch == 2:
                raise OSError(5, "the machine dies before this")
            out = real(self, name, data, **kw)
            if isinstance(found, _names.Range) and found.epoch == 2:
                with shipping:
                    ends.append(found.end)
                    shipping.notify_all()
            return out

        monkeypatch.setattr(FileClient, "put", put)
        cfg = rcfg(tmp_path / "b", url, replica_lease=True, replica_lease_ttl=3.0, replica_batch_bytes=1)
        b, _ = _open_when_free(cfg, key)
        try:
            b.set_position(pos("B/USDT"))
            end = len(_used(cfg))
            with shipping:  # its journal is shipped, its snapshot never arrives
                assert shipping.wait_for(lambda: end in ends, 30), (end, ends)
            assert not b.replica_status()["snapshot_shipped"]  # type: ignore[index]
            clock.die(2)
        finally:
            b.close()
            monkeypatch.setattr(FileClient, "put", real)
        assert a_lease.renew() is False and a_lease.lost  # A wakes: B's lease refuses its renewal, for good
    finally:
        a.close()
    return url


def test_a_stale_writers_late_ranges_stay_out_after_a_partial_copy(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11 attack): the old holder's ranges are used after the new holder's copy only when
    every range of the new holder holds the same bytes there: a new holder's own record where the old holder
    shipped a late one (two histories from one offset) keeps the old holder's range out of every restore."""
    url = stale_and_new(tmp_path, key, monkeypatch)
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    old = [r for r in ranges if r.epoch == 1]
    shipped = max(r.end for r in old)
    own = next(r for r in ranges if r.epoch == 2 and r.start == shipped)  # B's own record is in the replica
    lcfg = StateConfig.in_dir(tmp_path / "late")
    with PositionStateManager(lcfg, key=key) as m:  # the late change: authenticated, chained, another history
        m.set_position(pos("LATE/USDT", 12345))
        data = _used(lcfg)
    assert b"".join(c.get(r.key) for r in sorted(old, key=lambda r: r.start)) == data[:shipped]  # the same journal
    assert len(data) > own.end and c.get(own.key) != data[shipped : own.end]
    late = _names.Range(
        old[0].base_generation, old[0].journal_id, shipped, len(data), 1, old[0].session, _names.digest(data[shipped:])
    )
    c.put(late.key, data[shipped:])
    cfg2, _ = restore_into(tmp_path / "r", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg2.state_dir), key=key) as r:
        assert set(held(r)) == {*SYMBOLS[:2], "B/USDT"}


def test_an_old_range_missing_after_a_partial_copy_fails_restore_and_verify(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11): after a takeover's partial copy, the old holder's range that joins the copy to
    the old holder's later ranges deleted: restore used to stop at the copy's end silently; now it refuses
    naming the missing byte (a typed error), verify says BAD, and `--at` before the gap still restores."""
    from posstate.core.errors import CorruptStateError

    url = _takeover_dies(tmp_path, key, monkeypatch, every=2, batch=1, k=1)
    c = client(url)
    snaps, ranges, _ = _names.split(o.key for o in c.list())
    copy_end = max(r.end for r in ranges if r.epoch == 2)
    joining = [r for r in ranges if r.epoch == 1 and r.start < copy_end < r.end]
    assert len(joining) == 1
    c.delete([joining[0].key])
    with pytest.raises(CorruptStateError, match=f"byte {copy_end:016x} missing"):
        restore_into(tmp_path / "r", url, None, key)
    rows = verify(c, options=options(key))
    assert any(not row["ok"] and row["key"].startswith("snapshots/") for row in rows), rows
    cfg, _ = restore_into(tmp_path / "r", url, None, key, at_generation=snaps[-1].generation + 1)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {SYMBOLS[0]}
