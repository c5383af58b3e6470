"""Backups and restores in the journal modes: a backup is a compacted snapshot; a restore loses no journaled change."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from posstate import PositionStateManager, StateConfig
from posstate.model.position import Position
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

KEY = bytes(range(32))


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def make(d: Path, durability: str) -> PositionStateManager:
    return PositionStateManager(StateConfig.in_dir(d, durability=durability, backup_interval=1e9), key=KEY)


def symbols_in(path: Path) -> set[str]:
    options = _statefile.ReadOptions(keyring=Keyring(key=KEY))
    return {k[0] for k in _statefile.read(path, options=options).state.positions}


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_backup_holds_journaled_changes(tmp_path: Path, durability: str) -> None:
    """create_backup() after journaled changes folds them into a snapshot first: the backup holds them."""
    with make(tmp_path, durability) as m:
        m.set_position(pos("A"))
        m.set_position(pos("B"))
        info = m.create_backup()
    assert symbols_in(info.path) == {"A", "B"}


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_restore_keeps_journaled_changes_in_the_pre_restore_backup(tmp_path: Path, durability: str) -> None:
    """Restoring an older backup: the pre-restore backup holds every journaled change, and the restored
    state loads cleanly afterwards (the old journal cannot be replayed onto it)."""
    with make(tmp_path, durability) as m:
        m.set_position(pos("A"))
        old = m.create_backup()
        m.set_position(pos("B"))  # journaled only: not in any snapshot yet
        result = m.restore_from_backup(old.id)
        assert set(k[0] for k in m.get_positions()) == {"A"}
    assert result.pre_restore_backup is not None
    cfg = StateConfig.in_dir(tmp_path)
    (pre,) = cfg.backup_path.glob(f"positions_{result.pre_restore_backup}.json")
    assert symbols_in(pre) == {"A", "B"}
    with make(tmp_path, durability) as m2:
        assert set(k[0] for k in m2.load_positions()) == {"A"}
        assert m2.last_recovery is None
