"""Issue 18.3 (speed): the stream's changes are built and encoded once per poll for every client and sent as one
``batch`` message per poll; filters still apply per client, and a client too far behind still gets ``resync``.

The server-side tests poll the source by hand (the poll thread's interval is an hour), so which changes share
a batch is decided by the test, not by timing."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest

from posstate import AccountStateStore, Order
from tests.serve_support import pos, require, run, serving, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from posstate.account.types import AccountUpdate  # noqa: E402
from posstate.serve import fanout as _fanout  # noqa: E402
from posstate.serve.fanout import Fanout  # noqa: E402
from posstate.serve.sources import StoreSource  # noqa: E402
from posstate.serve.stream import CLOSE_RESYNC, StreamOptions  # noqa: E402

#: The poll thread never polls during a test; the stream tasks wake every 0.05 s (a quarter of the heartbeat).
HAND_POLLED: dict[str, Any] = {"poll_interval": 3600.0, "stream": StreamOptions(heartbeat_interval=0.2)}


def _order(symbol: str) -> Order:
    return Order(id="o1", symbol=symbol, side="buy", type="limit", status="NEW", amount=Decimal(1))


async def _next(ws: Any) -> dict[str, Any]:
    """The next message that is not a heartbeat (a hang guard of 20 s, not a timing assertion)."""
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg["topic"] != "heartbeat":
            return msg


def test_one_poll_of_changes_arrives_as_one_batch_in_order() -> None:
    """issue 18.3: the changes of one poll arrive in one ``batch`` message, in the order the store made them,
    its ``version`` the last change's; the next poll's changes in the next batch."""
    store = AccountStateStore()
    with serving(store, **HAND_POLLED) as server:

        async def watch() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                snap = await _next(ws)
                store.set_active_position(pos("BTC/USDT", 1))
                store.set_wallet_balance("10")
                store.set_active_position(pos("ETH/USDT", 2))
                store.upsert_active_order(
                    Order(id="o1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(1))
                )
                server.source.poll()
                first = await _next(ws)
                store.set_active_position(pos("BTC/USDT", 3))
                server.source.poll()
                return snap, first, await _next(ws)

        snap, first, second = run(watch())
    assert snap["topic"] == "snapshot"
    assert first["topic"] == "batch"
    got = [(m["topic"], m.get("symbol"), m["version"]) for m in first["messages"]]
    v = snap["version"]
    assert got == [
        ("position.update", "BTC/USDT", v + 1),
        ("balance.update", None, v + 2),
        ("position.update", "ETH/USDT", v + 3),
        ("order.update", "BTC/USDT", v + 4),
    ]
    assert first["version"] == v + 4
    assert second["topic"] == "batch" and second["version"] == v + 5
    assert [(m["topic"], m["position"]["contracts"]) for m in second["messages"]] == [("position.update", "3")]


def test_a_managers_poll_is_one_batch(manager: Any) -> None:
    """issue 18.3: a manager's changes seen by one poll arrive as one batch (one version: the poll's)."""
    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    with serving(m, **HAND_POLLED) as server:

        async def watch() -> dict[str, Any]:
            async with connect(ws_url(server)) as ws:
                await _next(ws)
                m.set_position(pos("BTC/USDT", 2))
                m.set_position(pos("ETH/USDT", 5))
                m.set_symbol_metadata("ETH/USDT", {"note": "x"})
                server.source.poll()
                return await _next(ws)

        batch = run(watch())
    assert batch["topic"] == "batch"
    got = sorted((x["topic"], x["symbol"]) for x in batch["messages"])
    assert got == [("metadata.update", "ETH/USDT"), ("position.update", "BTC/USDT"), ("position.update", "ETH/USDT")]
    assert {x["version"] for x in batch["messages"]} == {batch["version"]}


def test_filters_apply_per_client_within_a_batch() -> None:
    """issue 18.3: clients with different filters each get their own part of one batch; a client whose filter
    leaves nothing of a batch is sent nothing for it."""
    store = AccountStateStore()
    queries = ("", "topics=position.update", "symbols=ETH/USDT", "topics=order.update")
    with serving(store, **HAND_POLLED) as server:

        async def watch() -> list[dict[str, Any]]:
            clients = [await connect(ws_url(server, q)) for q in queries]
            try:
                for ws in clients:
                    await _next(ws)  # the snapshot
                store.set_active_position(pos("BTC/USDT", 1))
                store.set_active_position(pos("ETH/USDT", 2))
                store.set_wallet_balance("7")
                server.source.poll()
                firsts = [await _next(ws) for ws in clients[:3]]
                store.upsert_active_order(
                    Order(id="o1", symbol="ETH/USDT", side="buy", type="limit", status="NEW", amount=Decimal(1))
                )
                server.source.poll()
                return [*firsts, await _next(clients[3])]
            finally:
                for ws in clients:
                    await ws.close()

        everything, positions, eth, orders = run(watch())

    def seen(batch: dict[str, Any]) -> list[tuple[str, str | None]]:
        assert batch["topic"] == "batch"
        return [(m["topic"], m.get("symbol")) for m in batch["messages"]]

    assert seen(everything) == [("position.update", "BTC/USDT"), ("position.update", "ETH/USDT"), ("balance.update", None)]
    assert seen(positions) == [("position.update", "BTC/USDT"), ("position.update", "ETH/USDT")]
    assert seen(eth) == [("position.update", "ETH/USDT"), ("balance.update", None)]  # no symbol: passes a symbol filter
    assert seen(orders) == [("order.update", "ETH/USDT")]  # the first batch had nothing for it: not sent


def test_each_change_is_encoded_once_whatever_the_number_of_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3: publishing encodes each message once for all subscriptions, and every subscription reads
    the same batch (no per-client copy or encoding)."""
    calls: list[Any] = []
    real = _fanout.to_bytes

    def counting(obj: Any) -> bytes:
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(_fanout, "to_bytes", counting)
    fan = Fanout()
    subs = [fan.add(100) for _ in range(50)]
    fan.publish(AccountUpdate("position", i, ("S/USDT", "long"), pos("S/USDT", i)) for i in range(1, 11))
    assert len(calls) == 10
    reads = [fan.read(s) for s in subs]
    assert all(len(r) == 1 and r[0] is reads[0][0] for r in reads)
    batch = reads[0][0]
    assert json.loads(batch.text)["version"] == 10
    assert [m["position"]["contracts"] for m in json.loads(batch.text)["messages"]] == [str(i) for i in range(1, 11)]


def test_a_subscription_too_far_behind_is_dropped_with_resync_and_the_log_trimmed() -> None:
    """issue 18.3: the publisher drops a subscription more than its maxsize updates behind (``resync`` set to
    the version), leaves the others, and keeps only batches some subscription has not read."""
    fan = Fanout()
    small, big = fan.add(3), fan.add(100)
    fan.publish([AccountUpdate("balance", 1, "balance", Decimal(1)), AccountUpdate("balance", 2, "balance", Decimal(2))])
    assert small.resync is None and fan.pending(small) == 2
    fan.publish([AccountUpdate("balance", 3, "balance", Decimal(3)), AccountUpdate("balance", 4, "balance", Decimal(4))])
    assert small.resync == 4 and big.resync is None
    assert fan.subscriptions() == (big,) and fan.dropped_count == 1
    batches = fan.read(big)
    assert [b.version for b in batches] == [2, 4]
    big.seq = batches[-1].end
    fan.publish([AccountUpdate("balance", 5, "balance", Decimal(5))])
    assert [b.version for b in fan.read(big)] == [5]  # the two read batches were forgotten


def test_the_server_falling_behind_the_store_sends_every_client_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3: when the server's own subscription to the store overflows between two polls, every client is
    sent ``resync`` and closed (4409), and a new client gets a snapshot with every change."""
    monkeypatch.setattr(StoreSource, "SUBSCRIPTION", 4)
    store = AccountStateStore()
    with serving(store, **HAND_POLLED) as server:

        async def watch() -> tuple[list[dict[str, Any]], list[int | None], dict[str, Any]]:
            clients = [await connect(ws_url(server)) for _ in range(3)]
            for ws in clients:
                await _next(ws)
            for i in range(10):
                store.set_active_position(pos("BTC/USDT", i + 1))
            server.source.poll()
            last: list[dict[str, Any]] = []
            codes: list[int | None] = []
            for ws in clients:
                got = await _next(ws)
                try:
                    await _next(ws)
                except ConnectionClosed as exc:
                    codes.append(exc.rcvd.code if exc.rcvd is not None else None)
                last.append(got)
            async with connect(ws_url(server)) as ws:
                return last, codes, await _next(ws)

        last, codes, fresh = run(watch())
    assert [m["topic"] for m in last] == ["resync"] * 3
    assert codes == [CLOSE_RESYNC] * 3
    assert fresh["positions"]["BTC/USDT|long"]["position"]["contracts"] == "10"
