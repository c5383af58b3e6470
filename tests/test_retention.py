"""Retention: max_backups + borg-like keep rules; damaged backups never push good ones out."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from posstate import BackupInfo, Position, PositionStateManager, StateConfig
from posstate.backup import backups as _backups
from posstate.backup.retention import Policy, plan
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

KEY = bytes(range(32))
NOW = datetime(2026, 3, 18, 12, 30, tzinfo=timezone.utc)  # a Wednesday


def info(when: datetime, *, valid: bool = True, damaged: bool = False, gen: int = 1) -> BackupInfo:
    bid = when.strftime("%Y%m%d_%H%M%S")
    return BackupInfo(
        id=bid,
        path=Path(f"/nowhere/positions_{bid}.json"),
        created_at=when,
        generation=gen,
        size=100,
        position_count=1,
        key_id=None,
        valid=valid,
        damaged=damaged,
        reason="" if valid else "bad",
    )


def actions(decisions: list[Any]) -> dict[str, str]:
    return {d.backup.id: d.action for d in decisions}


def every(step: timedelta, n: int, start: datetime = NOW) -> list[BackupInfo]:
    return [info(start - step * i, gen=1000 - i) for i in range(n)]


def test_damaged_backups_never_push_good_ones_out() -> None:
    """max_backups=2 with the two newest damaged: two valid ones are kept, the damaged are quarantined."""
    bs = [info(NOW, valid=False, damaged=True), info(NOW - timedelta(minutes=5), valid=False, damaged=True)]
    bs += every(timedelta(minutes=5), 3, NOW - timedelta(minutes=10))
    got = actions(plan(bs, policy=Policy(max_backups=2), now=NOW))
    assert [got[b.id] for b in bs] == ["quarantine", "quarantine", "keep", "keep", "remove"]


def test_unreadable_backup_is_kept_and_fills_no_slot() -> None:
    """A backup this key cannot read (not damaged) is kept untouched and does not count towards max_backups."""
    bs = [info(NOW, valid=False, damaged=False), *every(timedelta(minutes=5), 2, NOW - timedelta(minutes=5))]
    decisions = plan(bs, policy=Policy(max_backups=1), now=NOW)
    assert [d.action for d in decisions] == ["keep", "keep", "remove"]
    assert "fills no slot" in decisions[0].reason and "newest valid" in decisions[1].reason


def test_newest_valid_backup_is_never_pruned_and_reasons_are_given() -> None:
    """With max_backups=1 the newest valid is kept; every other decision carries a reason."""
    bs = every(timedelta(minutes=1), 4)
    decisions = plan(bs, policy=Policy(max_backups=1), now=NOW)
    assert [d.action for d in decisions] == ["keep", "remove", "remove", "remove"]
    assert all(d.reason for d in decisions) and "redundant" in decisions[1].reason


def test_keep_hourly_keeps_newest_of_each_hour_like_borg() -> None:
    """keep_hourly=3 beyond max_backups=1: the newest of each of the 3 next hours (an hour already kept does not count)."""
    bs = every(timedelta(minutes=20), 15)  # 12:30 back to 07:50
    got = plan(bs, policy=Policy(max_backups=1, keep_hourly=3), now=NOW)
    kept = [d.backup.created_at.strftime("%H:%M") for d in got if d.action == "keep"]
    assert kept == ["12:30", "11:50", "10:50", "09:50"]


def test_keep_daily_weekly_and_within() -> None:
    """keep_within keeps everything recent; keep_daily / keep_weekly keep one per day / ISO week."""
    bs = every(timedelta(hours=6), 60)  # 15 days, four a day
    got = plan(bs, policy=Policy(max_backups=1, keep_within=13 * 3600, keep_daily=2, keep_weekly=2), now=NOW)
    kept = [d.backup.created_at for d in got if d.action == "keep"]
    within = [t for t in kept if NOW - t <= timedelta(hours=13)]
    assert len(within) == 3  # 12:30, 06:30, 00:30 today
    days = sorted({t.date() for t in kept if NOW - t > timedelta(hours=13)}, reverse=True)
    assert days[:2] == [NOW.date() - timedelta(days=1), NOW.date() - timedelta(days=2)]
    weeks = {t.isocalendar()[:2] for t in kept}
    assert len(weeks) == 3  # this week (already kept) plus two earlier weeks
    reasons = [d.reason for d in got if d.action == "keep"]
    assert any(r.startswith("keep_weekly") for r in reasons) and any(r.startswith("keep_daily") for r in reasons)


# ------------------------------------------------------------------------------------------ with files


def manager(tmp_path: Path, **kw: Any) -> PositionStateManager:
    kw.setdefault("backup_interval", 0.0)
    return PositionStateManager(StateConfig.in_dir(tmp_path / "state", **kw), key=KEY)


def pos(contracts: str) -> Position:
    return Position(symbol="BTC/USDT", side="long", contracts=contracts, entry_price="100")


def test_prune_with_damaged_backups_in_the_mix(tmp_path: Path) -> None:
    """dry_run changes nothing; the real prune quarantines damaged backups and keeps max_backups valid ones."""
    with manager(tmp_path, max_backups=10) as m:
        for i in range(5):
            m.save_positions([pos(str(i + 1))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
    names = sorted(os.listdir(tmp_path / "state/backups"))
    for n in names[-2:]:  # damage the two newest
        p = tmp_path / "state/backups" / n
        data = bytearray(p.read_bytes())
        data[220] ^= 1
        p.write_bytes(bytes(data))
    with manager(tmp_path, max_backups=2) as m:
        pruned = []
        m.on("backupPruned", pruned.append)
        dry = m.prune_old_backups(dry_run=True)
        assert sorted(os.listdir(tmp_path / "state/backups")) == names and not pruned
        assert [d.backup.generation for d in dry.kept] == [3, 2] and [d.backup.generation for d in dry.removed] == [1]
        assert len(dry.quarantined) == 2 and dry.dry_run
        done = m.prune_old_backups()
        assert not done.dry_run and pruned and len(pruned[0]["quarantined"]) == 2
        assert sorted(os.listdir(tmp_path / "state/backups")) == names[1:3]
        assert len(os.listdir(tmp_path / "state/quarantine")) == 2


def test_other_key_backup_is_kept_untouched(tmp_path: Path) -> None:
    """A backup written with another key is neither removed nor quarantined by pruning."""
    with manager(tmp_path, max_backups=1) as m:
        m.save_positions([pos("1")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        foreign = _backups.write_backup(
            m._state,
            backup_dir=tmp_path / "state/backups",
            keyring=Keyring.resolve(key=bytes(32), passphrase=None),
            compression_level=3,
            options=_statefile.ReadOptions(keyring=Keyring.resolve(key=bytes(32), passphrase=None)),
        )
        m.save_positions([pos("2")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos("3")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        result = m.prune_old_backups()
        assert foreign.path.exists()
        assert any(d.backup.id == foreign.id and "another key" in d.reason for d in result.kept)
        assert [b.generation for b in m.list_backups() if b.id != foreign.id] == [3]


def test_prune_runs_after_each_backup(tmp_path: Path) -> None:
    """With max_backups=2, four saves leave the two newest backups."""
    with manager(tmp_path, max_backups=2) as m:
        for i in range(4):
            m.save_positions([pos(str(i + 1))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert [b.generation for b in m.list_backups()] == [4, 3]


def test_tombstones_are_kept_as_long_as_the_oldest_backup(tmp_path: Path) -> None:
    """A tombstone survives while a backup from before the deletion exists, and is dropped after."""
    with manager(tmp_path, max_backups=2) as m:
        other = Position(symbol="ETH/USDT", side="short", contracts="1", entry_price="5")
        m.save_positions([pos("1"), other])  # gen 1
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos("2")])  # gen 2: ETH closed, tombstone rev 2
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        m.save_positions([pos("3")])  # gen 3: backups 3, 2 (oldest backup is generation 2, it reflects the close)
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert ("ETH/USDT", "short") in m._state.position_tombstones
        m.save_positions([pos("4")])  # gen 4: floor became 2 after the last prune, tombstone rev 2 <= 2 dropped
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
        assert ("ETH/USDT", "short") not in m._state.position_tombstones
        assert all(
            ("ETH/USDT", "short") not in _statefile.read(b.path, options=m._read).state.positions for b in m.list_backups()
        )
