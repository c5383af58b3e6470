"""Adversarial review of issue 12.8-12.12 (outcome unknown, writers in transactions, generation, stale
backups, clock): each test names the threat it proves posstate now withstands."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from posstate import (
    ConcurrentModificationError,
    PersistenceError,
    Position,
    PositionStateManager,
    PosStateError,
    StaleBackupError,
    StateConfig,
    TransactionError,
)
from posstate.storage import fileops as fs
from posstate.storage import unknown as _unknown

KEY = bytes(range(32))


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def make(d: Path, **kw: Any) -> PositionStateManager:
    return PositionStateManager(StateConfig.in_dir(d, **kw), key=KEY)


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    _unknown.forget_all()
    yield
    _unknown.forget_all()


# ------------------------------------------------------------------------------------------ forged marker
@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"kind": "snapshot", "generation": "x"}, id="generation-str"),
        pytest.param({"kind": "snapshot", "generation": None}, id="generation-null"),
        pytest.param({"kind": "snapshot", "generation": [1]}, id="generation-list"),
        pytest.param({"kind": "snapshot", "generation": "9" * 5000}, id="generation-huge-str"),
        pytest.param({"kind": "journal", "journal_id": None, "seq_lo": "a", "seq_hi": {}}, id="seq-junk"),
    ],
)
def test_forged_marker_never_raises_a_builtin_error(tmp_path: Path, entry: dict[str, Any]) -> None:
    """issue 12.8 (attacker plants positions.json.unknown): a marker with junk fields never makes a load
    raise a builtin ValueError/TypeError (the bot could not start); the load reports it and goes on."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
    marker = _unknown.marker_path(StateConfig.in_dir(tmp_path).state_path)
    marker.write_bytes(orjson.dumps({"version": 1, "changes": [entry]}))
    with make(tmp_path) as m2:
        assert contracts(m2) == {"A": 1}
        report = m2.last_recovery
        assert report is not None and len(report.unknown_outcomes) == 1
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ group commit
class _GatedSync(fs.FileOps):
    """The next fdatasync waits until released, then fails once with EIO; every other call is real."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.armed = True

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait()
            raise OSError(errno.EIO, "injected EIO at fdatasync")
        super().fdatasync(fd)


def test_group_rollback_moves_the_generation(tmp_path: Path) -> None:
    """issue 12.10 (second thread, group mode): a change another thread saw in memory and that its failed
    group sync then rolled back is a change: save(expected_generation=G) read while it was visible fails."""
    with make(tmp_path, durability="group") as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))  # the journal exists: the next record is a plain append + group sync
        gate = _GatedSync()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                m.set_position(pos("A", 3))
            except PosStateError as exc:
                errors.append(exc)

        with fs.use(gate):
            t = threading.Thread(target=writer)
            t.start()
            assert gate.entered.wait(10)
            seen_gen, seen = m.generation, contracts(m)  # the reader sees A=3 at generation G
            gate.release.set()
            t.join()
        assert seen == {"A": 3} and len(errors) == 1 and not errors[0].outcome_unknown  # type: ignore[attr-defined]
        assert contracts(m) == {"A": 2}  # rolled back: not what the reader saw
        with pytest.raises(ConcurrentModificationError):
            m.save(expected_generation=seen_gen)


# ------------------------------------------------------------------------------------------ transactions and asyncio
def test_async_writer_inside_transaction_is_refused_not_deadlocked(tmp_path: Path) -> None:
    """issue 12.9: `await manager.asave()` (and the other async writers) inside transaction() raises
    TransactionError at once; it never waits forever for the lock its own caller holds."""

    async def main(m: PositionStateManager) -> list[str]:
        refused = []
        with m.transaction():
            m.set_position(pos("A", 2))
            for name, call in {
                "asave": lambda: m.asave(),
                "asave_positions": lambda: m.asave_positions([]),
                "aload_positions": lambda: m.aload_positions(),
            }.items():
                try:
                    await asyncio.wait_for(call(), 5)
                except TransactionError:
                    refused.append(name)
        return refused

    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        assert asyncio.run(main(m)) == ["asave", "asave_positions", "aload_positions"]
        assert contracts(m) == {"A": 2}


def test_other_task_never_joins_a_suspended_transaction(tmp_path: Path) -> None:
    """issue 12.9 (second writer, asyncio): while one task's transaction() is suspended at an await, another
    task on the same thread never has its change silently folded into that transaction (acknowledged, then
    undone when the first task's block aborts): it is refused or it is durable."""

    async def main(m: PositionStateManager) -> str:
        inside = asyncio.Event()
        done = asyncio.Event()
        outcome = "durable"

        async def first() -> None:
            try:
                with m.transaction():
                    m.set_position(pos("A", 2))
                    inside.set()
                    await done.wait()
                    raise RuntimeError("abort the block")
            except RuntimeError:
                pass

        async def second() -> None:
            nonlocal outcome
            await inside.wait()
            try:
                m.set_position(pos("B", 1))  # returns: acknowledged (durability="sync")
            except TransactionError:
                outcome = "refused"
            done.set()

        await asyncio.gather(first(), second())
        return outcome

    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        outcome = asyncio.run(main(m))
    with make(tmp_path) as m2:
        if outcome == "durable":
            assert contracts(m2) == {"A": 1, "B": 1}  # the acknowledged change survived
        else:
            assert contracts(m2) == {"A": 1}


# ------------------------------------------------------------------------------------------ wrong clock
def test_future_dated_backup_is_not_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.11/12.12 (clock ahead when a backup was written): a backup that lacks a later journaled close
    is not restored as "age 0" because its time is in the future; the closed position never comes back."""
    import time as _time

    real = _time.time
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        monkeypatch.setattr(_time, "time", lambda: real() + 86400)  # the clock is a day ahead
        m.create_backup()
        monkeypatch.setattr(_time, "time", real)  # corrected
        m.delete_position("A", "long")  # acknowledged close, generation above the backup's
        with pytest.raises(StaleBackupError):
            m.restore_from_backup("latest")
        assert contracts(m) == {}


# ------------------------------------------------------------------------------------------ lying disk
class _RenameThenFail(fs.FileOps):
    """rename(2) takes effect, then reports EIO (an NFS retransmission, a lying disk)."""

    def replace(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        super().replace(src, dst)
        if Path(dst).name in ("positions.json", "positions.json.journal"):
            raise OSError(errno.EIO, "injected EIO after rename")


@pytest.mark.parametrize("durability", ["snapshot", "sync"])
def test_rename_that_reports_failure_after_renaming_is_not_a_known_failure(tmp_path: Path, durability: str) -> None:
    """issue 12.8 (lying disk): a rename that took effect but returned an error is never reported as a known
    failure (outcome_unknown False) while the "failed" positions are what the next load reads."""
    with make(tmp_path, durability=durability) as m:
        m.save_positions([pos("A", 1)])
        with fs.use(_RenameThenFail()), pytest.raises(PersistenceError) as info:
            m.batch_save_positions([pos("B", 1)], deletes=[("A", "long")])
        unknown = info.value.outcome_unknown
        assert contracts(m) == {"A": 1}
    with make(tmp_path, durability=durability) as m2:
        got = contracts(m2)
        if not unknown:
            assert got == {"A": 1}  # reported failed: it never comes back
        else:
            assert m2.last_recovery is not None and m2.last_recovery.unknown_outcomes
