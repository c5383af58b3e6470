"""Issue 16 attack (session 11, outside attacker on the takeover change): chains of takeovers that die midway,
and planted copies of genuine ranges under many epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_util import client, held, options, restore_into
from test_attack_16_takeover import SYMBOLS, _takeover_dies

from posstate import PositionStateManager, StateConfig
from posstate.journal import format as jf
from posstate.replica import names as _names
from posstate.replica.verify import verify


def _journal(url: str, tmp: Path, key: bytes) -> tuple[_names.Range, bytes, list[int]]:
    """A range of the journal the replica restores, that journal's bytes, and its record ends."""
    cfg, _ = restore_into(tmp, url, None, key)
    data = cfg.journal_path.read_bytes()
    scan = jf.scan(data, jf.parse_header(data))
    ends = [r.end for r in scan.records]
    _, ranges, _ = _names.split(o.key for o in client(url).list())
    return ranges[0], data[: ends[-1]], ends


def _copy(c: object, like: _names.Range, data: bytes, start: int, end: int, epoch: int) -> _names.Range:
    r = _names.Range(like.base_generation, like.journal_id, start, end, epoch, 1, _names.digest(data[start:end]))
    c.put(r.key, data[start:end])  # type: ignore[attr-defined]
    return r


def test_two_takeovers_that_die_midway_with_other_cuts_lose_no_record(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11 attack): B (epoch 2) re-ships the first record of A's journal and dies; C (epoch 3)
    restores all of it, re-ships its first three records (cut inside A's second range) and dies: the older
    epochs' chain by names (B's copy, then nothing of B's epoch) stopped at B's end, so the restore refused A's
    later ranges as stranded and no one could take over; every record is restored and verify agrees."""
    url = _takeover_dies(tmp_path, key, monkeypatch, every=2, batch=1, k=1)
    like, data, ends = _journal(url, tmp_path / "probe", key)
    assert len(ends) == len(SYMBOLS)
    c = client(url)
    _copy(c, like, data, 0, ends[2], 3)  # C's copy: three records, one range (its own cut)
    cfg, _ = restore_into(tmp_path / "r", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == set(SYMBOLS)
    rows = verify(c, options=options(key))
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


def test_planted_copies_under_many_epochs_never_make_restore_read_the_journal_once_per_record(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11 attack): a bucket writer copies genuine prefixes of the journal under epochs that
    fall as the prefix grows (one record more each): every older epoch's chain continues the one before, and the
    restore read them all, the journal once per record (quadratic); now it reads a bounded number of them and
    refuses past that, naming the journal, and verify says BAD."""
    from replica_util import pos, rcfg

    from posstate.core.errors import CorruptStateError
    from posstate.replica import chains as _chains
    from posstate.replica.file import FileClient

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url), key=key) as m:
        for i in range(40):
            m.set_position(pos(f"P{i}/USDT"))
        assert m.flush_replica(30)
    like, data, ends = _journal(url, tmp_path / "probe", key)
    c = client(url)
    _, genuine, _ = _names.split(o.key for o in c.list())
    # A copy ending where a genuine range ends would let the genuine ranges continue it directly (no older
    # chain needed: a correct restore then succeeds); the shipper's batches decide where those are.
    cuts = {r.end for r in genuine} - {ends[-1]}
    for i, end in enumerate(e for e in ends if e not in cuts):
        _copy(c, like, data, 0, end, 1000 - i)
    got = [0]
    real = FileClient.get

    def get(self: FileClient, name: str) -> bytes:
        out = real(self, name)
        got[0] += len(out)
        return out

    monkeypatch.setattr(FileClient, "get", get)
    with pytest.raises(CorruptStateError, match="older epochs' chains"):
        restore_into(tmp_path / "r", url, None, key)
    assert got[0] <= (_chains.MAX_OLDER_CHAINS + 4) * len(data), (got[0], len(data))
    rows = verify(c, options=options(key))
    assert any(not row["ok"] and "older epochs' chains" in row["reason"] for row in rows)


def test_a_stale_writers_late_snapshot_never_drops_the_new_holders_shipped_records(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 (session 11 attack): B takes the lease, ships A's journal and its own record under epoch 2 and
    dies before its snapshot; A, paused inside its shipper, wakes and uploads its late snapshot (epoch 1, a later
    generation: a save after B took over). The restore picked that snapshot (the newest generation of the
    newest snapshot epoch) and silently dropped B's record, although B's epoch-2 ranges continue the older
    snapshot's journal. Now the restore starts from that older snapshot (B's history; A's late one stays
    out) and verify agrees."""
    from replica_util import pos
    from test_attack_16_takeover import stale_and_new

    url = stale_and_new(tmp_path, key, monkeypatch)
    c = client(url)
    snaps, _, _ = _names.split(o.key for o in c.list())
    old = snaps[-1]
    lcfg = StateConfig.in_dir(tmp_path / "late")
    with PositionStateManager(lcfg, key=key) as m:  # the late save: a later generation, epoch 1
        m.set_position(pos("LATE/USDT", 12345))
        m.save()
        gen = m.generation
    body = lcfg.state_path.read_bytes()
    late = _names.Snapshot(gen, old.epoch, old.session, _names.digest(body))
    assert gen > old.generation
    c.put(late.key, body)
    cfg2, _ = restore_into(tmp_path / "r", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg2.state_dir), key=key) as r:
        assert set(held(r)) == {*SYMBOLS[:2], "B/USDT"}, held(r)
    rows = verify(c, options=options(key))
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]


def test_planted_ranges_under_thousands_of_epochs_cost_a_bounded_number_of_chain_walks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 16.4 (session 11 attack): the older epochs' chains were walked once per older epoch of the journal,
    each walk a pass over every range: ranges planted under thousands of epochs made a restore (and verify)
    quadratic in the listing, a hang at tens of thousands of objects; now at most MAX_OLDER_CHAINS + 1 walks."""
    from posstate.replica import chains as _chains

    jid = "a" * 32
    used = [_names.Range(1, jid, 0, 100, 10_000, 1, "0" * 32)]
    planted = [_names.Range(1, jid, 0, 50, e, 1, "1" * 32) for e in range(2, 2002)]
    walks = [0]
    real = _names.chain

    def chain(*args: object, **kw: object) -> list[_names.Range]:
        walks[0] += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_chains._names, "chain", chain)
    assert _chains.older([*planted, *used], used, floor=(1, 0)) == []
    assert walks[0] <= _chains.MAX_OLDER_CHAINS + 1, walks[0]
