"""Issue 18.3: the WebSocket stream on a real server: snapshot, changes in order (from a bot in another
process), filters, heartbeats both ways, and a slow client dropped with ``resync`` while the writer never waits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import AccountStateStore, Order, StateConfig
from tests.serve_support import pos, read_until, require, run, serving, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from posstate.serve.stream import CLOSE_HEARTBEAT, CLOSE_RESYNC, StreamOptions  # noqa: E402
from posstate.storage.crypto import Keyring  # noqa: E402
from posstate.storage.statefile import ReadOptions  # noqa: E402

#: Both places the server runs (issue 18 speed): threads of this process, and a server process of its own.
MODES = [pytest.param(False, id="threads"), pytest.param(True, id="process")]

ROOT = Path(__file__).resolve().parent.parent

BOT = """
import sys, base64
from decimal import Decimal
from posstate import PositionStateManager, StateConfig, Position
cfg = StateConfig.in_dir(sys.argv[1])
with PositionStateManager(cfg, key=base64.b64decode(sys.argv[2])) as m:
    m.load_positions()
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(12):
        m.set_position(Position(symbol=f"S{i:02d}/USDT", side="long", contracts=Decimal(i + 1), entry_price=Decimal(1)))
    print("done", flush=True)
    sys.stdin.readline()
"""


def test_a_bot_process_changes_arrive_on_the_stream_in_order(cfg: StateConfig, key: bytes) -> None:
    """issue 18.3: snapshot first, then a separate bot process's changes, each once, in the order it made them."""
    import base64

    read = ReadOptions(
        keyring=Keyring(key=key), max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew, require_encryption=True
    )
    bot = subprocess.Popen(
        [sys.executable, "-c", BOT, str(cfg.state_dir), base64.b64encode(key).decode()],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert bot.stdin is not None and bot.stdout is not None
    try:
        assert bot.stdout.readline().strip() == "ready"
        with serving(cfg, read=read) as server:

            async def watch() -> list[dict[str, Any]]:
                async with connect(ws_url(server)) as ws:
                    first = json.loads(await ws.recv())
                    assert first["topic"] == "snapshot" and first["positions"] == {}
                    assert bot.stdin is not None
                    bot.stdin.write("go\n")
                    bot.stdin.flush()
                    return await read_until(ws, lambda g: sum(m["topic"] == "position.update" for m in g) >= 12)

            got = run(watch())
        assert bot.stdout.readline().strip() == "done"
    finally:
        bot.stdin.write("end\n")
        bot.stdin.close()
        bot.wait(timeout=60)
        bot.stdout.close()
    updates = [m for m in got if m["topic"] == "position.update"]
    assert [m["symbol"] for m in updates] == [f"S{i:02d}/USDT" for i in range(12)]
    assert [m["position"]["contracts"] for m in updates] == [str(i + 1) for i in range(12)]
    versions = [m["version"] for m in updates]
    assert versions == sorted(versions)


def _orders_store() -> AccountStateStore:
    store = AccountStateStore()
    store.set_wallet_balance("100")
    return store


@pytest.mark.parametrize("process", MODES)
def test_store_stream_topics_order_fill_and_close(process: bool) -> None:
    """issue 18.3: a store's changes become balance.update, position.update, order.update, order.fill,
    order.closed and metadata.update, in the store's version order."""
    store = _orders_store()
    with serving(store, process=process) as server:

        async def watch() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                snap = json.loads(await ws.recv())
                assert snap["topic"] == "snapshot" and snap["version"] == store.version
                order = Order(id="o1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(2))
                store.upsert_active_order(order)
                store.upsert_active_order(
                    Order(
                        id="o1",
                        symbol="BTC/USDT",
                        side="buy",
                        type="limit",
                        status="PARTIALLY_FILLED",
                        amount=Decimal(2),
                        filled=Decimal("0.5"),
                    )
                )
                store.set_active_position(pos("BTC/USDT", "0.5"))
                store.upsert_active_order(
                    Order(
                        id="o1",
                        symbol="BTC/USDT",
                        side="buy",
                        type="limit",
                        status="FILLED",
                        amount=Decimal(2),
                        filled=Decimal(2),
                    )
                )
                store.set_wallet_balance("99")
                store.set_symbol_metadata("BTC/USDT", {"grid": 1})
                return await read_until(ws, lambda g: any(m["topic"] == "metadata.update" for m in g))

        got = run(watch())
    topics = [m["topic"] for m in got]
    assert topics == [
        "order.update",
        "order.update",
        "order.fill",
        "position.update",
        "order.closed",
        "balance.update",
        "metadata.update",
    ]
    fill = got[2]
    assert fill["amount"] == "0.5" and fill["filled"] == "0.5"
    assert got[4]["order"]["filled"] == "0.5"  # the last state the stream saw before the order closed
    assert [m["version"] for m in got] == sorted(m["version"] for m in got)


@pytest.mark.parametrize("process", MODES)
def test_filters_by_topic_and_symbol_on_the_url_and_by_message(process: bool) -> None:
    """issue 18.3: ?topics=&symbols= filters the snapshot and the updates; a subscribe message changes the filter."""
    store = _orders_store()
    store.set_active_position(pos("ETH/USDT", 1))
    with serving(store, process=process) as server:

        async def watch() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
            async with connect(ws_url(server, "topics=position.update&symbols=BTC/USDT")) as ws:
                snap = json.loads(await ws.recv())
                store.set_active_position(pos("ETH/USDT", 2))
                store.set_wallet_balance("1")
                store.set_active_position(pos("BTC/USDT", 3))
                first = await read_until(ws, lambda g: len(g) >= 1)
                await ws.send(json.dumps({"type": "subscribe", "topics": ["balance.update"]}))
                ack = await read_until(ws, lambda g: len(g) >= 1)
                store.set_active_position(pos("BTC/USDT", 4))
                store.set_wallet_balance("2")
                second = await read_until(ws, lambda g: len(g) >= 1)
                return snap, first, ack + second

        snap, first, rest = run(watch())
    assert list(snap["positions"]) == []  # ETH is filtered out, BTC had none yet
    assert [(m["topic"], m.get("symbol")) for m in first] == [("position.update", "BTC/USDT")]
    assert rest[0] == {"topic": "subscribed", "topics": ["balance.update"], "symbols": None}
    assert [(m["topic"], m["balance"]) for m in rest[1:]] == [("balance.update", "2")]


@pytest.mark.parametrize("process", MODES)
def test_heartbeats_both_ways_and_a_silent_client_is_dropped(process: bool) -> None:
    """issue 18.3: the server sends heartbeats; a client that answers stays; one that sends nothing is closed (4408)."""
    options = StreamOptions(heartbeat_interval=0.05, client_timeout=1.0)
    with serving(_orders_store(), stream=options, process=process) as server:

        async def talkative() -> int:
            beats = 0
            async with connect(ws_url(server)) as ws:
                await ws.recv()
                while beats < 45:  # 45 x 0.05 s: over twice the client timeout
                    msg = json.loads(await ws.recv())
                    if msg["topic"] == "heartbeat":
                        beats += 1
                        await ws.send('{"type": "heartbeat"}')
            return beats

        async def silent() -> int:
            async with connect(ws_url(server)) as ws:
                try:
                    while True:
                        await ws.recv()
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    return exc.rcvd.code

        assert run(talkative()) == 45
        assert run(silent()) == CLOSE_HEARTBEAT
        if process:  # the counter lives in the server process: read it from /metrics
            assert "posstate_stream_heartbeat_timeouts_total 1.0" in httpx.get(server.url + "/metrics").text
        else:
            assert server.source.stats.heartbeat_timeouts == 1


def test_a_slow_client_gets_resync_and_is_dropped_without_blocking_the_writer() -> None:
    """issue 18.3: a client that stops reading fills its queue; the writer goes on, the client is sent
    ``resync`` and closed (4409); the drop is counted in the metrics."""
    store = _orders_store()
    dropped = threading.Event()
    with serving(store, stream=StreamOptions(queue_size=8)) as server:
        source = server.source
        writes = 0

        def bot() -> None:
            nonlocal writes
            while not dropped.is_set() and writes < 200_000:
                writes += 1
                store.set_active_position(pos("BTC/USDT", writes))
                if source.dropped:
                    dropped.set()

        async def slow() -> tuple[list[dict[str, Any]], int]:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            async with connect(ws_url(server), sock=sock, max_queue=1) as ws:
                await ws.recv()  # the snapshot, then read nothing while the bot writes
                writer = threading.Thread(target=bot)
                writer.start()
                import asyncio

                await asyncio.to_thread(writer.join, 120)
                assert not writer.is_alive(), "the writer blocked"
                got: list[dict[str, Any]] = []
                try:
                    while True:
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    return got, exc.rcvd.code

        got, code = run(slow())
    assert dropped.is_set() and writes < 200_000
    assert code == CLOSE_RESYNC
    assert got and got[-1]["topic"] == "resync"
    assert source.dropped == 1
