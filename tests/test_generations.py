"""Issue 15.4: after a recovery the new generation is above every generation seen (quarantined copies
included), and ``last_recovery`` / ``posstate repair`` report the generations lost correctly."""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from posstate import Position, PositionStateManager, StateConfig
from posstate.cli.main import cli
from posstate.storage import container as _format


def pos(contracts: int) -> Position:
    return Position(symbol="A", side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def damage(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "payload":  # the header still says which generation the file was
        data[len(data) // 2] ^= 0xFF
    else:  # nothing of the file tells its generation
        data[:] = bytes(len(data))
    path.write_bytes(bytes(data))


def history(cfg: StateConfig, key: bytes, *, journal_tail: bool) -> tuple[int, int]:
    """Saves A=1, A=2 (backed up), A=3; then (journal_tail) A=4 as a journal record. Returns (generation of
    the backup, generation the bot last acknowledged)."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        m.save()
        backup = m.create_backup()
        m.set_position(pos(3))
        m.save()
        if journal_tail:
            m.set_position(pos(4))
        assert backup.generation is not None
        last = m.generation
    for other in cfg.backup_path.glob("positions_*.json"):  # as if killed: not the backup a clean close leaves
        if other != backup.path:
            other.unlink()
    return backup.generation, last


@pytest.mark.parametrize("where", ["payload", "zeroed"])
def test_loss_counts_journal_records_no_copy_holds(cfg: StateConfig, key: bytes, where: str) -> None:
    """issue 15.4: the state file and its journal's snapshot are lost: every generation above the backup
    recovered (the lost save and the journal records before and after it) is counted as lost."""
    backup_gen, last = history(cfg, key, journal_tail=True)
    damage(cfg.state_path, where)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2)
        report = m.last_recovery
        assert report is not None and report.generation == backup_gen
        assert report.generations_lost == last - backup_gen
        assert report.new_generation > last


@pytest.mark.parametrize("where", ["payload", "zeroed"])
def test_lost_last_save_is_counted_and_its_number_never_reused(cfg: StateConfig, key: bytes, where: str) -> None:
    """issue 15.4: snapshot mode, the last save damaged (its header readable or not): at least that save is
    reported lost, and the new generation is above the lost file's (a quarantined copy of it keeps it)."""
    cfg = cfg.replace(durability="snapshot")
    backup_gen, last = history(cfg, key, journal_tail=False)
    damage(cfg.state_path, where)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2)
        report = m.last_recovery
        assert report is not None and report.generation == backup_gen
        assert report.generations_lost == last - backup_gen == 1
        assert report.new_generation > last


def test_nothing_lost_when_the_journal_holds_every_change(cfg: StateConfig, key: bytes) -> None:
    """issue 15.4: the state file's header is gone, but .bak plus its journal hold every acknowledged change:
    0 generations lost, and the positions are the last ones."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        m.set_position(pos(3))
        m.save()
    damage(cfg.state_path, "zeroed")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(3)
        assert m.last_recovery is not None and m.last_recovery.generations_lost == 0


def test_new_generation_above_quarantined_copies(tmp_path: Path, key: bytes) -> None:
    """issue 15.4: a quarantined copy from an earlier incident holds generation 40: a recovery from an older
    backup writes above it, never a second content under a number a quarantined file already has."""
    other = StateConfig.in_dir(tmp_path / "other")
    with PositionStateManager(other, key=key) as m:
        for i in range(40):
            m.save_positions([pos(100 + i)])
        high = m.generation
    cfg = StateConfig.in_dir(tmp_path / "state", durability="snapshot")
    history(cfg, key, journal_tail=False)
    cfg.quarantine_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(other.state_path, cfg.quarantine_dir / "positions.json.20260101T000000Z.corrupt")
    assert _format.parse_header((cfg.quarantine_dir / "positions.json.20260101T000000Z.corrupt").read_bytes()).generation == high
    damage(cfg.state_path, "zeroed")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2)
        assert m.last_recovery is not None and m.last_recovery.new_generation > high
        assert m.generation > high


def test_repair_dry_run_and_repair_report_the_same_loss(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.4: `posstate repair --dry-run` and `posstate repair` print the loss the recovery reports."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    backup_gen, last = history(cfg, key, journal_tail=True)
    damage(cfg.state_path, "payload")
    runner = CliRunner()
    base = ["--state-dir", str(tmp_path / "state"), "--key-file", str(key_file)]
    want = f"{last - backup_gen} generations lost"
    r = runner.invoke(cli, [*base, "repair", "--dry-run"])
    assert want in r.output, r.output
    r = runner.invoke(cli, [*base, "repair", "--yes"])
    assert want in r.output, r.output
