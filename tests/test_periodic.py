"""Periodic validation: a daemon thread that reads, reports, never writes, and stops on close()."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from posstate import Position, PositionStateManager, StateConfig
from posstate.manager.periodic import PeriodicValidator, start_for

KEY = bytes(range(32))


def manager(tmp_path: Path, **kw: Any) -> PositionStateManager:
    cfg = StateConfig.in_dir(tmp_path / "state", periodic_validation=True, validation_interval=0.02, backup_interval=1e9, **kw)
    return PositionStateManager(cfg, key=KEY)


def wait_for(event_name: str, mgr: PositionStateManager) -> dict[str, Any]:
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def handler(d: dict[str, Any]) -> None:
        got.append(d)
        done.set()

    mgr.on(event_name, handler)
    assert done.wait(10), f"no {event_name} event"
    mgr.off(event_name, handler)
    return got[0]


def test_damaged_file_reports_validation_error_and_nothing_is_written(tmp_path: Path) -> None:
    """A damaged file on disk: validationError from the thread; the file is left byte for byte."""
    with manager(tmp_path) as m:
        m.save_positions([Position(symbol="BTC/USDT", side="long", contracts="1", entry_price="1")])
        data = bytearray(m.path.read_bytes())
        data[200] ^= 1
        m.path.write_bytes(bytes(data))
        event = wait_for("validationError", m)
        assert event["path"] == str(m.path)
        assert m.path.read_bytes() == bytes(data)
        assert not (tmp_path / "state/quarantine").exists()


def test_valid_file_reports_state_validated_and_close_stops_the_thread(tmp_path: Path) -> None:
    """stateValidated with the generation on disk; close() stops the thread."""
    m = manager(tmp_path)
    m.save_positions([Position(symbol="BTC/USDT", side="long", contracts="1", entry_price="1")])
    assert wait_for("stateValidated", m)["generation"] == 1
    validator = m._validator
    assert validator is not None and validator.running
    m.close()
    assert not validator.running and not validator._thread.is_alive()


def test_disabled_unless_both_flags_and_a_positive_interval() -> None:
    """No thread without validation_enabled and periodic_validation, or with interval 0."""
    assert start_for(lambda: None, enabled=False, interval=1.0) is None
    assert start_for(lambda: None, enabled=True, interval=0) is None


def test_a_raising_check_does_not_kill_the_thread() -> None:
    """An exception in the check is logged and the next interval runs again."""
    calls = threading.Semaphore(0)

    def check() -> None:
        calls.release()
        raise RuntimeError("boom")

    v = PeriodicValidator(check, interval=0.01).start()
    try:
        assert calls.acquire(timeout=10) and calls.acquire(timeout=10)
        assert v.running
    finally:
        v.stop()
    assert not v.running


def test_manager_without_periodic_validation_has_no_thread(tmp_path: Path) -> None:
    """The default config starts no background thread."""
    with PositionStateManager(StateConfig.in_dir(tmp_path / "state"), key=KEY) as m:
        assert m._validator is None
