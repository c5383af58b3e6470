"""Issue 15.4 attack: the one under-count docs/RECOVERY.md admitted. A save (save_positions) finds the state
file it replaces damaged: it moves it to quarantine, so .bak stays the older copy, whose journal ends with the
fold record of that damaged file's generation. When this save's own snapshot is then lost with its header
unreadable, the fold record's generation was taken for the lost file's: "0 lost" while a save_positions() was
lost. The quarantined copy's generation shows the lost file was above it."""

from __future__ import annotations

from decimal import Decimal

from posstate import Position, PositionStateManager, StateConfig
from tests.test_fold_loss import as_if_killed, damage


def _pos(contracts: int, symbol: str = "A") -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def test_lost_save_over_a_quarantined_file_is_counted(cfg: StateConfig, key: bytes) -> None:
    """issue 15.4 attack: save_positions() over a damaged state file, then lost with an unreadable header: counted."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(_pos(1))
        m.save()  # G0: the .bak to be
        m.set_position(_pos(2))
        m.save()  # G1: folds the journal (its fold record ends it)
        damage(cfg.state_path, "payload")  # G1 damaged on disk under the running bot
        last = m.save_positions([_pos(9, "C")])  # quarantines G1; .bak stays G0
    as_if_killed(cfg)
    assert any(p.name.startswith("positions.json.") for p in cfg.quarantine_dir.iterdir())
    damage(cfg.state_path, "zeroed")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("C", "long") is None  # the save_positions() is really gone
        report = m.last_recovery
        assert report is not None and report.generations_lost is not None
        assert report.generations_lost >= 1, report
        assert report.new_generation > last
