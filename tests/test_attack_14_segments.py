"""Issue 14 attack: the readers of other issues (online backup, replica shipper and restore, serve) and the
``.next`` segment a background compaction starts; timed backups and ledger transitions during a rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from posstate import PositionStateManager, StateConfig
from posstate.journal.files import next_path
from tests.replica_util import held as held_positions
from tests.replica_util import pos, rcfg, restore_into
from tests.test_background_compaction import held


def test_flush_replica_ships_the_records_of_the_next_segment(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.1 x 16.6: records acknowledged into ``.next`` while a background compaction is pending are in the
    replica once flush_replica() says so; a restore after the machine dies mid-compaction holds every one."""
    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(5):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        m.set_position(pos("S0/USDT", 100))  # passes the threshold: rotates, this record opens .next
        assert gate.entered.wait(60)
        for i in (1, 2, 3):
            m.set_position(pos(f"S{i}/USDT", 200 + i))
        assert next_path(cfg.journal_path).exists()
        assert m.flush_replica(30)
        assert m.flush_replica(30)  # a second listing applies retention: the segment's ranges are kept
        want = held_positions(m)
        # the machine dies here (compaction still pending): restore from the replica alone
        rcfg_b, _ = restore_into(tmp_path / "b", url, None, key)
        gate.release.set()
    with PositionStateManager(StateConfig.in_dir(rcfg_b.state_dir), key=key) as r:
        assert held_positions(r) == want


def test_the_replica_continues_without_gaps_once_the_pending_compaction_finishes(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 16.3: the segment shipped while its compaction was pending becomes the new snapshot's
    journal; what follows is shipped after it and a restore holds every change."""
    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        assert m.flush_replica(30)
        gate.release.set()
        assert m.compact(wait=True, timeout=60)
        assert not next_path(cfg.journal_path).exists()
        m.set_position(pos("S2/USDT", 202))
        assert m.flush_replica(30)
        want = held_positions(m)
    rcfg_b, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(rcfg_b.state_dir), key=key) as r:
        assert held_positions(r) == want


def test_the_online_backup_syncs_every_segment_it_holds(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.1 x 15.3: `backups create` beside a running bot makes durable every journal file whose records it
    backs up, the ``.next`` segment included (a record whose sync later fails is cut by the bot)."""
    from posstate.backup import acked
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9)
    synced: list[Path] = []
    real = acked._sync
    monkeypatch.setattr(acked, "_sync", lambda p: (synced.append(p), real(p))[1])
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        cur = acked.confirmed_current(cfg, ReadOptions(keyring=Keyring(key=key), require_encryption=True))
        assert int(cur.state.positions[("S1/USDT", "long")].contracts) == 201
        gate.release.set()
    assert next_path(cfg.journal_path) in synced


def test_serve_shows_changes_acknowledged_into_the_next_segment(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 18: `posstate serve DIR` re-reads the state when only the ``.next`` segment grew (a pending
    background compaction), instead of serving the state before it for as long as the compaction is pending."""
    from posstate.serve.sources import DirectorySource
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9)
    src = DirectorySource(cfg, ReadOptions(keyring=Keyring(key=key)))
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        src.poll()
        m.set_position(pos("S1/USDT", 201))
        src.poll()
        view = src.view()
        gate.release.set()
    assert int(view.positions[("S1/USDT", "long")].contracts) == 201


def _fail_compactions(monkeypatch: pytest.MonkeyPatch) -> None:
    from posstate.manager.compaction import BackgroundCompaction

    def attempt(self: Any, job: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BackgroundCompaction, "_bg_attempt", attempt)


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_close_leaves_a_fresh_backup_while_a_background_compaction_is_pending(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14.1 x 15.2: a clean close() while a background compaction keeps failing (segments pending) still
    leaves a backup holding every acknowledged change, and a recovery from it replays nothing twice."""
    _fail_compactions(monkeypatch)
    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9, durability=durability)
    with PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        m.set_position(pos("S1/USDT", 201))
        assert next_path(cfg.journal_path).exists()
        want = held_positions(m)
        before = set(cfg.backup_path.iterdir())
    assert set(cfg.backup_path.iterdir()) - before, "close() left no backup of the acknowledged state"
    monkeypatch.undo()
    cfg.state_path.write_bytes(b"damaged")  # the next load recovers from the close() backup plus the segments
    with PositionStateManager(cfg, key=key) as r:
        assert held_positions(r) == want
        rep = r.last_recovery
        assert rep is not None and rep.source.startswith("backup"), rep


@pytest.mark.parametrize("finished", [False, True], ids=["killed-mid-compaction", "killed-after-rename"])
def test_recovery_from_a_backup_taken_mid_rotation_replays_each_later_record_once(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, finished: bool
) -> None:
    """issue 14.1 x 15.2: a timed backup of memory taken while a background compaction is pending, then more
    changes, then SIGKILL (a crash image); the state file is lost: recovery from that backup replays exactly the
    records after it (from .next, or from the journal it was renamed to), none lost, none twice."""
    from posstate.backup import acked
    from posstate.selftest.harness import copy_tree

    live, img = tmp_path / "live", tmp_path / "img"
    cfg = StateConfig.in_dir(live, journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        info = acked.from_memory(m._files)  # what the timer's backup does
        assert info is not None
        m.set_position(pos("S2/USDT", 202))
        m.delete_position("S3/USDT", "long")
        if finished:
            gate.release.set()
            assert m.compact(wait=True, timeout=60)
            m.set_position(pos("S4/USDT", 204))
        want = held_positions(m)
        copy_tree(live, img)  # SIGKILL here
        gate.release.set()
    icfg = StateConfig.in_dir(img, journal_max_records=5, backup_interval=1e9)
    icfg.state_path.write_bytes(b"lost")
    for p in img.glob("positions.json.bak"):
        p.unlink()
    with PositionStateManager(icfg, key=key) as r:
        got = held_positions(r)
        rep = r.last_recovery
        assert rep is not None and rep.source.startswith("backup"), rep
        assert got == want, rep.journal


def test_bot_metadata_survives_a_background_compaction_and_changes_during_it(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 15.7: the background snapshot holds the bot metadata of the rotation point (the view dropped
    it), and set_bot_metadata() while the compaction is pending neither fails nor leaks into that snapshot."""
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions, read

    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        m.set_bot_metadata({"step": 1})
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_bot_metadata({"step": 2})  # during the rotation
        gate.release.set()
        assert m.compact(wait=True, timeout=60)
        snap = read(cfg.state_path, options=ReadOptions(keyring=Keyring(key=key))).state
        assert snap.bot_metadata == {"step": 1}, "the snapshot of the rotation point lost or leaked bot metadata"
    with PositionStateManager(cfg, key=key) as r:
        assert r.get_bot_metadata() == {"step": 2}


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_ledger_transitions_across_a_rotation_are_whole_in_every_image(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14.1 x 17.1: ledger transitions (one transaction each: the order entry, the lifecycle and the position
    it moves) landing while a background compaction is pending: a crash image mid-compaction and the state after
    it both load the same orders and positions, with no invariant broken (nothing applied twice, nothing half)."""
    from posstate import ExchangeAccountStateStore, Fill
    from posstate.selftest.harness import copy_tree

    btc = "BTC/USDT:USDT"
    live, img = tmp_path / "live", tmp_path / "img"
    cfg = StateConfig.in_dir(live, journal_max_records=4, backup_interval=1e9, durability=durability)

    def snapshot_of(s: ExchangeAccountStateStore) -> tuple[Any, ...]:
        orders = {o.key: (o.status, str(o.filled), o.fill_count, o.version) for o in s.get_ledger_orders()}
        return orders, {k: str(p.contracts) for k, p in s.manager.get_positions().items()}

    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m)
        cids = []
        for n in range(3):
            cid = s.record_order_intent(
                strategy="g", signal=f"c{n}", symbol=btc, side="buy", type="limit", amount="0.010", price="91000"
            ).key
            s.record_order_sent(cid)
            cids.append(cid)
        assert gate.entered.wait(60)
        for n, cid in enumerate(cids):
            s.record_order_accepted(cid, exchange_order_id=f"x{n}")
            s.apply_fill(Fill(trade_id=f"t{n}", client_order_id=cid, price=91000, amount="0.004"))
        want = snapshot_of(s)
        copy_tree(live, img)  # SIGKILL mid-compaction
        gate.release.set()
        assert m.compact(wait=True, timeout=60)
        s.close()
    for d in (live, img):
        with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability=durability), key=key) as r:
            s2 = ExchangeAccountStateStore(r)
            assert snapshot_of(s2) == want, d.name
            assert not s2.violations, d.name
            s2.close()


def test_recovery_from_an_online_backup_taken_mid_rotation_replays_the_later_records(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 15.3: `backups create` beside a bot whose compaction is pending holds records of .next; after
    the compaction renames .next over the journal and the state file is lost, recovery from that backup replays
    the records written after it (the backup names the segment of its last record, not the snapshot's journal)."""
    from posstate.backup import acked
    from posstate.selftest.harness import copy_tree
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9)
    img = StateConfig.in_dir(tmp_path / "img", journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        ring = Keyring(key=key)
        info = acked.online(cfg, ReadOptions(keyring=ring, require_encryption=True), write_keyring=ring)
        assert info is not None
        m.set_position(pos("S2/USDT", 202))
        gate.release.set()
        assert m.compact(wait=True, timeout=60)
        m.set_position(pos("S3/USDT", 203))
        want = held_positions(m)
        copy_tree(cfg.state_dir, img.state_dir)  # SIGKILL: no backup at close
    img.state_path.write_bytes(b"lost")
    for p in img.state_dir.glob("positions.json.bak"):
        p.unlink()
    with PositionStateManager(img, key=key) as r:
        got = held_positions(r)
        rep = r.last_recovery
        assert rep is not None and rep.source.startswith("backup"), rep
        assert got == want, rep.journal


def test_replica_prune_from_the_command_line_keeps_a_pending_compactions_segment() -> None:
    """issue 14.1 x 16.5: `posstate replica prune` (which knows no local journal) never deletes the ranges of a
    journal newer than the newest snapshot: the .next segment of a compaction still pending, whose snapshot is
    not written yet (the shipper had reported those records shipped)."""
    from posstate.backup.retention import Policy
    from posstate.replica import names as _names
    from posstate.replica import prune as _prune
    from posstate.replica.client import ObjectInfo

    d = "0" * 32
    old = _names.Snapshot(3, 0, 1, d)
    snap = _names.Snapshot(5, 0, 1, d)
    j1 = _names.Range(5, "aa" * 16, 0, 100, 0, 1, d)
    j2 = _names.Range(9, "bb" * 16, 0, 80, 0, 1, d)  # the segment of the pending compaction (generation 9)
    stale = _names.Range(3, "cc" * 16, 0, 50, 0, 1, d)
    objects = [ObjectInfo(o.key, 1) for o in (old, snap, j1, j2, stale)]
    plan = _prune.plan(objects, policy=Policy(max_backups=1))
    assert j2.key in plan.keep and j1.key in plan.keep
    assert old.key in plan.remove and stale.key in plan.remove


def test_a_planted_huge_segment_is_refused_before_it_is_downloaded(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 16.3 attack: ranges of a journal newer than the snapshot (a would-be pending segment) listed
    at more than a journal posstate reads are refused from the listing, before any byte of them is downloaded."""
    from posstate.core.errors import CorruptStateError
    from posstate.replica import names as _names
    from posstate.replica.file import FileClient
    from posstate.storage import fileops as fs

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url, backup_interval=1e9), key=key) as m:
        for i in range(3):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert m.flush_replica(30)
    root = tmp_path / "rep"
    jbytes = sum(p.stat().st_size for p in (root / "journal").rglob("*.psj"))
    planted = _names.Range(10**6, "dd" * 16, 0, 4096, 0, 1, "0" * 32)
    (root / planted.key).parent.mkdir(parents=True)
    (root / planted.key).write_bytes(bytes(4096))
    monkeypatch.setattr(fs, "DEFAULT_MAX_READ_BYTES", jbytes + 1024)
    fetched: list[str] = []
    real = FileClient.get
    monkeypatch.setattr(FileClient, "get", lambda self, k: fetched.append(k) or real(self, k))
    with pytest.raises(CorruptStateError, match="more than a journal"):
        restore_into(tmp_path / "b", url, None, key)
    assert planted.key not in fetched


def test_replica_verify_authenticates_a_pending_compactions_segment(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 16.3: `posstate replica verify` replays the ranges of a pending compaction's segment with the key
    (a restore uses them), instead of calling them unused after a digest check only."""
    from posstate.replica.verify import verify
    from tests.replica_util import client, options

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url, journal_max_records=5, backup_interval=1e9)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        assert gate.entered.wait(60)
        m.set_position(pos("S1/USDT", 201))
        assert m.flush_replica(30)
        rows = verify(client(url), options=options(key))
        gate.release.set()
    seg = [r for r in rows if "not used" in r["reason"] or "segment" in r["reason"]]
    assert seg and all(r["ok"] and "segment" in r["reason"] for r in seg), rows


def test_close_backs_up_changes_made_after_a_timed_backup_during_a_pending_compaction(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.1 x 15.2: a timed backup of memory while a compaction is pending, one more change, then close():
    the backup close() leaves holds that change too (the newest backup is never behind what was acknowledged)."""
    from posstate.backup import background as _bg
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions, read

    _fail_compactions(monkeypatch)
    cfg = StateConfig.in_dir(tmp_path / "a", journal_max_records=5, backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        svc = _bg.service(m._files)
        with svc.folder_lock:
            assert svc._from_memory("timer") is not None  # what a timer tick does
        m.set_position(pos("S5/USDT", 500))
        want = held_positions(m)
    newest = max(cfg.backup_path.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    st = read(newest, options=ReadOptions(keyring=Keyring(key=key))).state
    assert {k[0]: int(p.contracts) for k, p in st.positions.items()} == want
