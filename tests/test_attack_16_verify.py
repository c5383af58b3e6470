"""Issue 16 attack (session 11): `replica verify` against `replica restore` on damaged replicas: a restore that
refuses, or that silently restores less than the replica's newest state, while verify says all ok."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from replica_util import client, held, options, pos, rcfg, restore_into

from posstate import PositionStateManager, PosStateError, StateConfig
from posstate.replica import names as _names
from posstate.replica.verify import verify


def _one(tmp_path: Path, key: bytes) -> str:
    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url, replica_batch_bytes=1), key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        m.save()
        for symbol in ("B/USDT", "C/USDT"):
            m.set_position(pos(symbol))
            assert m.flush_replica(30)
    return url


def test_verify_of_a_replica_without_a_snapshot_is_bad(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 16.3 (session 11 attack): every snapshot deleted (journal ranges left) or an empty replica: restore
    has nothing to restore from, so verify says BAD (exit 1), not "N objects, 0 bad"."""
    from test_cli import run

    url = _one(tmp_path, key)
    c = client(url)
    c.delete([s.key for s in _names.split(o.key for o in c.list())[0]])
    with pytest.raises(PosStateError, match="no such snapshot"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(c, options=options(key))
    assert any(not row["ok"] and "restore" in row["reason"] for row in rows), rows
    r = run(["replica", "verify", url, "--key-file", str(key_file)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.splitlines()[-1].endswith(" bad; no snapshot"), r.output  # the summary says why
    c.delete([o.key for o in c.list()])
    assert [row["ok"] for row in verify(c, options=options(key))] == [False]


def test_a_range_deleted_before_a_pending_compactions_segment_fails_restore_and_verify(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.3 x 14.1 (session 11 attack): the last range of the snapshot's journal deleted while the segment
    after it (a pending compaction's) is listed: restore used to replay the segment after the shortened journal
    and silently drop the acknowledged change in between, and verify said all ok. Now restore refuses, verify
    says BAD, and `--at` before the gap still restores the older state."""
    from test_background_compaction import held as gated

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, journal_max_records=5, backup_interval=1e9, replica_batch_bytes=1)
    with gated(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        assert m.flush_replica(30)
        c = client(url)
        snaps, ranges, _ = _names.split(o.key for o in c.list())
        own = sorted((r for r in ranges if r.base_generation == snaps[-1].generation), key=lambda r: r.start)
        assert len(own) >= 3 and any(r.base_generation > snaps[-1].generation for r in ranges)  # a segment after it
        c.delete([own[-1].key])
        with pytest.raises(PosStateError):
            restore_into(tmp_path / "b", url, None, key)
        rows = verify(c, options=options(key))
        gate.release.set()
    assert any(not row["ok"] and row["key"] == snaps[-1].key for row in rows), rows
    restore_into(tmp_path / "c", url, None, key, at_generation=snaps[-1].generation + 1)
    with PositionStateManager(StateConfig.in_dir(tmp_path / "c"), key=key) as back:
        assert held(back) == {"S0/USDT": 1}


def test_verify_flags_a_snapshot_whose_journal_was_shipped_only_under_older_epochs(tmp_path: Path, key: bytes) -> None:
    """issue 16.3/16.4 (session 11 attack): the newest snapshot's bytes under a higher epoch's name (renamed, or a
    takeover that shipped the restored snapshot and stopped before its journal): restore uses no range of an
    older epoch and gives the snapshot without the journal's acknowledged records; verify says so (BAD), not ok."""
    import dataclasses

    url = _one(tmp_path, key)
    c = client(url)
    snap = _names.split(o.key for o in c.list())[0][-1]
    higher = dataclasses.replace(snap, epoch=snap.epoch + 3)
    c.put(higher.key, c.get(snap.key))
    c.delete([snap.key])
    _, result = restore_into(tmp_path / "b", url, None, key)
    assert result.records == 0  # B and C are not restored
    rows = verify(c, options=options(key))
    bad = [row["reason"] for row in rows if row["key"] == higher.key and not row["ok"]]
    assert bad and "older epoch" in bad[0], rows


def _last_range_of_newest(c: object) -> _names.Range:
    snaps, ranges, _ = _names.split(o.key for o in c.list())  # type: ignore[attr-defined]
    return max((r for r in ranges if r.base_generation == snaps[-1].generation), key=lambda r: r.start)


@pytest.mark.parametrize("planted", ["zeros", "one-byte-longer"])
def test_a_planted_range_of_other_length_or_zeros_never_cuts_the_restore_short(tmp_path: Path, key: bytes, planted: str) -> None:
    """issue 16.3 (session 11 attack): under a higher session's name at the chain's last offset, a range of zeros
    (a scan takes zeros for space written ahead: no record there) or the real bytes plus one byte (its size is
    not the name's end - start): restore used to drop the last acknowledged record and verify said ok; now the
    restore refuses naming the object and verify marks it BAD."""
    import dataclasses

    url = _one(tmp_path, key)
    c = client(url)
    last = _last_range_of_newest(c)
    data = bytes(last.end - last.start) if planted == "zeros" else c.get(last.key) + b"\x00"
    fake = dataclasses.replace(last, session=last.session + 1, digest=_names.digest(data))
    c.put(fake.key, data)
    with pytest.raises(PosStateError, match=r"record|bytes"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(c, options=options(key))
    assert any(row["key"] == fake.key and not row["ok"] for row in rows), rows


def test_verify_reads_a_chain_once_however_many_copies_of_its_snapshot_are_planted(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 (session 11 attack): 30 copies of the newest snapshot under other sessions' names (a few bytes of
    names each): verify downloads its journal chain once, not once per copy (a bucket attacker cannot multiply what
    verify downloads beyond the objects listed)."""
    import dataclasses

    from posstate.replica.client import ReplicaClient

    url = _one(tmp_path, key)
    c = client(url)
    snap = _names.split(o.key for o in c.list())[0][-1]
    data = c.get(snap.key)
    for session in range(snap.session + 1, snap.session + 31):
        c.put(dataclasses.replace(snap, session=session).key, data)
    read: list[str] = []

    class Counting(ReplicaClient):
        url = c.url

        def list(self) -> Any:
            return c.list()

        def get(self, key: str) -> bytes:
            read.append(key)
            return c.get(key)

        def __getattr__(self, name: str) -> Any:
            return getattr(c, name)

    rows = verify(Counting(), options=options(key))
    assert all(row["ok"] for row in rows), rows
    ranges = [k for k in read if k.startswith(_names.JOURNAL)]
    assert max(ranges.count(k) for k in ranges) <= 2, sorted(ranges)


def test_a_range_whose_name_spans_more_than_a_journal_is_refused_before_it_is_downloaded(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.3 (session 11 attack): a range named 0 to 2**40 under a higher session, listed small (a service
    that lies about sizes): restore and verify refuse it from its name, never downloading it (each range must
    hold end - start bytes, so the listing's size is not what bounds a chain)."""
    import dataclasses

    from posstate.replica.file import FileClient

    url = _one(tmp_path, key)
    c = client(url)
    first = min(_names.split(o.key for o in c.list())[1], key=lambda r: (-r.base_generation, r.start))
    fake = dataclasses.replace(first, end=2**40, session=first.session + 1, digest=_names.digest(b"small"))
    c.put(fake.key, b"small")
    fetched: list[str] = []
    real = FileClient.get
    monkeypatch.setattr(FileClient, "get", lambda self, k: fetched.append(k) or real(self, k))
    with pytest.raises(PosStateError, match="more than a journal"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(c, options=options(key))
    assert any(row["key"] == fake.key and not row["ok"] for row in rows), rows
    assert fake.key not in fetched


def test_verify_is_all_ok_after_a_lease_takeover_and_a_stale_writers_late_range(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.3 x 16.4 (session 11 attack): the older-epoch check of verify raises no false alarm on a healthy
    takeover: the new holder re-ships the restored snapshot and journal under its epoch; a stale writer's late
    range of that journal (older epoch, past what was restored) is ignored by restore and not BAD in verify.
    (A's pause lasts one TTL in virtual time, tests/lease_time.py.)"""
    from lease_time import lease_time
    from test_replica_lease import _open_when_free

    from posstate.journal import format as jf

    clock = lease_time(monkeypatch)
    url = f"file://{tmp_path}/rep"
    a = PositionStateManager(rcfg(tmp_path / "a", url, replica_lease=True, replica_lease_ttl=2.0, replica_interval=3600), key=key)
    try:
        a.set_position(pos("X/USDT"))
        assert a.flush_replica(30)
        a.set_position(pos("LATE/USDT"))  # acknowledged locally, not shipped yet (a long interval)
        lease = a._replica.lease  # type: ignore[union-attr]
        assert lease is not None
        lease._stop.set()  # paused: no more renewals
        clock.skip(2.0)  # ... for one TTL
        b, _ = _open_when_free(rcfg(tmp_path / "b", url, replica_lease=True, replica_lease_ttl=30.0), key)
        b.close()
        assert lease.renew() is False and lease.lost  # A wakes: B's lease refuses its renewal, for good
        c = client(url)
        mine = max((r for r in _names.split(o.key for o in c.list())[1] if r.epoch == 1), key=lambda r: r.end)
        data = (tmp_path / "a" / "positions.json.journal").read_bytes()
        late = data[mine.end : jf.scan(data, jf.parse_header(data)).good_end]
        assert late
        c.put(
            _names.Range(
                mine.base_generation, mine.journal_id, mine.end, mine.end + len(late), 1, mine.session, _names.digest(late)
            ).key,
            late,
        )
    finally:
        a.close()
    cfg, result = restore_into(tmp_path / "r", url, None, key)
    assert result.epoch == 2
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"X/USDT"}
    rows = verify(client(url), options=options(key))
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


def test_verify_names_the_orphan_range_when_the_newest_snapshot_is_deleted(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 (session 11 attack; docs/SECURITY.md says each refusal is a BAD row on the snapshot and one on
    the range that shows it): the newest snapshot deleted, its journal's range is BAD too, not "ok, not used"."""
    url = _one(tmp_path, key)
    c = client(url)
    snaps, ranges, _ = _names.split(o.key for o in c.list())
    c.delete([snaps[-1].key])
    with pytest.raises(PosStateError, match="without its snapshot"):
        restore_into(tmp_path / "b", url, None, key)
    rows = verify(c, options=options(key))
    orphans = {r.key for r in ranges if r.base_generation == snaps[-1].generation}
    assert any(row["key"] in orphans and not row["ok"] for row in rows), rows


def test_a_takeover_that_dies_before_shipping_its_journal_never_loses_the_restored_records(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11 attack): the new holder re-ships the state it restored under its epoch; when its
    journal uploads fail (it dies right after the snapshot), a restore used to pick its snapshot (the newer epoch)
    and ignore the older epoch's journal: the records acknowledged before the takeover were lost (verify now
    says so, see above). The journal is shipped first when the replica already holds the snapshot's bytes, so
    the replica never holds that snapshot without its journal. (A's pause lasts one TTL in virtual time,
    tests/lease_time.py; B dies at its first refused upload: it never ships, renews or releases again.)"""
    from lease_time import lease_time
    from test_replica_lease import _open_when_free

    from posstate.replica.file import FileClient

    clock = lease_time(monkeypatch)
    url = f"file://{tmp_path}/rep"
    a = PositionStateManager(rcfg(tmp_path / "a", url, replica_lease=True, replica_lease_ttl=2.0), key=key)
    try:
        for symbol in ("X/USDT", "Y/USDT"):
            a.set_position(pos(symbol))
        assert a.flush_replica(30)
        a_lease = a._replica.lease  # type: ignore[union-attr]
        assert a_lease is not None
        a_lease._stop.set()  # paused: no more renewals
        clock.skip(2.0)  # ... for one TTL
        real = FileClient.put

        def put(self: FileClient, k: str, data: bytes, **kw: Any) -> Any:
            found = _names.parse(k)
            if isinstance(found, _names.Range) and found.epoch == 2:
                clock.die(2)
                raise OSError(5, "the machine dies here")
            return real(self, k, data, **kw)

        monkeypatch.setattr(FileClient, "put", put)
        b, _ = _open_when_free(rcfg(tmp_path / "b", url, replica_lease=True, replica_lease_ttl=3.0), key)
        b.close()
        monkeypatch.setattr(FileClient, "put", real)
        assert a_lease.renew() is False and a_lease.lost  # A wakes: B's lease refuses its renewal, for good
    finally:
        a.close()
    cfg, _ = restore_into(tmp_path / "r", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"X/USDT", "Y/USDT"}
    assert all(row["ok"] for row in verify(client(url), options=options(key)))
