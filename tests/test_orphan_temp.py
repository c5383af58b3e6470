"""A compaction worker outlives a bot killed with SIGKILL (issue 14): while the restarted bot sets aside the
temp files a crashed writer left, the orphaned worker notices its parent is gone and removes its own temp.
A temp that vanishes between the listing and the move is no error: the restart must not fail on it.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.core.errors import PersistenceError
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

KEY = bytes(range(32))


def _pos(i: int) -> Position:
    return Position(symbol=f"S{i}", side="long", contracts=Decimal(i + 1), entry_price=Decimal("100"))


class _VanishesAfter(fs.FileOps):
    """The real OS, where the orphaned worker removes *tmp* right after the operation named *after*."""

    def __init__(self, tmp: Path, after: str) -> None:
        self.tmp, self.after = str(tmp), after

    def lstat(self, path: Any) -> Any:
        st = super().lstat(path)
        if self.after == "lstat" and str(path) == self.tmp:
            Path(self.tmp).unlink(missing_ok=True)
        return st

    def link(self, src: Any, dst: Any) -> None:
        super().link(src, dst)
        if self.after == "link" and str(src) == self.tmp:
            Path(self.tmp).unlink(missing_ok=True)


@pytest.mark.parametrize("after", ["lstat", "link"], ids=["before-the-move", "between-link-and-unlink"])
def test_a_leftover_temp_that_vanishes_during_the_sweep_does_not_fail_the_restart(tmp_path: Path, after: str) -> None:
    """issue 14: the restarted bot opens (every change there) although the worker's temp disappears under the
    sweep; what the sweep already linked into quarantine stays there."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([_pos(i) for i in range(3)])
    tmp = _atomic.temp_name(cfg.state_path)  # a name as the worker's temp has
    tmp.write_bytes(b"a worker's half-written snapshot")
    with fs.use(_VanishesAfter(tmp, after)), PositionStateManager(cfg, key=KEY) as m:
        assert sorted(k[0] for k in m.get_positions()) == ["S0", "S1", "S2"]
    assert not tmp.exists()
    kept = list(cfg.quarantine_dir.iterdir()) if cfg.quarantine_dir.exists() else []
    assert len(kept) == (1 if after == "link" else 0)


class _QuarantineGone(fs.FileOps):
    """The real OS, where linking the temp into quarantine fails because the destination's folder is missing."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = str(tmp)

    def link(self, src: Any, dst: Any) -> None:
        if str(src) == self.tmp:
            raise FileNotFoundError(2, "No such file or directory", str(dst))
        super().link(src, dst)


def test_a_missing_path_other_than_the_temp_is_still_an_error(tmp_path: Path) -> None:
    """issue 14 (review): ENOENT about another path (the quarantine's) while the temp is still there is a real
    failure, reported, never logged as a temp an orphaned worker removed."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([_pos(0)])
    tmp = _atomic.temp_name(cfg.state_path)
    tmp.write_bytes(b"a worker's half-written snapshot")
    with fs.use(_QuarantineGone(tmp)), pytest.raises(PersistenceError) as err:
        PositionStateManager(cfg, key=KEY)
    assert "clean up leftover temp file" in str(err.value)
    assert tmp.exists()
