"""Issue 14 leftovers (close): close() stops a background prune's full checks at their next slice (nothing is
lost by not finishing a verification) and takes the backup of the acknowledged state at close; it never
waits for the verification and never leaves a half-written or late-named backup."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import turns as _turns

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("durability", ["group", "sync"])
def test_close_stops_a_prune_held_at_a_slice_and_takes_the_close_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14 leftovers: a prune's full check held at a slice is stopped by close(), which leaves a close backup."""
    # A short bound: the old code gives up after it (and says so); the fixed close() never waits for it.
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 2.0)
    entered = threading.Event()
    release = threading.Event()
    slices: list[int] = []
    planted: set[str] = set()
    real_check = _backups._sliced.check_bytes_in_slices

    def gated(data: bytes, *, path: Path, options: Any, pause: Any, size: int = 16) -> Any:
        if path.name in planted:  # the prune's full check of a backup this process never verified: held
            entered.set()
            while not release.wait(0.01):
                slices.append(1)
                pause()  # between two slices: where close() may stop it
        return real_check(data, path=path, options=options, pause=pause, size=size)

    cfg = StateConfig.in_dir(tmp_path, durability=durability, backup_interval=0.05, compaction="thread")  # in-process slices
    events: list[dict[str, Any]] = []
    m = PositionStateManager(cfg, key=KEY)
    try:
        m.save_positions([pos(i) for i in range(50)])
        assert m.wait_for_backups(30)
        st = m._state.copy()
        for k in range(4):  # backups this process never verified: the next prune checks each in full
            info = _backups.write_backup(
                st,
                backup_dir=cfg.backup_path,
                keyring=m._write_keyring,
                compression_level=cfg.compression_level,
                options=m._read,
                now=1_700_000_000 + 3600 * k,
            )
            planted.add(info.path.name)
        monkeypatch.setattr(_backups._sliced, "check_bytes_in_slices", gated)
        m.on("backupCreated", events.append)
        m.on("backupFailed", events.append)
        m.set_position(pos(1, 5))  # the timer backs it up from memory, then prunes: held at a slice
        assert entered.wait(60)
        m.set_position(pos(2, 7))  # acknowledged after that backup: only the close backup holds it
        want = m.get_positions()
        read = m._read
        m.close()
        after_close = _listing(cfg.backup_path)
    finally:
        release.set()
        m.close()
    failed = [e for e in events if e["event"] == "backupFailed"]
    assert failed == []
    closing = [e for e in events if e["event"] == "backupCreated" and e.get("operation") == "close"]
    assert len(closing) == 1, events
    assert Path(closing[0]["path"]).name in after_close
    assert not [n for n in after_close if _backups.parse_name(n) is None and not n.startswith(".")], after_close
    assert _listing(cfg.backup_path) == after_close  # nothing named after close() returned
    assert _turns._turns.issued == _turns._turns.serving
    held = _statefile.read(Path(closing[0]["path"]), options=read, what="backup").state.positions
    assert held[("S00002", "long")].contracts == Decimal(7), held  # the change acknowledged last
    assert len(held) == len(want)


class _JoinSpy:
    """The backup thread, with the timeouts close() joins it with recorded."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.joins: list[float | None] = []

    def join(self, timeout: float | None = None) -> None:
        self.joins.append(timeout)
        self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()


def test_close_waits_for_a_backup_being_written_once_in_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 leftovers: a backup held mid-write costs close() one CLOSE_TIMEOUT in all (not two); it is never named after."""
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.3)
    entered = threading.Event()
    release = threading.Event()

    class Held(fs.FileOps):
        """The timed backup's temp file (a copy of a compaction's snapshot, issue 14.2) held at its fsync."""

        def fsync(self, fd: int) -> None:
            if threading.current_thread().name == "posstate-backup" and not release.is_set():
                entered.set()
                release.wait(60)
            super().fsync(fd)

    cfg = StateConfig.in_dir(tmp_path, durability="group", backup_interval=0.05)
    events: list[dict[str, Any]] = []
    m = PositionStateManager(cfg, key=KEY)
    try:
        m.save_positions([pos(i) for i in range(50)])
        assert m.wait_for_backups(30)
        before = _listing(cfg.backup_path)
        monkeypatch.setattr(fs, "_active", Held())
        m.on("backupCreated", events.append)
        m.on("backupFailed", events.append)
        m.set_position(pos(1, 5))  # the timer asks for a compaction and copies its snapshot: held mid-write
        assert entered.wait(60)
        m.set_position(pos(2, 7))
        svc = m._files.backups
        assert svc is not None and svc._thread is not None
        real_thread = svc._thread
        spy = _JoinSpy(real_thread)
        svc._thread = spy  # type: ignore[assignment]
        m.close()
        after_close = _listing(cfg.backup_path)
    finally:
        release.set()
        m.close()
    real_thread.join(60)
    assert not real_thread.is_alive()
    # The close backup waited for the folder until the deadline; the thread's stop got what was left of it.
    assert len(spy.joins) == 1 and spy.joins[0] is not None and spy.joins[0] < 0.3 / 2, spy.joins
    reasons = [e["reason"] for e in events if e["event"] == "backupFailed"]
    assert len(reasons) == 2 and "cancelled before it got its name" in reasons[1], reasons
    assert [e for e in events if e["event"] == "backupCreated"] == []
    assert [n for n in after_close if not n.startswith(".")] == before  # its temp file is held mid-write
    assert _listing(cfg.backup_path) == before  # never named after close(), and its temp file removed
    assert _turns._turns.issued == _turns._turns.serving
