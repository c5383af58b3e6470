"""Issue 14.2 attack (session 7): the timed backup that asks for a background compaction and copies its
snapshot, attacked with busy group writers, a bot holding the manager's lock, and a planted state file."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate import Position, PositionStateManager, StateConfig
from posstate.storage import fileops as fs

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _open(tmp_path: Path, durability: str, **kw: Any) -> tuple[PositionStateManager, StateConfig]:
    kw.setdefault("backup_interval", 1e9)
    kw.setdefault("journal_max_records", 1_000_000)  # no threshold compaction
    cfg = StateConfig.in_dir(tmp_path, durability=durability, **kw)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(50)])
    assert m.wait_for_backups(30)
    return m, cfg


class SlowSync(fs.FileOps):
    """A disk whose fdatasync takes a few milliseconds (a real disk's latency; tmpfs has none), so group
    writers always append while a sync is in flight."""

    def fdatasync(self, fd: int) -> None:
        threading.Event().wait(0.002)
        super().fdatasync(fd)


class Writers:
    """Threads calling set_position until stopped (each writes its own keys)."""

    def __init__(self, m: PositionStateManager, n: int) -> None:
        self.stop = threading.Event()
        self.count = 0
        self._m = m
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(n)]
        self.written = threading.Event()

    def _run(self, t: int) -> None:
        c = 2
        while not self.stop.is_set() and c < 2_000:
            self._m.set_position(pos(t, c))
            c += 1
            self.count += 1
            if self.count > 50:
                self.written.set()

    def __enter__(self) -> Writers:
        for th in self.threads:
            th.start()
        assert self.written.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(60)


def test_drain_returns_while_group_writers_keep_writing(tmp_path: Path) -> None:
    """issue 14.2 attack: Journal.drain() (the timed backup's ask syncs waiting records with it) makes the
    records written before the call durable and returns; it used to chase every record written after it too,
    so with busy group writers it never returned and no timed backup was taken while the bot was busy."""
    m, _cfg = _open(tmp_path, "group")
    try:
        with fs.use(SlowSync()), Writers(m, 4) as w:
            done = threading.Event()
            before: list[int] = []

            def drain() -> None:
                before.append(m._journal._written_seq)
                m._journal.drain()
                assert m._journal._durable_seq >= before[0]
                before.append(w.count)
                done.set()

            th = threading.Thread(target=drain)
            th.start()
            # The writers stop when drain returned, or after 2,000 changes each (the old livelock).
            assert done.wait(60)
            # Records written before the call need one or two syncs (a few changes each); the old drain
            # returned only when it happened to see no record waiting: thousands of changes later, or never.
            assert before[1] < 500, f"drain() returned only after {before[1]} of the writers' 8,000 changes"
        th.join(60)
    finally:
        m.close()
