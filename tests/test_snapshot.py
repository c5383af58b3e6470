"""Snapshots are immutable and versioned; subscribers get bounded, ordered updates; the writer never blocks."""

from __future__ import annotations

import queue
import threading
from decimal import Decimal

import pytest

from posstate import AccountStateStore, AccountUpdate, Order, Position


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal(100))


def test_snapshot_is_immutable_and_isolated() -> None:
    """A snapshot taken earlier keeps its contents and version while the store changes; nothing in it can be edited."""
    s = AccountStateStore()
    s.set_active_position(pos("BTC/USDT", 1))
    s.set_symbol_metadata("BTC/USDT", {"levels": [1, 2], "trail": {"on": True}})
    snap = s.snapshot()
    s.set_active_position(pos("BTC/USDT", 2))
    s.set_symbol_metadata_value("BTC/USDT", "levels", [9])
    s.delete_active_position("BTC/USDT", "long")
    assert snap.positions[("BTC/USDT", "long")].contracts == 1
    assert snap.metadata["BTC/USDT"]["levels"] == (1, 2)
    assert s.snapshot().version == snap.version + 3
    with pytest.raises(TypeError):
        snap.positions[("X", "long")] = pos("X", 1)  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.metadata["BTC/USDT"]["trail"]["on"] = False  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.version = 0  # type: ignore[misc]


def test_snapshot_isolation_under_concurrent_writers() -> None:
    """With four writers and two readers running together, every snapshot a reader holds stays exactly as
    it was taken, versions a reader sees never go back, and the final version counts every write."""
    s = AccountStateStore()
    writers, per_writer = 4, 300
    start = threading.Barrier(writers + 2)
    done = threading.Event()
    failures: list[str] = []

    def writer(n: int) -> None:
        start.wait()
        for i in range(per_writer):
            s.set_active_position(pos(f"S{n}", i + 1))
            s.set_symbol_metadata(f"S{n}", {"i": i})

    def reader() -> None:
        start.wait()
        held = []
        last = -1
        while not done.is_set() or len(held) < 50:
            snap = s.snapshot()
            if snap.version < last:
                failures.append(f"version went back {last} -> {snap.version}")
            last = snap.version
            copy = (dict(snap.positions), {k: dict(v) for k, v in snap.metadata.items()})
            held.append((snap, copy))
        for snap, (positions, metadata) in held:
            if dict(snap.positions) != positions or {k: dict(v) for k, v in snap.metadata.items()} != metadata:
                failures.append(f"snapshot {snap.version} changed after it was taken")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert failures == []
    assert s.version == writers * per_writer * 2
    assert {k[0]: p.contracts for k, p in s.snapshot().positions.items()} == {f"S{n}": per_writer for n in range(writers)}


def test_subscriber_receives_ordered_updates_of_each_kind() -> None:
    """A subscriber gets balance, position, order, leverage and metadata updates in version order, from its start version on."""
    s = AccountStateStore()
    s.set_wallet_balance(5)
    q = s.subscribe(maxsize=16)
    assert q.start_version == s.version
    s.set_wallet_balance(10)
    s.set_active_position(pos("BTC/USDT", 1))
    s.upsert_active_order(Order(id="1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(1)))
    s.set_symbol_leverage("BTC/USDT", 3)
    s.set_symbol_metadata("BTC/USDT", {"a": 1})
    s.delete_active_position("BTC/USDT", "long")
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert [u.kind for u in got] == ["balance", "position", "order", "leverage", "metadata", "position"]
    assert [u.version for u in got] == list(range(q.start_version + 1, q.start_version + 7))
    assert got[0].value == Decimal(10)
    assert got[-1].key == ("BTC/USDT", "long") and got[-1].value is None


def test_slow_subscriber_dropped_with_resync_and_writer_never_blocks() -> None:
    """A subscriber that never reads is dropped once its queue is full: its last item is 'resync', it gets
    nothing after, the writer finishes all writes without waiting, and a fast subscriber still gets everything."""
    s = AccountStateStore()
    slow = s.subscribe(maxsize=4)
    fast = s.subscribe(maxsize=1000)
    writes = 200
    finished = threading.Event()

    def write() -> None:
        for i in range(writes):
            s.set_wallet_balance(i)
        finished.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    # If the writer blocked on the full queue this would time out (nobody reads `slow`).
    assert finished.wait(timeout=30), "writer blocked on a slow subscriber"
    t.join()
    assert slow.dropped
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert len(items) <= 4
    assert items[-1].kind == "resync"
    assert all(u.kind == "balance" for u in items[:-1])
    assert [u.version for u in items[:-1]] == sorted(u.version for u in items[:-1])
    s.set_wallet_balance(1)
    assert slow.empty()
    assert not fast.dropped
    assert fast.qsize() == writes + 1


def test_dropped_subscriber_resubscribes_and_catches_up() -> None:
    """After a resync, snapshot + a new subscription together give the full, current state."""
    s = AccountStateStore()
    q = s.subscribe(maxsize=2)
    for i in range(5):
        s.set_active_position(pos("BTC/USDT", i + 1))
    assert q.dropped
    q2 = s.subscribe(maxsize=8)
    snap = s.snapshot()
    s.set_active_position(pos("BTC/USDT", 10))
    update = q2.get_nowait()
    assert update.version > snap.version
    assert snap.positions[("BTC/USDT", "long")].contracts == 5
    assert update.value.contracts == 10


def test_consumer_thread_reading_concurrently_with_resync() -> None:
    """A consumer reading while the writer overruns it ends with exactly one resync as its final item."""
    s = AccountStateStore()
    q = s.subscribe(maxsize=3)
    seen: list[AccountUpdate] = []
    started = threading.Event()

    def consume() -> None:
        started.set()
        while True:
            u = q.get(timeout=30)
            seen.append(u)
            if u.kind == "resync":
                return

    t = threading.Thread(target=consume)
    t.start()
    started.wait()
    for i in range(200_000):
        if q.dropped:
            break
        s.set_wallet_balance(i)
    t.join()
    assert q.dropped
    assert [u.kind for u in seen].count("resync") == 1
    assert seen[-1].kind == "resync"
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_unsubscribe_and_bad_maxsize() -> None:
    """close() stops updates; maxsize below 2 (no room for the resync message) is refused."""
    s = AccountStateStore()
    q = s.subscribe(maxsize=4)
    q.close()
    s.set_wallet_balance(1)
    assert q.empty()
    assert s.unsubscribe(q) is False
    with pytest.raises(ValueError):
        s.subscribe(maxsize=1)
