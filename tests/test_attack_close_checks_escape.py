"""Attack on the close() that stops a prune's full checks: an explicit backup operation is never stopped."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.backup import prune as _prune
from posstate.core.errors import PosStateError

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _plant(m: PositionStateManager, cfg: StateConfig, n: int = 3) -> None:
    """Backups this process never verified: a prune checks each in full (in slices, pausing between)."""
    st = m._state.copy()
    for k in range(n):
        _backups.write_backup(
            st,
            backup_dir=cfg.backup_path,
            keyring=m._write_keyring,
            compression_level=cfg.compression_level,
            options=m._read,
            now=1_700_000_000 + 3600 * k,
        )


def _explicit(m: PositionStateManager, what: str, out: list[object]) -> None:
    try:
        out.append(m.prune_old_backups() if what == "prune" else m.create_backup())
    except PosStateError as exc:  # a typed error is a fair answer; anything else escaped
        out.append(exc)
    except Exception as exc:
        out.append(("escaped", repr(exc)))


@pytest.mark.parametrize("what", ["prune", "create"])
def test_explicit_backup_op_from_a_close_backup_handler_is_not_stopped(tmp_path: Path, what: str) -> None:
    """issue 14 leftovers (attack): prune_backups()/create_backup() from the close backup's event handler runs to its end."""
    cfg = StateConfig.in_dir(tmp_path, durability="group", backup_interval=3600)
    m = PositionStateManager(cfg, key=KEY)
    out: list[object] = []
    try:
        m.save_positions([pos(i) for i in range(40)])
        assert m.wait_for_backups(30)
        _plant(m, cfg)
        m.set_position(pos(1, 5))  # only the close backup holds it

        def handler(e: dict[str, Any]) -> None:
            if e.get("operation") == "close" and not out:
                _explicit(m, what, out)

        m.on("backupCreated", handler)
        m.close()
    finally:
        m.close()
    assert len(out) == 1, out
    assert not (isinstance(out[0], tuple) and out[0][0] == "escaped"), out


def test_explicit_prune_from_a_background_backup_handler_during_close_is_not_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 leftovers (attack): prune_backups() from a background backup's handler while close() runs is not stopped."""
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 60.0)
    cfg = StateConfig.in_dir(tmp_path, durability="group", backup_interval=0.05)
    m = PositionStateManager(cfg, key=KEY)
    out: list[object] = []
    began = threading.Event()
    try:
        m.save_positions([pos(i) for i in range(40)])
        assert m.wait_for_backups(30)
        _plant(m, cfg)
        svc = m._files.backups
        assert svc is not None
        real = svc._stop_verifying

        def stop_verifying(timeout: float) -> float:
            try:
                return real(timeout)
            finally:
                began.set()

        monkeypatch.setattr(svc, "_stop_verifying", stop_verifying)
        entered = threading.Event()

        def handler(e: dict[str, Any]) -> None:
            if threading.current_thread().name == "posstate-backup" and not out:
                entered.set()
                assert began.wait(60)
                _explicit(m, "prune", out)

        m.on("backupCreated", handler)
        m.set_position(pos(1, 5))  # the timer backs it up; its handler waits until close() began
        assert entered.wait(60)
        m.close()
    finally:
        began.set()
        m.close()
    assert len(out) == 1, out
    assert not (isinstance(out[0], tuple) and out[0][0] == "escaped"), out


def test_close_from_the_close_backups_handler_prunes_nothing_after_the_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 leftovers (attack): close() from the close backup's own handler: no prune after the writer lock went.
    (Since session 15 that handler runs once the backup released the folder, after its prune: what counts is
    whether the writer lock was held when the prune ran, not when its event went out.)"""
    cfg = StateConfig.in_dir(tmp_path, durability="group", backup_interval=3600, max_backups=1)
    m = PositionStateManager(cfg, key=KEY)
    pruned_while: list[bool] = []
    real_prune = _prune.prune_backups

    def prune(*a: Any, **k: Any) -> Any:
        pruned_while.append(m._writer_lock.held)
        return real_prune(*a, **k)

    monkeypatch.setattr(_prune, "prune_backups", prune)
    try:
        m.save_positions([pos(i) for i in range(20)])
        assert m.wait_for_backups(30)
        m.create_backup()  # verified by this process: a prune needs no full check to remove the older one
        m.set_position(pos(1, 5))  # only the close backup holds it

        def created(e: dict[str, Any]) -> None:
            if e.get("operation") == "close":
                m.close()  # closes the manager (releases the writer lock) before the close backup's prune

        m.on("backupCreated", created)
        m.close()
    finally:
        m.close()
    assert m.closed
    assert pruned_while and False not in pruned_while, pruned_while  # no prune by a manager without the lock
