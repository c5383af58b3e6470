"""Issue 18 (speed): ``manager.serve()`` / ``store.serve()`` run the server in a child process; the bot keeps
only a feeder thread. Failure paths first: the bot's threads, the parent's death, a full pipe, the token and
key rules, a crash of the server process."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import AccountStateStore, Order, PositionStateManager, StateConfig
from tests.serve_support import pos, read_until, require, run, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from posstate.core.errors import ServeError  # noqa: E402
from posstate.serve.stream import StreamOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken-" + "y" * 26


def _gone(pid: int) -> bool:
    """Process *pid* no longer runs (no such process, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _until(check: Any, timeout: float = 30.0) -> bool:
    """Wait for *check()* (a hang guard: each turn waits on a fresh event with a short timeout)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def _server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("posstate-serve", "posstate-serve-poll")]


# ------------------------------------------------------------------------------------------ failure paths
def test_with_50_clients_no_server_thread_runs_in_the_bots_process(manager: Any) -> None:
    """issue 18 speed: with 50 stream clients connected, the bot's process runs no uvicorn loop and no poll
    thread (only the feeder); the server is another process."""
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    with m.serve(port=0, poll_interval=0.01) as server:

        async def clients() -> tuple[list[str], int]:
            conns = [await connect(ws_url(server)) for _ in range(50)]
            try:
                for ws in conns:
                    assert json.loads(await ws.recv())["topic"] == "snapshot"
                m.set_position(pos("BTC/USDT", 2))
                for ws in conns:
                    await read_until(ws, lambda g: any(x.get("topic") == "position.update" for x in g))
                return _server_threads(), server.pid
            finally:
                for ws in conns:
                    await ws.close()

        threads, pid = run(clients())
    assert threads == []
    assert pid != os.getpid()
    assert "posstate-serve-feed" not in [t.name for t in threading.enumerate()]  # stop() ended the feeder


_BOT = """
import sys, time
from decimal import Decimal
from pathlib import Path
from posstate import Position, PositionStateManager, StateConfig
m = PositionStateManager(StateConfig.in_dir(Path(sys.argv[1])), key=bytes(range(32)))
m.set_position(Position(symbol="BTC/USDT", side="long", contracts=Decimal(1), entry_price=Decimal(1)))
server = m.serve(port=0)
print(server.pid, server.port, flush=True)
time.sleep(600)
"""


def test_the_server_process_exits_when_the_bot_is_sigkilled(tmp_path: Path) -> None:
    """issue 18 speed: a bot killed with SIGKILL (no stop(), no atexit) leaves no server process behind: it
    sees the end of its pipe, stops and frees the port."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bot = subprocess.Popen([sys.executable, "-c", _BOT, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert bot.stdout is not None
        line = bot.stdout.readline().split()
        assert len(line) == 2, "the bot did not report its server process"
        pid, port = int(line[0]), int(line[1])
        assert pid != bot.pid and not _gone(pid)
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
        bot.send_signal(signal.SIGKILL)
        bot.wait(30)
        assert _until(lambda: _gone(pid)), "the server process outlived the bot"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nobody listens any more
    finally:
        bot.kill()
        bot.wait()
        if bot.stdout is not None:
            bot.stdout.close()


def test_a_full_pipe_never_blocks_the_bot_and_ends_in_resync(
    manager: Any, cfg: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18 speed: a server process that stops reading (SIGSTOP) never blocks set_position; the feeder
    keeps at most HELD_UPDATES for the next frame, drops the rest and, once the pipe drains, every client is
    sent resync and a new snapshot shows the bot's state."""
    from posstate.serve.process import ChildServer

    monkeypatch.setattr(ChildServer, "HELD_UPDATES", 10)
    m: PositionStateManager = manager(dataclasses.replace(cfg, durability="snapshot"))
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    with m.serve(port=0, poll_interval=0.01, stream=StreamOptions(client_timeout=600)) as server:

        async def scenario() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    done = threading.Event()

                    def bot() -> None:
                        # 40 x 64 KiB of metadata, in two polls at least: the first fills the 1 MiB pipe,
                        # the next ones find it full
                        for n in range(40):
                            m.set_symbol_metadata(f"S{n}", {"blob": "x" * 65536})
                            m.set_position(pos("BTC/USDT", n + 2))
                            if n == 19:
                                assert _until(lambda: server.backlog > 0)
                        done.set()

                    writer = threading.Thread(target=bot)
                    writer.start()
                    assert done.wait(60), "set_position blocked behind the server process's pipe"
                    writer.join()
                    assert _until(lambda: server.resyncs >= 1)
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                return await read_until(ws, lambda g: any(x["topic"] == "resync" for x in g), timeout=60)

        got = run(scenario())
        assert got[-1]["topic"] == "resync"
        assert _until(
            lambda: httpx.get(server.url + "/api/positions").json()["positions"]["BTC/USDT|long"]["position"]["contracts"] == "41"
        )
        snap = httpx.get(server.url + "/api/account/snapshot").json()
        assert len(snap["symbol_metadata"]) == 40


def test_token_rules_hold_and_the_server_process_never_has_the_key(
    manager: Any, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18 speed / 18.4: off loopback a token is required before any process starts; the key is refused as
    the token; the server process gets the token over its pipe (not argv or environment), never the key (nor
    the POSSTATE_KEY* variables), and no route serves it."""
    key_text = base64.b64encode(key).decode()
    monkeypatch.setenv("POSSTATE_KEY", key_text)
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    with pytest.raises(ServeError, match="without a token"):
        m.serve(host="0.0.0.0", port=0)
    with pytest.raises(ServeError, match="holds the state's key"):
        m.serve(host="127.0.0.1", port=0, token=key_text)
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    with m.serve(host="0.0.0.0", port=0, token_file=token_file) as server:
        url = f"http://127.0.0.1:{server.port}"
        assert httpx.get(url + "/api/account/snapshot").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        bodies = [httpx.get(url + route, headers=auth) for route in ("/api/account/snapshot", "/api/health", "/metrics", "/")]
        assert all(r.status_code == 200 for r in bodies)
        environ = Path(f"/proc/{server.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    assert b"POSSTATE_KEY" not in environ and key_text.encode() not in environ
    assert TOKEN.encode() not in environ + cmdline
    for r in bodies:
        assert key_text not in r.text and key.hex() not in r.text


def test_a_crash_of_the_server_process_is_reported_and_serve_can_start_again(
    manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 18 speed: a server process killed under the bot is logged with its exit code, shown by exit_code,
    and serve() starts a new one (on the same port)."""
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    server = m.serve(port=0, poll_interval=0.01)
    try:
        port = server.port
        with caplog.at_level(logging.ERROR, logger="posstate"):
            os.kill(server.pid, signal.SIGKILL)
            assert _until(lambda: server.exit_code is not None)
        assert server.exit_code == -signal.SIGKILL
        assert any("exited with code" in r.getMessage() and "a new one starts" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()
    with m.serve(port=port, poll_interval=0.01) as again:
        m.set_position(pos("BTC/USDT", 5))
        assert _until(
            lambda: httpx.get(again.url + "/api/positions").json()["positions"]["BTC/USDT|long"]["position"]["contracts"] == "5"
        )


def test_a_port_in_use_is_a_serve_error_in_the_bot(manager: Any) -> None:
    """issue 18 speed: the server process cannot bind: serve() raises the typed ServeError in the bot (no
    process left behind)."""
    m: PositionStateManager = manager()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(ServeError, match="cannot listen"):
            m.serve(port=taken.getsockname()[1])
    assert [t.name for t in threading.enumerate() if t.name.startswith("posstate-serve")] == []


# ------------------------------------------------------------------------------------------ what it serves
def test_store_served_from_a_child_streams_orders_fills_and_balances_in_order() -> None:
    """issue 18 speed / 18.3: store.serve() in a child sends the store's own updates (versions, order.fill from
    the growth of filled, frozen metadata) and its snapshot equals the store's."""
    store = AccountStateStore()
    store.set_wallet_balance("1000")
    store.set_symbol_metadata("BTC/USDT", {"grid": [1, {"a": 2}]})
    order = Order(id="o1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(3), price=Decimal(99))
    store.upsert_active_order(order)
    with store.serve(port=0, poll_interval=0.01) as server:
        snap = httpx.get(server.url + "/api/account/snapshot").json()
        assert snap["version"] == store.version and snap["symbol_metadata"]["BTC/USDT"]["data"] == {"grid": [1, {"a": 2}]}

        async def watch() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                store.upsert_active_order(dataclasses.replace(order, status="PARTIALLY_FILLED", filled=Decimal(1)))
                store.set_wallet_balance("990")
                store.delete_order("o1")
                return await read_until(ws, lambda g: any(x["topic"] == "order.closed" for x in g))

        got = run(watch())
        final = httpx.get(server.url + "/api/account/snapshot").json()
    topics = [x["topic"] for x in got]
    assert topics == ["order.update", "order.fill", "balance.update", "order.closed"]
    assert [x["version"] for x in got] == sorted(x["version"] for x in got)
    assert got[1]["amount"] == "1"
    assert final["orders"] == {} and final["balances"]["wallet"] == "990"


def test_metrics_from_the_child_show_the_bots_fsyncs_and_saves(manager: Any, cfg: StateConfig) -> None:
    """issue 18 speed / 18.2: /metrics of the server process parses and counts the bot's fsyncs (observed in
    the bot's process, sent over the pipe) and its updates."""
    m: PositionStateManager = manager(dataclasses.replace(cfg, durability="sync"))
    m.load_positions()
    with m.serve(port=0, poll_interval=0.01) as server:
        for n in range(5):
            m.set_position(pos("BTC/USDT", n + 1))

        def samples() -> dict[str, float]:
            text = httpx.get(server.url + "/metrics").text
            return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

        assert _until(lambda: samples().get("posstate_fsync_seconds_count", 0) >= 5)
        assert _until(lambda: samples().get("posstate_updates_total", 0) >= 1)


def test_in_process_mode_is_still_available(manager: Any) -> None:
    """issue 18 speed: serve(process=False) serves from threads of the bot's process, as before."""
    m: PositionStateManager = manager()
    m.load_positions()
    with m.serve(port=0, process=False) as server:
        assert "posstate-serve" in [t.name for t in threading.enumerate()]
        assert httpx.get(server.url + "/api/health").status_code == 200


def test_a_view_delta_rebuilds_the_view_exactly() -> None:
    """issue 18 speed: the pipe's view delta (entries set and removed, maps that become None, frozen store
    maps) applied to the old view gives the new one, through a frame."""
    import io
    from types import MappingProxyType

    from posstate.serve import pipe
    from posstate.serve.view import View

    a = pos("A/USDT", 1)
    old = View("store", 3, positions={("A/USDT", "long"): a, ("B/USDT", "long"): pos("B/USDT", 2)}, account={"x": "1"})
    new = View(
        "store",
        4,
        positions={("A/USDT", "long"): a, ("C/USDT", "short"): pos("C/USDT", 3, side="short")},
        metadata=MappingProxyType({"A/USDT": MappingProxyType({"grid": (1, 2)})}),
        account=None,
        balance=Decimal("5"),
        changed_at=old.changed_at + 1,
    )
    frame = pipe.encode(pipe.view_delta(old, new))
    delta = pipe.read_frame(io.BytesIO(frame))
    assert pipe.apply_delta(old, delta) == new
    assert pipe.read_frame(io.BytesIO(frame[:-1])) is None  # a torn frame is the end of the pipe


def test_the_bots_problems_reach_the_server_processs_health(manager: Any) -> None:
    """issue 18 speed / 18.2: readiness and the bot's problems (here its manager closed) travel over the pipe:
    the server process's /api/health turns 503 with the reason."""
    m: PositionStateManager = manager()
    with m.serve(port=0, poll_interval=0.01) as server:
        first = httpx.get(server.url + "/api/health")
        assert first.status_code == 503 and "not been read" in " ".join(first.json()["reasons"])
        m.load_positions()
        assert _until(lambda: httpx.get(server.url + "/api/health").status_code == 200)
        m.close()
        assert _until(lambda: "closed" in " ".join(httpx.get(server.url + "/api/health").json()["reasons"]))
        assert httpx.get(server.url + "/api/health").status_code == 503


def test_a_forked_worker_does_not_keep_the_server_process_alive() -> None:
    """issue 18 speed: a worker the bot forks while serving closes its copy of the pipe, so stop() ends the
    server process's stdin and it exits by itself (code 0), not killed after the stop timeout."""
    import warnings

    store = AccountStateStore()
    server = store.serve(port=0, poll_interval=0.01)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running (Python 3.12+)
        pid = os.fork()
    if pid == 0:  # the worker: waits until the parent is done, never touches the server
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        proc = server._proc
        server.stop()
        assert proc.returncode == 0
    finally:
        os.close(w)
        os.waitpid(pid, 0)
