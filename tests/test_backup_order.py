"""The newest backup always has the greatest id, whatever the clock reads: ``restore_from_backup("latest")``
restores the backup made last, never one before it (found by tests/test_model_based.py, a flaky failure)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from posstate import Position, PositionStateManager, StateConfig

KEY = bytes(range(32))
T = 1_790_000_000.0  # a whole second


def pos(contracts: str) -> Position:
    return Position(symbol="BTC/USDT", side="long", contracts=contracts, entry_price="100")  # type: ignore[arg-type]


class Clock:
    """``time.time()`` reads *now*; ``time.gmtime()`` without an argument reads ``time(NULL)``, which on Linux is
    the coarse clock: in the first milliseconds of a second it still shows the previous one (*coarse_lag*)."""

    def __init__(self, now: float, *, coarse_lag: float = 0.0) -> None:
        self.now = now
        self.coarse_lag = coarse_lag
        self._gmtime = time.gmtime

    def time(self) -> float:
        return self.now

    def gmtime(self, secs: float | None = None) -> time.struct_time:
        return self._gmtime(math.floor(self.now - self.coarse_lag) if secs is None else secs)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(T)
    monkeypatch.setattr(time, "time", c.time)
    monkeypatch.setattr(time, "gmtime", c.gmtime)
    return c


def _manager(tmp_path: Path) -> PositionStateManager:
    m = PositionStateManager(StateConfig.in_dir(tmp_path / "s", backup_interval=1e9), key=KEY)
    m.load_positions()
    return m


def test_pre_restore_backup_is_newest_when_the_coarse_clock_lags(tmp_path: Path, clock: Clock) -> None:
    """A restore's pre-restore backup made in the same millisecond as a backup named from the precise clock
    (the coarse clock still in the previous second) is the newest backup: a second restore of "latest" undoes
    the first, it does not restore the older backup again."""
    clock.now, clock.coarse_lag = T + 0.004, 0.01
    with _manager(tmp_path) as m:
        m.set_position(pos("1"))
        m.create_backup()
        m.set_position(pos("2"))
        first = m.restore_from_backup("latest")
        assert m.get_positions() == {pos("1").key: pos("1")}
        assert first.pre_restore_backup is not None
        assert m.list_backups()[0].id == first.pre_restore_backup
        second = m.restore_from_backup("latest", accept_older=True)
        assert second.backup.id == first.pre_restore_backup
        assert m.get_positions() == {pos("2").key: pos("2")}


def test_backups_after_the_clock_stepped_back_are_still_latest(tmp_path: Path, clock: Clock) -> None:
    """After the wall clock is stepped back (NTP), a new backup and a pre-restore backup still sort after
    every backup already there, so "latest" is the one made last."""
    with _manager(tmp_path) as m:
        m.set_position(pos("1"))
        m.create_backup()
        clock.now = T - 30
        m.set_position(pos("2"))
        made = m.create_backup()
        assert m.list_backups()[0].id == made.id
        m.set_position(pos("3"))
        restored = m.restore_from_backup("latest", accept_older=True)
        assert restored.backup.id == made.id and m.get_positions() == {pos("2").key: pos("2")}
        assert m.list_backups()[0].id == restored.pre_restore_backup
        again = m.restore_from_backup("latest", accept_older=True)
        assert again.backup.id == restored.pre_restore_backup and m.get_positions() == {pos("3").key: pos("3")}
