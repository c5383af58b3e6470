"""PersistedAccountStateStore and the pending-persist protocol: no lost edits, copies, restore, kill -9."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
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
    _statefile,
    generate_key,
)
from posstate import _fileops as fs

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, **kw: Any) -> StateConfig:
    kw.setdefault("encryption", False)
    return StateConfig.in_dir(tmp_path / "state", **kw)


def on_disk(cfg: StateConfig, key: bytes | None = None) -> _statefile.StateData:
    from posstate._crypto import Keyring

    return _statefile.read(
        cfg.state_path, options=_statefile.ReadOptions(keyring=Keyring.resolve(key=key, passphrase=None))
    ).state


def pos(symbol: str, side: str = "long", contracts: str = "1") -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(contracts), entry_price=Decimal("100"))  # type: ignore[arg-type]


class FailFsync(fs.FileOps):
    """Real file operations, except fsync fails with ENOSPC while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = True

    def fsync(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().fsync(fd)


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


def test_edit_while_write_in_flight_is_not_lost(tmp_path: Path) -> None:
    """A metadata edit made while a persist is being written (held open inside the save) keeps the store
    pending; the file has the old value, and the next flush writes the edit. Events, not sleeps."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m, write_through=False)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        in_flight, edited = threading.Event(), threading.Event()
        problems: list[str] = []

        def hold_save(_: dict[str, Any]) -> None:
            if not in_flight.is_set():
                in_flight.set()
                if not edited.wait(30):
                    problems.append("edit never happened")

        m.on("stateSaved", hold_save)
        flusher = threading.Thread(target=store.flush)
        flusher.start()
        assert in_flight.wait(30)
        store.set_symbol_metadata_value("BTC/USDT", "n", 2)  # the write of n=1 is in flight now
        edited.set()
        flusher.join()
        assert problems == []
        assert store.is_pending_persist()
        assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 1}
        assert store.flush() is True
        assert not store.is_pending_persist()
        assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 2}


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
    state = on_disk(cfg)
    assert set(state.metadata) == {"BTC/USDT", "ETH/USDT", "__posstate_orders__"}


def test_write_through_is_durable_on_return(tmp_path: Path) -> None:
    """With write_through (the default), each position or metadata change is in the file when the call returns;
    balance and price ticks are not persisted."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m)
        store.set_active_position(pos("BTC/USDT", "short", "2"))
        assert on_disk(cfg).positions[("BTC/USDT", "short")].contracts == 2
        store.set_symbol_metadata("BTC/USDT", {"first_open": 1})
        store.set_symbol_metadata_value("BTC/USDT", "entries", 1)
        assert on_disk(cfg).metadata["BTC/USDT"] == {"first_open": 1, "entries": 1}
        generation = m.generation
        store.set_wallet_balance(10)
        store.process_price_event("BTC/USDT", 90)
        assert m.generation == generation
        store.delete_active_position("BTC/USDT", "short")
        store.delete_symbol_metadata("BTC/USDT")
        state = on_disk(cfg)
        assert state.positions == {} and state.metadata == {}
        assert not store.is_pending_persist()


def test_failed_persist_stays_pending_then_succeeds(tmp_path: Path) -> None:
    """ENOSPC at fsync: flush raises PersistenceError, the file keeps the previous value, the change stays
    pending (persistFailed event), and the next flush after the fault clears writes it."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m, write_through=False)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        store.flush()
        failures: list[dict[str, Any]] = []
        store.on("persistFailed", failures.append)
        store.set_symbol_metadata("BTC/USDT", {"n": 2})
        ops = FailFsync()
        with fs.use(ops):
            with pytest.raises(PersistenceError):
                store.flush()
            assert store.is_pending_persist()
            assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 1}
            ops.failing = False
            assert store.flush() is True
        assert len(failures) == 1
        assert not store.is_pending_persist()
        assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 2}


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
        assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 1}
        store.close()
        assert store._thread is not None and not store._thread.is_alive()
        store.close()  # idempotent


def test_close_flushes_pending(tmp_path: Path) -> None:
    """Without write-through or a thread, close() persists what is pending."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        with PersistedAccountStateStore(m, write_through=False) as store:
            store.set_symbol_metadata("BTC/USDT", {"n": 1})
            assert not cfg.state_path.exists()
        assert on_disk(cfg).metadata["BTC/USDT"] == {"n": 1}


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


def test_write_through_failure_raises_and_stays_pending(tmp_path: Path) -> None:
    """In write-through mode a failed write makes the setter raise PersistenceError; the change is kept in
    memory and pending, the file keeps the old value, and the next change (fault cleared) writes both."""
    cfg = config(tmp_path)
    with PositionStateManager(cfg) as m:
        store = PersistedAccountStateStore(m)
        store.set_symbol_metadata("BTC/USDT", {"n": 1})
        ops = FailFsync()
        with fs.use(ops):
            with pytest.raises(PersistenceError):
                store.set_symbol_metadata_value("BTC/USDT", "n", 2)
            assert store.get_symbol_metadata("BTC/USDT") == {"n": 2}
            assert store.is_pending_persist()
            ops.failing = False
            store.set_symbol_metadata("ETH/USDT", {"m": 1})
        assert on_disk(cfg).metadata == {"BTC/USDT": {"n": 2}, "ETH/USDT": {"m": 1}}
        assert not store.is_pending_persist()
