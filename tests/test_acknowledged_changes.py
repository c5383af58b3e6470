"""Issue 12.9-12.12: writers inside transactions, optimistic concurrency in the journal modes, the stale-backup
guard and recovery's order, each against what was acknowledged."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import (
    ConcurrentModificationError,
    PersistedAccountStateStore,
    Position,
    PositionStateManager,
    StaleBackupError,
    StateConfig,
    TransactionError,
    UnrecoverableStateError,
)
from tests.killed import as_if_killed

KEY = bytes(range(32))


class Abort(Exception):
    pass


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def held(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


# ------------------------------------------------------------------------------------------ 12.9
def _flush_store(m: PositionStateManager) -> Any:
    store = PersistedAccountStateStore(m, write_through=False)
    store.set_symbol_metadata("S", {"n": 1})
    return store.flush()


WRITERS: dict[str, Callable[[PositionStateManager], Any]] = {
    "save": lambda m: m.save(),
    "save_positions": lambda m: m.save_positions([pos("W")]),
    "batch_save_positions": lambda m: m.batch_save_positions([pos("W")]),
    "load_positions": lambda m: m.load_positions(),
    "create_backup": lambda m: m.create_backup(),
    "restore_from_backup": lambda m: m.restore_from_backup("latest", accept_older=True),
    "attempt_recovery": lambda m: m.attempt_recovery(),
    "repair_state": lambda m: m.repair_state(),
    "account_flush": _flush_store,
    "compact": lambda m: m.compact(),
}


@pytest.mark.parametrize("durability", ["sync", "snapshot"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writer_inside_transaction_is_refused(tmp_path: Path, writer: str, durability: str) -> None:
    """issue 12.9: every public writer called inside transaction() raises TransactionError and writes nothing;
    the aborted block leaves memory and disk at the state before it."""
    cfg = StateConfig.in_dir(tmp_path, durability=durability, backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A")])
        m.create_backup()
        files = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "positions.json.lock"}
        with pytest.raises(Abort), m.transaction():
            m.set_position(pos("T"))
            m.delete_position("A", "long")
            with pytest.raises(TransactionError, match="inside transaction"):
                WRITERS[writer](m)
            raise Abort
        assert held(m) == {"A": 1}
        after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "positions.json.lock"}
        assert after == files, writer
    with PositionStateManager(cfg, key=KEY) as m2:
        assert held(m2) == {"A": 1}


# ------------------------------------------------------------------------------------------ 12.10
@pytest.mark.parametrize("durability", ["sync", "group"])
def test_expected_generation_fails_after_a_journaled_change(tmp_path: Path, durability: str) -> None:
    """issue 12.10: in the journal modes every acknowledged change (and transaction) moves the generation, so
    save(expected_generation=G) read before it raises ConcurrentModificationError; a reload shows the same."""
    cfg = StateConfig.in_dir(tmp_path, durability=durability)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A")])
        g = m.generation
        m.set_position(pos("A", 2))
        assert m.generation > g
        with pytest.raises(ConcurrentModificationError):
            m.save(expected_generation=g)
        g2 = m.generation
        with m.transaction():
            m.set_position(pos("B"))
            m.delete_position("A", "long")
        assert m.generation == g2 + 1  # one transaction, one step
        for change in (lambda: m.set_symbol_metadata("B", {"x": 1}), lambda: m.delete_symbol_metadata("B")):
            before = m.generation
            change()
            assert m.generation == before + 1
        last = m.generation
    with PositionStateManager(cfg, key=KEY) as m2:
        m2.load_positions()
        assert m2.generation == last  # replaying the records gives the generation the changes set
        assert m2.save(expected_generation=last) == last + 1


# ------------------------------------------------------------------------------------------ 12.11
def _clock(monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    real = _REAL_TIME
    monkeypatch.setattr(time, "time", lambda: real() + offset)


_REAL_TIME = time.time


def test_restore_refuses_backup_older_than_journaled_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.11: a backup taken with the last snapshot, then positions closed by journaled deletes (sync
    mode) two hours later: restoring it without accept_older is refused (the age counts the deletes), and the
    closed position does not come back; with accept_older it is restored on purpose."""
    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9, backup_threshold=3600)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A"), pos("B")])
        backup = m.create_backup()
        _clock(monkeypatch, 7200)
        assert m.delete_position("A", "long")
        with pytest.raises(StaleBackupError) as info:
            m.restore_from_backup(backup.id)
        assert info.value.age > 3600
        assert held(m) == {"B": 1}
    with PositionStateManager(cfg, key=KEY) as m2:
        assert held(m2) == {"B": 1}
        with pytest.raises(StaleBackupError):  # a new manager reads the record's time from the journal
            m2.restore_from_backup(backup.id)
        m2.restore_from_backup(backup.id, accept_older=True)
        assert held(m2) == {"A": 1, "B": 1}


def test_backup_age_for_dry_runs_counts_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.11: backup_age (the CLI's dry run, no manager) measures from the newest journal record too."""
    from posstate.backup import ops as _backup_ops

    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A")])
        backup = m.create_backup()
        _clock(monkeypatch, 7200)
        m.set_position(pos("A", 3))
    written = int(backup.written_at.timestamp() * 1000) if backup.written_at else 0
    assert _backup_ops.backup_age(cfg, _backup_ops._backups.scan(cfg.backup_path), written) > 7000


def test_recovery_refuses_backup_older_than_journaled_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.11: the state file is damaged, its journal (of a later snapshot than the only backup) holds a
    delete made two hours after the backup: recovery refuses the backup (UnrecoverableStateError) instead of
    bringing the closed position back."""
    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9, backup_threshold=3600)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A"), pos("B")])
        m.create_backup()
        m.set_symbol_metadata("B", {"n": 1})
        m.save()  # a newer snapshot, naming a new journal the backup cannot replay
        _clock(monkeypatch, 7200)
        m.delete_position("A", "long")
    as_if_killed(cfg)  # the close backup (issue 15.2) would hold the delete: this is about the journal alone
    data = bytearray(cfg.state_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cfg.state_path.write_bytes(bytes(data))
    cfg.bak_path.unlink(missing_ok=True)
    with PositionStateManager(cfg, key=KEY) as m2, pytest.raises(UnrecoverableStateError, match="too old"):
        m2.load_positions()


# ------------------------------------------------------------------------------------------ 12.12
@pytest.mark.parametrize("step", [pytest.param(-7200, id="clock-back"), pytest.param(7200, id="clock-forward")])
def test_recovery_keeps_the_highest_generation_whatever_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    """issue 12.12: snapshot mode, a backup at generation 1, then the clock steps (back or forward) and two
    more saves: with the state file damaged, recovery uses the .bak (generation 2, the highest valid), never
    the backup because of its time; the clock only adds a warning to the candidates."""
    cfg = StateConfig.in_dir(tmp_path, durability="snapshot", backup_interval=1e9, backup_threshold=3600)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A", 1)])
        m.create_backup()
    _clock(monkeypatch, step)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos("A", 2)])
        m.save_positions([pos("A", 3)])
    monkeypatch.setattr(time, "time", _REAL_TIME)
    if step > 0:  # the damaged file's claim is in the future now: recovery goes on without it
        _clock(monkeypatch, step)
    data = bytearray(cfg.state_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cfg.state_path.write_bytes(bytes(data))
    with PositionStateManager(cfg, key=KEY) as m2:
        assert held(m2) == {"A": 2}
        report = m2.last_recovery
        assert report is not None and report.source == cfg.bak_path.name and report.generation == 2
        if step < 0:
            assert any("clock" in verdict for _, verdict in report.candidates)
