"""Issue 15 (points 1-7) attack: the online backup, the backup of the acknowledged state, close(), keys,
asyncio and generations, tried as an attacker, a failing disk and a wrong clock would."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.storage import fileops as fs


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


class _BlockingSync(fs.FileOps):
    """fdatasync blocks (once armed) until released: a slow disk under a group commit."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        super().fdatasync(fd)


def test_acknowledged_copy_never_waits_for_a_group_sync_under_the_managers_lock(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 attack: the timed backup's copy of memory (group mode) waits for the pending group sync
    outside the manager's lock: the bot's other threads are not blocked behind a slow fdatasync."""
    cfg = StateConfig.in_dir(tmp_path / "s", durability="group", backup_interval=1e9)
    ops = _BlockingSync()
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))  # a plain record from here on
        drained = threading.Event()
        journal = m._journal
        real_drain = journal.drain

        def drain() -> None:
            drained.set()
            real_drain()

        journal.drain = drain  # type: ignore[method-assign]
        got: list[Any] = []
        with fs.use(ops):
            ops.armed = True
            writer = threading.Thread(target=m.set_position, args=(pos("A", 3),))
            writer.start()
            assert ops.entered.wait(30)  # the writer leads a group sync that is stuck in fdatasync
            copier = threading.Thread(target=lambda: got.append(m._files.acknowledged()))
            copier.start()
            assert drained.wait(30)
            free = m._lock.acquire(timeout=2)  # the bot's other threads need this lock now
            if free:
                m._lock.release()
            ops.release.set()
            writer.join(30)
            copier.join(30)
        assert free, "the manager's lock was held while waiting for a group fdatasync"
        assert got and got[0] is not None
        assert int(got[0].positions[("A", "long")].contracts) == 3
