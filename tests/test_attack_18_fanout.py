"""Issue 18 attack on the batched fan-out (serve/fanout.py, serve/stream.py): frame sizes, gaps and duplicates
for a client connecting during a burst, the log's memory, and the manager's lock on an idle poll."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import AccountStateStore, StateConfig
from tests.serve_support import pos, require, run, serving, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

from websockets.asyncio.client import connect  # noqa: E402

from posstate.account.types import AccountUpdate  # noqa: E402
from posstate.serve import fanout as _fanout  # noqa: E402
from posstate.serve.fanout import Fanout  # noqa: E402
from posstate.serve.stream import StreamOptions  # noqa: E402

HAND_POLLED: dict[str, Any] = {"poll_interval": 3600.0, "stream": StreamOptions(heartbeat_interval=0.2, queue_size=4096)}


async def _next(ws: Any) -> dict[str, Any]:
    """The next message that is not a heartbeat (a hang guard of 20 s, not a timing assertion)."""
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg["topic"] != "heartbeat":
            return msg


def test_a_poll_of_big_changes_is_split_into_frames_a_default_client_accepts(manager: Any) -> None:
    """issue 18.3 attack: one poll of many large metadata changes is sent as several ``batch`` frames, each under
    the 1 MiB a default WebSocket client accepts (one frame per poll was 2.4 MB and closed it with 1009)."""
    m = manager()
    m.load_positions()
    blob = "x" * 200_000
    with serving(m, **HAND_POLLED) as server:

        async def watch() -> tuple[list[int], list[dict[str, Any]]]:
            async with connect(ws_url(server), max_size=2**20) as ws:  # the websockets default, said aloud
                await _next(ws)
                for i in range(12):
                    m.set_symbol_metadata(f"S{i}/USDT", {"blob": blob, "i": i})
                server.source.poll()
                sizes: list[int] = []
                got: list[dict[str, Any]] = []
                while len(got) < 12:
                    raw = await asyncio.wait_for(ws.recv(), 20)
                    msg = json.loads(raw)
                    if msg["topic"] == "batch":
                        sizes.append(len(raw))
                        got.extend(msg["messages"])
                return sizes, got

        sizes, got = run(watch())
    assert len(sizes) > 1 and max(sizes) < 2**20
    assert sorted(x["data"]["i"] for x in got) == list(range(12))


def test_a_change_bigger_than_a_frame_still_arrives_alone() -> None:
    """issue 18.3 attack: a single message larger than the batch cap is its own batch (never dropped, never
    merged with others), and the batches cover every update once, in order."""
    fan = Fanout()
    sub = fan.add(100)
    big = {"blob": "y" * (_fanout.MAX_BATCH_BYTES + 10)}
    fan.publish(
        [
            AccountUpdate("balance", 1, "balance", Decimal(1)),
            AccountUpdate("metadata", 2, "S/USDT", big),
            AccountUpdate("balance", 3, "balance", Decimal(3)),
        ]
    )
    batches = fan.read(sub)
    assert [[i[0] for i in b.items] for b in batches] == [[1], [2], [3]]
    assert [(b.start, b.end) for b in batches] == [(0, 1), (1, 2), (2, 3)]
    assert [json.loads(b.text)["version"] for b in batches] == [1, 2, 3]


def _apply(state: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    for msg in messages:
        if msg["topic"] == "position.update":
            if msg["position"] is None:
                state.pop(msg["key"], None)
            else:
                state[msg["key"]] = msg["position"]["contracts"]


def test_clients_connecting_during_a_burst_end_with_exactly_the_stores_state() -> None:
    """issue 18.3 attack: clients that connect while a bot thread writes and the poll thread publishes each end
    with the store's state (snapshot plus batches, no change missed or applied twice: versions strictly rise)."""
    store = AccountStateStore()
    stop = threading.Event()

    def bot() -> None:
        i = 0
        while not stop.is_set() and i < 30_000:  # never the 65536 the server's subscription holds
            i += 1
            store.set_active_position(pos(f"S{i % 37}/USDT", i))
            if i % 5 == 0:
                store.delete_active_position(f"S{(i * 7) % 37}/USDT", "long")

    with serving(store, poll_interval=0.001, stream=StreamOptions(queue_size=100_000)) as server:

        async def one(final: asyncio.Event) -> dict[str, Any]:
            async with connect(ws_url(server)) as ws:
                snap = await _next(ws)
                state = {k: v["position"]["contracts"] for k, v in snap["positions"].items()}
                last = snap["version"]
                while True:
                    msg = await _next(ws)
                    assert msg["topic"] == "batch", msg
                    versions = [x["version"] for x in msg["messages"]]
                    assert versions == sorted(versions) and versions[0] > last, (last, versions)
                    last = versions[-1]
                    _apply(state, msg["messages"])
                    if final.is_set() and last >= store.version:
                        return state

        async def scenario() -> list[dict[str, Any]]:
            final = asyncio.Event()
            tasks = []
            for _ in range(8):
                tasks.append(asyncio.ensure_future(one(final)))
                await asyncio.wait_for(_until(lambda: len(server.source.streams()) >= len(tasks)), 20)
            stop.set()
            await asyncio.to_thread(writer.join, 20)
            final.set()
            # one more change after the last write, so every client wakes once more (its version is the last)
            store.set_wallet_balance("1")
            return await asyncio.wait_for(asyncio.gather(*tasks), 30)

        writer = threading.Thread(target=bot)
        writer.start()
        try:
            states = run(scenario())
        finally:
            stop.set()
            writer.join(20)
    expected = {f"{s}|{side}": str(p.contracts) for (s, side), p in store.get_positions().items()}
    assert states and all(s == expected for s in states)


def test_clients_connecting_during_a_burst_end_with_exactly_the_managers_state(cfg: StateConfig, key: bytes) -> None:
    """issue 18.3 attack: the same against a live manager (``durability="snapshot"``, read through its change
    mark): clients that connect while the bot writes each end with the manager's positions."""
    from posstate import PositionStateManager

    m = PositionStateManager(dataclasses.replace(cfg, durability="snapshot"), key=key)
    m.load_positions()
    stop = threading.Event()

    def bot() -> None:
        i = 0
        while not stop.is_set() and i < 30_000:
            i += 1
            m.set_position(pos(f"S{i % 37}/USDT", i))
            if i % 5 == 0:
                m.delete_position(f"S{(i * 7) % 37}/USDT", "long")

    try:
        with serving(m, poll_interval=0.001, stream=StreamOptions(queue_size=100_000)) as server:

            async def one() -> dict[str, Any]:
                async with connect(ws_url(server)) as ws:
                    snap = await _next(ws)
                    state = {k: v["position"]["contracts"] for k, v in snap["positions"].items()}
                    last = snap["version"]
                    while "END/USDT|long" not in state:
                        msg = await _next(ws)
                        assert msg["topic"] == "batch", msg
                        assert msg["version"] > last, (last, msg["version"])
                        last = msg["version"]
                        _apply(state, msg["messages"])
                    return state

            async def scenario() -> list[dict[str, Any]]:
                tasks = []
                for _ in range(8):
                    tasks.append(asyncio.ensure_future(one()))
                    await asyncio.wait_for(_until(lambda: len(server.source.streams()) >= len(tasks)), 20)
                stop.set()
                await asyncio.to_thread(writer.join, 20)
                m.set_position(pos("END/USDT", 1))  # the last change: every client stops once it has it
                return await asyncio.wait_for(asyncio.gather(*tasks), 30)

            writer = threading.Thread(target=bot)
            writer.start()
            try:
                states = run(scenario())
            finally:
                stop.set()
                writer.join(20)
        expected = {f"{s}|{side}": str(p.contracts) for (s, side), p in m.get_positions().items()}
        assert states and all(s == expected for s in states)
    finally:
        m.close()


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def test_a_client_that_never_reads_does_not_keep_the_log_growing() -> None:
    """issue 18.3 attack: a subscription that never reads holds at most its queue_size updates of the log; past
    that it is dropped and the log trimmed to what the reading client still needs."""
    fan = Fanout()
    idle = fan.add(50)
    busy = fan.add(10_000)
    for v in range(1, 1001):
        fan.publish([AccountUpdate("balance", v, "balance", Decimal(v))])
        for b in fan.read(busy):
            busy.seq = b.end
        assert sum(b.end - b.start for b in fan._log) <= 51
    assert idle.resync is not None and fan.subscriptions() == (busy,)
    assert len(fan._log) <= 1


def test_an_idle_poll_of_a_snapshot_mode_manager_copies_nothing_under_its_lock(
    cfg: StateConfig, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18.1 attack: with durability="snapshot" the server's poll copied the whole state under the
    manager's lock every poll, changed or not (the bot waits on O(state) work); now an idle poll copies nothing,
    and a change (saved or not) is still seen."""
    from posstate import PositionStateManager
    from posstate.model.document import StateData
    from posstate.serve.sources import ManagerSource

    m = PositionStateManager(dataclasses.replace(cfg, durability="snapshot"), key=key)
    try:
        m.load_positions()
        for i in range(200):
            m.set_position(pos(f"S{i}/USDT", i + 1))
        copies: list[int] = []
        real = StateData.copy
        counting = threading.local()

        def counted(self: StateData) -> StateData:
            if getattr(counting, "on", False):
                copies.append(len(self.positions))
            return real(self)

        monkeypatch.setattr(StateData, "copy", counted)
        src = ManagerSource(m)

        def poll() -> int:
            """Copies of the state the poll made."""
            before = len(copies)
            counting.on = True
            try:
                src.poll()
            finally:
                counting.on = False
            return len(copies) - before

        assert poll() == 1 and src.view().positions[("S5/USDT", "long")].contracts == 6
        assert [poll() for _ in range(5)] == [0] * 5  # idle: nothing copied under the bot's lock
        real_lock, locked = m._lock, []

        class _Counted:
            def __enter__(self) -> None:
                locked.append(1)
                real_lock.acquire()

            def __exit__(self, *exc: object) -> None:
                real_lock.release()

        m._lock = _Counted()
        try:
            assert poll() == 0 and locked == []  # an idle poll does not even take the bot's lock
        finally:
            m._lock = real_lock
        m.set_position(pos("S5/USDT", 99))  # unsaved change in snapshot mode: generation and dirty stay
        assert poll() == 1 and src.view().positions[("S5/USDT", "long")].contracts == 99
        m.set_position(pos("S5/USDT", 100))  # a second unsaved change (the case the old key missed)
        assert poll() == 1 and src.view().positions[("S5/USDT", "long")].contracts == 100
        m.save()
        assert poll() == 1 and src.view().generation == m.generation
        assert poll() == 0
        with m.transaction():
            m.set_position(pos("S6/USDT", 42))
        assert poll() == 1 and src.view().positions[("S6/USDT", "long")].contracts == 42
        with pytest.raises(KeyError), m.transaction():  # a change undone is a change too: still 42
            m.set_position(pos("S6/USDT", 43))
            raise KeyError("undo")
        poll()
        assert src.view().positions[("S6/USDT", "long")].contracts == 42
        src.close()
    finally:
        m.close()


@pytest.mark.parametrize(
    "order",
    [
        pytest.param({"timestamp": 2**70}, id="timestamp-past-64-bits"),
        pytest.param({"client_order_id": "cid-\ud800"}, id="lone-surrogate"),
    ],
)
def test_an_order_orjson_cannot_encode_neither_gaps_the_stream_nor_fails_the_snapshot(order: dict[str, Any]) -> None:
    """issue 18.3 attack: an order the account store accepts but orjson cannot encode (an integer past 64 bits,
    a lone surrogate) made the poll thread's publish raise: the client silently missed that poll's changes and
    the snapshot answered 500. Now it is encoded (stdlib JSON) and arrives with the rest of the batch."""
    import httpx

    from posstate import Order

    store = AccountStateStore()
    with serving(store, **HAND_POLLED) as server:

        async def watch() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                await _next(ws)
                store.upsert_active_order(
                    Order(id="o1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(1), **order)
                )
                store.set_active_position(pos("BTC/USDT", 3))
                server.source.poll()
                msg = await _next(ws)
                return list(msg["messages"])

        got = run(watch())
        snap = httpx.get(server.url + "/api/account/snapshot", timeout=20)
    assert [m["topic"] for m in got] == ["order.update", "position.update"]
    assert snap.status_code == 200 and "o1" in snap.json()["orders"]


def test_a_publish_that_fails_sends_every_client_resync_never_a_silent_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: if building a poll's messages fails (any bug), the clients that would miss them are
    sent ``resync`` (a fresh snapshot holding the changes), never left with a silent gap; the next poll works."""
    from posstate.serve.sources import StoreSource

    store = AccountStateStore()
    src = StoreSource(store)
    fan = src.fanout
    sub = fan.add(100)
    real = _fanout.messages

    def broken(update: AccountUpdate, orders: Any) -> Any:
        if update.kind == "balance":
            raise RuntimeError("a bug")
        return real(update, orders)

    monkeypatch.setattr(_fanout, "messages", broken)
    store.set_active_position(pos("BTC/USDT", 1))
    store.set_wallet_balance("5")
    with pytest.raises(RuntimeError):
        src.poll()
    assert sub.resync == store.version and fan.subscriptions() == ()
    assert src.view().version == store.version and src.view().balance == Decimal(5)
    monkeypatch.setattr(_fanout, "messages", real)
    late = fan.add(100)
    store.set_active_position(pos("BTC/USDT", 2))
    src.poll()
    assert [i[0] for b in fan.read(late) for i in b.items] == [store.version]
    src.close()


def test_a_storm_every_client_would_be_dropped_for_is_not_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: a poll with more changes than any client may fall behind (10,000 in one poll, queue_size
    256) sends every client ``resync`` without encoding a message of it (no 10,000 encodings in the bot's
    process, no giant frame); the open orders it made are still known (no false order.fill after it)."""
    from posstate import Order

    encoded: list[Any] = []
    real = _fanout.to_bytes
    monkeypatch.setattr(_fanout, "to_bytes", lambda obj: encoded.append(obj) or real(obj))
    fan = Fanout()
    subs = [fan.add(256) for _ in range(3)]
    order = Order(id="o1", symbol="S/USDT", side="buy", type="limit", status="NEW", amount=Decimal(2), filled=Decimal(1))
    storm = [AccountUpdate("balance", v, "balance", Decimal(v)) for v in range(1, 10_001)]
    fan.publish([*storm, AccountUpdate("order", 10_001, "o1", order)])
    assert encoded == [] and all(s.resync == 10_001 for s in subs) and fan.subscriptions() == ()
    assert fan.dropped_count == 3 and len(fan._log) == 0
    late = fan.add(256)
    fan.publish([AccountUpdate("order", 10_002, "o1", dataclasses.replace(order, status="PARTIALLY_FILLED"))])
    assert [i[1] for b in fan.read(late) for i in b.items] == ["order.update"]  # filled did not grow: no order.fill


class _StuckSocket:
    """A WebSocket whose peer stopped reading: the snapshot is sent, every later send waits forever."""

    def __init__(self) -> None:
        self.query_params: dict[str, str] = {}
        self.sent: list[str] = []
        self.stuck = asyncio.Event()
        self.closed: int | None = None

    async def accept(self) -> None:
        return None

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        if len(self.sent) > 1:
            self.stuck.set()
            await asyncio.Event().wait()

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self, code: int = 1000) -> None:
        self.closed = code


def test_a_client_dropped_while_its_send_hangs_is_counted_as_one_drop() -> None:
    """issue 18.3 attack: a client whose socket stopped taking data is dropped by the poll thread (too far
    behind) while a send to it hangs, then that send times out: one client, so posstate_stream_drops_total must
    grow by 1 (it grew by 2: the poll thread's drop and the send timeout were both counted)."""
    from posstate.serve.sources import StoreSource
    from posstate.serve.stream import CLOSE_RESYNC, Wakeup, run_stream

    store = AccountStateStore()
    source = StoreSource(store)
    options = StreamOptions(queue_size=2, send_timeout=0.2)

    async def scenario() -> _StuckSocket:
        ws = _StuckSocket()
        wakeup = Wakeup.for_options(options)
        task = asyncio.ensure_future(run_stream(ws, source, options, wakeup))  # type: ignore[arg-type]
        await _until(lambda: len(ws.sent) == 1 and source.streams())
        store.set_active_position(pos("BTC/USDT", 1))
        source.poll()
        wakeup.notify()
        await asyncio.wait_for(ws.stuck.wait(), 20)  # the pump is inside the hanging send
        for i in range(3):
            store.set_active_position(pos("BTC/USDT", i + 2))
        source.poll()  # 3 behind a queue_size of 2: dropped with resync
        assert source.fanout.dropped_count == 1
        await asyncio.wait_for(task, 20)
        return ws

    ws = run(scenario())
    assert ws.closed == CLOSE_RESYNC
    assert source.dropped == 1
    source.close()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 8)),
            st.tuples(st.just("publish"), st.integers(1, 12)),
            st.tuples(st.just("read"), st.integers(0, 7)),
            st.tuples(st.just("remove"), st.integers(0, 7)),
        ),
        max_size=60,
    )
)
def test_every_subscription_reads_each_update_once_in_order_or_gets_resync(ops: list[tuple[str, int]]) -> None:
    """issue 18.3 attack (property): whatever the interleaving of clients joining, leaving, reading and the poll
    thread publishing, a subscription reads every update after it joined exactly once and in order, until it is
    sent resync (only when more than its maxsize behind); after a publish the log holds no more than the
    furthest-behind live subscription still needs."""
    fan = Fanout()
    version = 0
    live: list[tuple[Any, list[int], int]] = []  # (subscription, versions read, version when added)
    for op, n in ops:
        if op == "add":
            live.append((fan.add(n), [], version))
        elif op == "publish":
            ups = [AccountUpdate("balance", version + i + 1, "balance", Decimal(version + i + 1)) for i in range(n)]
            version += n
            fan.publish(ups)
        elif live:
            sub, got, _ = live[n % len(live)]
            if op == "read" and sub.resync is None:
                for b in fan.read(sub):
                    got.extend(i[0] for i in b.items)
                    sub.seq = b.end
            elif op == "remove":
                fan.remove(sub)
                live.pop(n % len(live))
        for sub, got, start in live:
            if sub.resync is None:
                assert got == list(range(start + 1, start + 1 + len(got)))
                assert fan._end - sub.seq <= sub.maxsize
        if op in ("publish", "remove"):  # the log is trimmed then (a read only moves the reader's place)
            behind = [fan._end - s.seq for s in fan.subscriptions()]
            assert sum(b.end - b.start for b in fan._log) <= max(behind, default=0)
    for sub, got, start in live:
        if sub.resync is None:
            for b in fan.read(sub):
                got.extend(i[0] for i in b.items)
            assert got == list(range(start + 1, version + 1))
