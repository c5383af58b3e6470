"""PersistedAccountStateStore and the pending-persist protocol: no lost edits, copies, restore, kill -9."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import (
    AccountStateStore,
    PersistedAccountStateStore,
    PersistenceError,
    Position,
    PositionStateManager,
    StateConfig,
    generate_key,
)
from posstate.storage import fileops as fs

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, **kw: Any) -> StateConfig:
    kw.setdefault("encryption", False)
    return StateConfig.in_dir(tmp_path / "state", **kw)


DURABILITIES = pytest.mark.parametrize("durability", ["sync", "snapshot"])


@dataclass(frozen=True)
class Durable:
    positions: dict[Any, Position]
    metadata: dict[str, dict[str, Any]]


def durable(cfg: StateConfig, key: bytes | None = None) -> Durable:
    """What a fresh manager loads if the process died now: the state file and its journal are copied aside
    (the live manager keeps its writer lock) and opened by a new manager, with real file operations."""
    scratch = Path(tempfile.mkdtemp(dir=cfg.state_dir.parent, prefix="reopened-"))
    with fs.use(fs.FileOps()):
        for src in (cfg.state_path, cfg.journal_path):
            if src.exists():
                shutil.copyfile(src, scratch / src.name)
        with PositionStateManager(StateConfig.in_dir(scratch, encryption=cfg.encryption), key=key) as m:
            return Durable(m.get_positions(), m.get_all_symbol_metadata())


def files(cfg: StateConfig) -> dict[str, bytes]:
    """The bytes of the state file and the journal (those that exist)."""
    return {p.name: p.read_bytes() for p in (cfg.state_path, cfg.journal_path) if p.exists()}


def pos(symbol: str, side: str = "long", contracts: str = "1") -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(contracts), entry_price=Decimal("100"))  # type: ignore[arg-type]


class FailFsync(fs.FileOps):
    """Real file operations, except fsync and fdatasync (the journal's sync) fail with ENOSPC while
    ``failing`` is set."""

    def __init__(self, *, once: bool = False) -> None:
        self.failing = True
        self.once = once  # fail one sync only (then the cut of the failed record is durable: outcome known)

    def fsync(self, fd: int) -> None:
        if self.failing:
            self.failing = not self.once
            raise OSError(errno.ENOSPC, "No space left on device")
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        if self.failing:
            self.failing = not self.once
            raise OSError(errno.ENOSPC, "No space left on device")
        super().fdatasync(fd)


class HoldSync(fs.FileOps):
    """Real file operations; the first fsync/fdatasync made by thread *holder* (the one that makes the
    persist durable) blocks, before syncing, until ``release`` is set: that write is in flight."""

    def __init__(self) -> None:
        self.holder: int | None = None
        self.in_flight, self.release = threading.Event(), threading.Event()
        self.problems: list[str] = []

    def _hold(self) -> None:
        if threading.get_ident() == self.holder and not self.in_flight.is_set():
            self.in_flight.set()
            if not self.release.wait(30):
                self.problems.append("edit never happened")

    def fsync(self, fd: int) -> None:
        self._hold()
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._hold()
        super().fdatasync(fd)


# ------------------------------------------------------------------------------------------ protocol
def test_begin_finish_persist_clears_only_when_unchanged() -> None:
    """finish_persist clears the flag when nothing changed since begin_persist, and keeps it otherwise."""
    s = AccountStateStore()
    s.set_symbol_metadata("BTC/USDT", {"n": 1})
    t1 = s.begin_persist()
    assert t1.pending and t1.metadata == {"BTC/USDT": {"n": 1}}
    assert s.finish_persist(t1.token) is True
    assert not s.is_pending_persist()
    s.set_symbol_metadata_value("BTC/USDT", "n", 2)
    t2 = s.begin_persist()
    s.set_symbol_metadata_value("BTC/USDT", "n", 3)  # edit while t2 is being written
    assert s.finish_persist(t2.token) is False
    assert s.is_pending_persist()
    t3 = s.begin_persist()
    assert t3.metadata["BTC/USDT"] == {"n": 3}
    assert s.finish_persist(t3.token) is True


def test_returned_metadata_are_copies() -> None:
    """Editing any returned metadata (get, get_all, set's return, a persist ticket) changes neither the store
    nor the pending flag: the only way in is through a setter, which marks pending."""
    s = AccountStateStore()
    returned = s.set_symbol_metadata("BTC/USDT", {"trail": {"levels": [1, 2]}})
    ticket = s.begin_persist()
    s.finish_persist(ticket.token)
    returned["trail"]["levels"].append(3)
    s.get_symbol_metadata("BTC/USDT")["trail"]["levels"].append(4)  # type: ignore[index]
    s.get_all_symbol_metadata()["BTC/USDT"]["new"] = 1
    ticket.metadata["BTC/USDT"]["x"] = 1
    assert s.get_symbol_metadata("BTC/USDT") == {"trail": {"levels": [1, 2]}}
    assert not s.is_pending_persist()


@DURABILITIES
def test_edit_while_write_in_flight_is_not_lost(tmp_path: Path, durability: str) -> None:
    """A metadata edit made while a persist is being written (held inside the sync that makes n=1 durable:
    the snapshot's fsync, or the journal record's fdatasync) keeps the store pending; a reopened manager has
    the old value, and the next flush writes the edit. Events, not sleeps."""
    cfg = config(tmp_path, durability=durability)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m, write_through=False)
        store.set_symbol_metadata("BTC/USDT", {"n": 0})
        assert store.flush() is True  # the state (and in sync mode the journal) exists: n=1 is one plain write
        store.set_symbol_metadata_value("BTC/USDT", "n", 1)
        ops = HoldSync()

        def flush_in_thread() -> None:
            ops.holder = threading.get_ident()
            try:
                assert store.flush() is True
            except BaseException as exc:  # surfaced through ops.problems
                ops.problems.append(repr(exc))

        with fs.use(ops):
            flusher = threading.Thread(target=flush_in_thread)
            flusher.start()
            assert ops.in_flight.wait(30)
            store.set_symbol_metadata_value("BTC/USDT", "n", 2)  # the write of n=1 is in flight now
            ops.release.set()
            flusher.join()
        assert ops.problems == []
        assert store.is_pending_persist()
        assert durable(cfg).metadata["BTC/USDT"] == {"n": 1}
        assert store.flush() is True
        assert not store.is_pending_persist()
        assert durable(cfg).metadata["BTC/USDT"] == {"n": 2}


# ------------------------------------------------------------------------------------------ persisted store
def test_restore_does_not_mark_pending_and_hides_reserved(tmp_path: Path) -> None:
    """A new store restores positions and metadata from the manager, is not pending, and hides posstate's
    reserved metadata names; a flush does not delete them."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        m.set_position(pos("BTC/USDT"))
        m.set_symbol_metadata("BTC/USDT", {"entries": 2})
        m.set_symbol_metadata("__posstate_orders__", {"version": 1, "intents": {}})
        m.save()
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m)
        assert not store.is_pending_persist()
        assert store.get_active_position("BTC/USDT", "long") == pos("BTC/USDT")
        assert store.get_all_symbol_metadata() == {"BTC/USDT": {"entries": 2}}
        store.set_symbol_metadata("ETH/USDT", {"x": 1})
    state = durable(cfg)
    assert set(state.metadata) == {"BTC/USDT", "ETH/USDT", "__posstate_orders__"}


@DURABILITIES
def test_write_through_is_durable_on_return(tmp_path: Path, durability: str) -> None:
    """With write_through (the default), each position or metadata change is durable (a reopened manager has
    it) when the call returns; balance and price ticks are not persisted (no file changes)."""
    cfg = config(tmp_path, durability=durability)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m)
        store.set_active_position(pos("BTC/USDT", "short", "2"))
        assert durable(cfg).positions[("BTC/USDT", "short")].contracts == 2
        store.set_symbol_metadata("BTC/USDT", {"first_open": 1})
        store.set_symbol_metadata_value("BTC/USDT", "entries", 1)
        assert durable(cfg).metadata["BTC/USDT"] == {"first_open": 1, "entries": 1}
        generation, before = m.generation, files(cfg)
        store.set_wallet_balance(10)
        store.process_price_event("BTC/USDT", 90)
        assert m.generation == generation and files(cfg) == before
        store.delete_active_position("BTC/USDT", "short")
        store.delete_symbol_metadata("BTC/USDT")
        state = durable(cfg)
        assert state.positions == {} and state.metadata == {}
        assert not store.is_pending_persist()


@DURABILITIES
def test_failed_persist_stays_pending_then_succeeds(tmp_path: Path, durability: str) -> None:
    """ENOSPC at fsync/fdatasync: flush raises PersistenceError, a reopened manager has the previous value, the
    change stays pending (persistFailed event), and the next flush after the fault clears writes it."""
    cfg = config(tmp_path, durability=durability)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m, write_through=False)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        store.flush()
        assert m.wait_for_backups(30)  # the first timed backup runs in the background (issue 14.2)
        failures: list[dict[str, Any]] = []
        store.on("persistFailed", failures.append)
        store.set_symbol_metadata("BTC/USDT", {"n": 2})
        ops = FailFsync(once=True)
        with fs.use(ops):
            with pytest.raises(PersistenceError) as info:
                store.flush()
            assert not info.value.outcome_unknown
            assert store.is_pending_persist()
            assert durable(cfg).metadata["BTC/USDT"] == {"n": 1}
            ops.failing = False
            assert store.flush() is True
        assert len(failures) == 1
        assert not store.is_pending_persist()
        assert durable(cfg).metadata["BTC/USDT"] == {"n": 2}


def test_background_persist_thread(tmp_path: Path) -> None:
    """write_through=False with persist_interval: a background thread writes pending changes ('persisted'
    event), and close() stops it and writes what is still pending."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m, write_through=False, persist_interval=0.01)
        persisted = threading.Event()
        store.on("persisted", lambda _: persisted.set())
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        assert persisted.wait(30)
        assert durable(cfg).metadata["BTC/USDT"] == {"n": 1}
        store.close()
        assert store._thread is not None and not store._thread.is_alive()
        store.close()  # idempotent


@DURABILITIES
def test_close_flushes_pending(tmp_path: Path, durability: str) -> None:
    """Without write-through or a thread, nothing is written until close(), which persists what is pending."""
    cfg = config(tmp_path, durability=durability)
    with PositionStateManager(cfg) as m:
        with PersistedAccountStateStore(m, write_through=False) as store:
            store.set_symbol_metadata("BTC/USDT", {"n": 1})
            assert files(cfg) == {} and durable(cfg).metadata == {}
        assert durable(cfg).metadata["BTC/USDT"] == {"n": 1}


def test_journal_durability_relies_on_mutators(tmp_path: Path) -> None:
    """Under a journal durability ('sync'), the store hands changes to the manager's mutators and does not
    call save() (each mutator is durable on return there)."""
    cfg = config(tmp_path, durability="sync")
    with PositionStateManager(cfg) as m:
        saves: list[int] = []
        original = m.save
        m.save = lambda **kw: saves.append(1) or original(**kw)  # type: ignore[method-assign]
        store = PersistedAccountStateStore(m)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        assert saves == []
        assert m.get_symbol_metadata("BTC/USDT") == {"n": 1}


def test_encrypted_round_trip(tmp_path: Path) -> None:
    """With encryption on, a second store over a new manager restores what the first persisted."""
    key = generate_key()
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        PersistedAccountStateStore(m).set_symbol_metadata("BTC/USDT", {"n": 1})
    with PositionStateManager(cfg, key=key) as m:
        assert PersistedAccountStateStore(m).get_symbol_metadata("BTC/USDT") == {"n": 1}


CHILD = textwrap.dedent(
    """
    import sys
    from decimal import Decimal
    from posstate import PersistedAccountStateStore, Position, PositionStateManager, StateConfig
    m = PositionStateManager(StateConfig.in_dir(sys.argv[1], encryption=False))
    store = PersistedAccountStateStore(m)
    store.set_active_position(Position(symbol="BTC/USDT", side="long", contracts=Decimal("0.00000001"), entry_price=1))
    store.set_symbol_metadata("BTC/USDT", {"entries_long": 1})
    store.set_symbol_metadata_value("BTC/USDT", "trail", {"armed": True})
    print("persisted", flush=True)
    sys.stdin.read()  # keep running until killed
    """
)


def test_nothing_lost_across_kill_9(tmp_path: Path) -> None:
    """A child process changes positions and metadata, reports back, and is killed with SIGKILL: a new
    manager and store in the parent have every change (write-through made each durable on return)."""
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"persisted"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with PositionStateManager(StateConfig.in_dir(state_dir, encryption=False)) as m:
        store = PersistedAccountStateStore(m)
        p = store.get_active_position("BTC/USDT", "long")
        assert p is not None and str(p.contracts) == "1E-8"
        assert store.get_symbol_metadata("BTC/USDT") == {"entries_long": 1, "trail": {"armed": True}}


@DURABILITIES
def test_write_through_failure_raises_and_stays_pending(tmp_path: Path, durability: str) -> None:
    """In write-through mode a failed write makes the setter raise PersistenceError; the change is kept in
    memory and pending, a reopened manager has the old value, and the next change (fault cleared) writes both."""
    cfg = config(tmp_path, durability=durability)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        assert m.wait_for_backups(30)  # the first timed backup runs in the background (issue 14.2)
        ops = FailFsync(once=True)
        with fs.use(ops):
            with pytest.raises(PersistenceError):
                store.set_symbol_metadata_value("BTC/USDT", "n", 2)
            assert store.get_symbol_metadata("BTC/USDT") == {"n": 2}
            assert store.is_pending_persist()
            assert durable(cfg).metadata == {"BTC/USDT": {"n": 1}}
            ops.failing = False
            store.set_symbol_metadata("ETH/USDT", {"m": 1})
        assert durable(cfg).metadata == {"BTC/USDT": {"n": 2}, "ETH/USDT": {"m": 1}}
        assert not store.is_pending_persist()
