"""Issue 16 attack: someone with write access to the replica (no key) deletes objects so that a restore would
silently give an older state: a range in the middle of the journal, or the newest snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_util import client, held, pos, rcfg, restore_into, two_histories

from posstate import CorruptStateError, PositionStateManager, StateConfig
from posstate.replica import names as _names
from posstate.replica.client import ReplicaClient


def _ship(tmp_path: Path, url: str, key: bytes, *, snapshots: int = 1) -> None:
    """Several snapshots, each followed by journal records shipped one object per record (each flushed before
    the next is written: under load the shipper sent two records in one range, or none before a save)."""
    with PositionStateManager(rcfg(tmp_path / "a", url, replica_batch_bytes=1), key=key) as m:
        for s in range(snapshots):
            m.set_position(pos(f"S{s}/USDT"))
            m.save()
            for i in range(4):
                m.set_position(pos(f"R{s}-{i}/USDT"))
                assert m.flush_replica(30)


def _newest(c: ReplicaClient) -> list[_names.Range]:
    """The journal ranges of the newest snapshot's segment, one per record after it (``_ship``). An older
    segment's ranges are left out: whether the record before a save was shipped before it (and so listed
    first) depends on the shipper's timing; a CI run under load shifted every index by one."""
    snaps, ranges, _ = _names.split(o.key for o in c.list())
    return [r for r in ranges if r.base_generation == snaps[-1].generation]


def test_a_range_deleted_in_the_middle_of_the_journal_fails_the_restore(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: a gap in the journal's ranges (one deleted, or not listed yet) is an error naming it,
    not a restore that silently stops before the gap (nothing written)."""
    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    c = client(url)
    ranges = _newest(c)
    assert len(ranges) == 4
    victim = ranges[1]
    c.delete([victim.key])
    with pytest.raises(CorruptStateError, match="missing") as info:
        restore_into(tmp_path / "b", url, None, key)
    assert f"{victim.start:016x}" in str(info.value)
    assert not (tmp_path / "b" / "positions.json").exists()


def test_the_newest_snapshot_deleted_fails_the_restore(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: with the newest snapshot deleted while its journal ranges remain, a restore refuses
    (the replica was rolled back) instead of giving the older snapshot's state; --at that older one still works."""
    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key, snapshots=2)
    c = client(url)
    snaps, _, _ = _names.split(o.key for o in c.list())
    assert len(snaps) >= 2
    c.delete([snaps[-1].key])
    with pytest.raises(CorruptStateError, match="older than the replica") as info:
        restore_into(tmp_path / "b", url, None, key)
    assert "--at" in str(info.value)
    assert not (tmp_path / "b" / "positions.json").exists()
    cfg, result = restore_into(tmp_path / "c", url, None, key, at_generation=snaps[-2].generation)
    assert result.snapshot == snaps[-2].key
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert "S0/USDT" in held(r)


def test_a_longer_range_of_an_older_session_is_superseded_not_a_gap(tmp_path: Path, key: bytes) -> None:
    """issue 16.3: a range an older session shipped beyond where the newer session's chain ends (a long record
    the local disk lost after shipping, replaced by a shorter one) is superseded, not a gap."""
    from posstate.journal import format as jf

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        data = cfg.journal_path.read_bytes()
        cut = jf.scan(data, jf.parse_header(data)).good_end
        m.set_position(pos("LOST" + "X" * 100 + "/USDT"))
        assert m.flush_replica(30)
    with cfg.journal_path.open("r+b") as fh:  # the power loss: the last record never reached the disk
        fh.truncate(cut)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("B/USDT"))
        assert m.flush_replica(30)
    _, ranges, _ = _names.split(o.key for o in client(url).list())
    old = [r for r in ranges if r.start == cut]
    assert len(old) == 2 and old[0].end > old[1].end and old[0].session < old[1].session
    restored, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(restored.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT", "B/USDT"}


@pytest.mark.parametrize("field", ["session", "epoch"])
def test_a_planted_name_with_a_huge_counter_never_breaks_replication(tmp_path: Path, key: bytes, field: str) -> None:
    """issue 16.2 attack: a name planted with session or epoch 9999999999 must not push the writer's own counter
    past the 10 digits of a name (its objects would no longer parse: shipped for ever, never restored)."""
    url = f"file://{tmp_path}/rep"
    c = client(url)
    kw = {"session": 9_999_999_999, "epoch": 0} if field == "session" else {"session": 1, "epoch": 9_999_999_999}
    c.put(_names.Snapshot(generation=0, digest="0" * 32, **kw).key, b"x")
    with PositionStateManager(rcfg(tmp_path / "a", url, replica_lease=field == "epoch", replica_lease_ttl=1), key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
    keys = [o.key for o in c.list()]
    mine = [k for k in keys if k.startswith(("snapshots/", "journal/")) and "9999999999" not in k]
    assert mine and all(_names.parse(k) is not None for k in mine), mine


def test_restore_at_a_generation_before_a_gap_succeeds_and_beyond_it_fails(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: with a range deleted, `--at` a generation the chain reaches before the gap restores
    (as the error's next step says); `--at` one beyond the gap still fails (nothing silently cut)."""
    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    c = client(url)
    snaps, _, _ = _names.split(o.key for o in c.list())
    ranges = _newest(c)
    c.delete([ranges[2].key])
    gen = snaps[-1].generation
    _, result = restore_into(tmp_path / "b", url, None, key, at_generation=gen + 1)
    assert result.generation == gen + 1
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "c", url, None, key, at_generation=gen + 3)
    assert not (tmp_path / "c" / "positions.json").exists()


@pytest.mark.parametrize("field", ["session", "epoch"])
def test_a_range_copied_under_a_higher_writer_never_cuts_the_restore_short(tmp_path: Path, key: bytes, field: str) -> None:
    """issue 16.3 attack: a journal range copied (same bytes) under a higher session or epoch in its name must not
    make the restore stop there silently: the writer's later ranges are still followed."""
    import dataclasses

    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    c = client(url)
    ranges = _newest(c)
    victim = ranges[1]
    c.put(dataclasses.replace(victim, **{field: getattr(victim, field) + 5}).key, c.get(victim.key))
    cfg, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert {f"R0-{i}/USDT" for i in range(4)} <= set(held(r))


def test_the_last_range_copied_under_a_higher_writer_still_shows_a_gap_after_it(tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: a range copied under a higher session, and the range after the original deleted: the
    later ranges of the original's writer still reveal the gap (an error, not a silent cut)."""
    import dataclasses

    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    c = client(url)
    ranges = _newest(c)
    c.put(dataclasses.replace(ranges[1], session=ranges[1].session + 5).key, c.get(ranges[1].key))
    c.delete([ranges[2].key])
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "b", url, None, key)


def test_a_restore_killed_between_its_two_files_never_opens_as_an_older_state(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.3 attack (SIGKILL mid-restore): a restore that dies after writing one of its two files must not
    leave a directory that opens without the journal's acknowledged changes: the state file is written last."""
    from posstate import PosStateError
    from posstate.replica import restore as _restore

    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    real = _restore._atomic.write_file
    calls: list[Path] = []

    def dies_on_the_second(path: Path, data: bytes, *a: object, **kw: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the process dies here: nothing after this runs
        real(path, data, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_restore._atomic, "write_file", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        restore_into(tmp_path / "b", url, None, key)
    monkeypatch.setattr(_restore._atomic, "write_file", real)
    try:
        with PositionStateManager(StateConfig.in_dir(tmp_path / "b"), key=key) as m:
            got = set(held(m))
    except PosStateError:
        return  # refused loudly: fine
    assert {f"R0-{i}/USDT" for i in range(4)} <= got, "opened as an older state, the journal's changes gone"


def test_a_chain_of_huge_ranges_is_refused_before_it_is_downloaded(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.3 attack: journal ranges whose listed sizes add up to more than posstate ever reads are refused
    from the listing, before any of them is downloaded into memory."""
    from posstate.replica.file import FileClient
    from posstate.storage import fileops as fs

    url = f"file://{tmp_path}/rep"
    _ship(tmp_path, url, key)
    monkeypatch.setattr(fs, "DEFAULT_MAX_READ_BYTES", 100)
    fetched: list[str] = []
    real = FileClient.get
    monkeypatch.setattr(FileClient, "get", lambda self, k: fetched.append(k) or real(self, k))
    with pytest.raises(CorruptStateError, match="more than a journal"):
        restore_into(tmp_path / "b", url, None, key)
    assert not [k for k in fetched if k.startswith("journal/")]


def test_restore_at_the_generation_right_before_a_gap_succeeds(tmp_path: Path, key: bytes) -> None:
    """issue 16.3: `--at` the generation of the last record before a gap restores it (the gap's records come
    later); before, it failed whenever the deleted range was the very next one (a CI run: the shipper had sent
    the record before the save on its own, which moved the test above's victim one range earlier)."""
    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url, replica_batch_bytes=1), key=key) as m:
        m.set_position(pos("S0/USDT"))
        assert m.flush_replica(30)  # this record shipped on its own, before the save: always the same ranges
        m.save()
        for i in range(4):
            m.set_position(pos(f"R0-{i}/USDT"))
            assert m.flush_replica(30)  # one range per record
    c = client(url)
    snaps, ranges, _ = _names.split(o.key for o in c.list())
    gen = snaps[-1].generation
    after = [r for r in ranges if r.journal_id == ranges[-1].journal_id]  # the newest snapshot's segment
    assert len(after) == 4
    c.delete([after[1].key])  # the range right after the first record past the snapshot (generation gen + 1)
    cfg, result = restore_into(tmp_path / "b", url, None, key, at_generation=gen + 1)
    assert result.generation == gen + 1
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert {"S0/USDT", "R0-0/USDT"} <= set(held(r)) and "R0-1/USDT" not in held(r)
    with pytest.raises(CorruptStateError, match="missing"):
        restore_into(tmp_path / "c", url, None, key, at_generation=gen + 2)
    assert not (tmp_path / "c" / "positions.json").exists()


def test_restore_at_the_boundary_never_uses_an_older_history_when_the_newer_ones_range_is_deleted(
    tmp_path: Path, key: bytes
) -> None:
    """issue 16.3 attack (session 10): an older session's range at an offset a newer session rewrote (the local
    record lost after shipping) is used once the newer one's range there is deleted; `--at` that generation must
    not restore the older history's record as if it were the state at that generation."""
    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, replica_batch_bytes=1)
    # LOST never reached the local disk (or a restore --at came before it); B has its generation, another record
    cut, gen = two_histories(cfg, key, ["LOST/USDT"], ["B/USDT", "C" * 100 + "/USDT"])
    c = client(url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    at_cut = sorted((r for r in ranges if r.start == cut), key=lambda r: r.writer)
    assert len(at_cut) == 2 and at_cut[0].writer < at_cut[1].writer
    c.delete([at_cut[1].key])  # the newer session's record at that offset
    try:
        restored, _ = restore_into(tmp_path / "b", url, None, key, at_generation=gen)
    except CorruptStateError as exc:
        assert "missing" in str(exc)
        assert not (tmp_path / "b" / "positions.json").exists()
        return
    with PositionStateManager(StateConfig.in_dir(restored.state_dir), key=key) as r:
        assert "LOST/USDT" not in held(r), "restored a record the newer session replaced"
