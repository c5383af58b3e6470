"""Issue 18: a read-only HTTP API, Prometheus metrics and safe defaults, on a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from posstate import AccountStateStore, Order, PositionStateManager, StateConfig, generate_key
from posstate.cli.main import cli
from tests.conftest import write_key
from tests.serve_support import pos, read_until, require, run, serving, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from posstate.core.errors import ServeError  # noqa: E402
from posstate.serve.health import HealthLimits  # noqa: E402
from posstate.serve.server import read_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken-" + "x" * 26

#: Both places the server runs (issue 18 speed): threads of this process, and a server process of its own.
MODES = [pytest.param(False, id="threads"), pytest.param(True, id="process")]


def _files(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def _store() -> AccountStateStore:
    store = AccountStateStore()
    store.set_wallet_balance("1000")
    store.set_active_position(pos("BTC/USDT", 2))
    store.set_symbol_metadata("BTC/USDT", {"grid": [1, 2]})
    store.upsert_active_order(
        Order(id="o1", symbol="BTC/USDT", side="buy", type="limit", status="NEW", amount=Decimal(3), price=Decimal(99))
    )
    return store


# ------------------------------------------------------------------------------------------ 18.1
def test_serve_reads_a_locked_directory_without_the_lock_and_writes_nothing(
    manager: Any, cfg: StateConfig, key: bytes, tmp_path: Path
) -> None:
    """issue 18.1: `posstate serve` on a directory a bot holds: no StateLockedError, no file created or changed."""
    m = manager()
    backed_up = threading.Event()
    m.on("backupCreated", lambda _e: backed_up.set())
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    assert backed_up.wait(30)  # the bot's own timed backup after its first save
    assert m.wait_for_backups(30)  # and its prune, which writes the verdict file, finished
    before = _files(cfg.state_dir)
    key_file = write_key(tmp_path / "k.key", key)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "posstate",
            "serve",
            "--port",
            "0",
            "--state-dir",
            str(cfg.state_dir),
            "--key-file",
            str(key_file),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "read-only at http://127.0.0.1:" in line, line
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        for path in ("/api/account/snapshot", "/api/positions", "/api/health", "/api/backups", "/metrics", "/"):
            assert httpx.get(url + path).status_code == 200, path
        snap = httpx.get(url + "/api/account/snapshot").json()
        assert snap["source"] == "directory"
        assert snap["positions"]["BTC/USDT|long"]["position"]["contracts"] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert _files(cfg.state_dir) == before
    assert m.get_position("BTC/USDT", "long") is not None  # the bot still holds its lock and works


def test_manager_serve_shows_the_live_state_and_never_takes_the_bots_lock_for_long(manager: Any) -> None:
    """issue 18.1: manager.serve() runs in background threads; the bot keeps writing while clients read."""
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    with m.serve(port=0, poll_interval=0.01) as server:
        assert (
            httpx.get(server.url + "/api/account/snapshot").json()["positions"]["BTC/USDT|long"]["position"]["contracts"] == "1"
        )

        async def watch() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                first = json.loads(await ws.recv())
                assert first["topic"] == "snapshot"
                writer = threading.Thread(target=lambda: [m.set_position(pos("BTC/USDT", n)) for n in range(2, 12)])
                writer.start()

                got = await read_until(ws, lambda g: any(x.get("position", {}) and x["position"]["contracts"] == "11" for x in g))
                writer.join()
                return got

        got = run(watch())
    contracts = [int(x["position"]["contracts"]) for x in got if x["topic"] == "position.update"]
    assert contracts == sorted(contracts) and contracts[-1] == 11  # in order (polling may coalesce steps)


def test_store_serve_serves_balances_orders_and_leverage() -> None:
    """issue 18.1/18.2: store.serve() serves what the account store holds: balances, positions, orders, metadata."""
    store = _store()
    store.set_symbol_leverage("BTC/USDT", 5)
    with store.serve(port=0) as server:
        snap = httpx.get(server.url + "/api/account/snapshot").json()
    assert snap["source"] == "store" and snap["version"] == store.version
    assert snap["balances"] == {"wallet": "1000", "previous": "0"}
    assert snap["orders"]["o1"]["amount"] == "3" and snap["leverage"] == {"BTC/USDT": "5"}
    assert snap["positions"]["BTC/USDT|long"] == {
        "rev": None,
        "position": {"symbol": "BTC/USDT", "side": "long", "contracts": "2", "entry_price": "100"},
    }
    assert snap["symbol_metadata"] == {"BTC/USDT": {"rev": None, "data": {"grid": [1, 2]}}}


# ------------------------------------------------------------------------------------------ 18.2
def test_snapshot_uses_the_same_json_shapes_as_show_json(manager: Any, cfg: StateConfig, key_file: Path) -> None:
    """issue 18.2/18.4: the snapshot's positions and symbol_metadata equal `posstate show --json`'s (one serializer)."""
    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.set_position(pos("ETH/USDT", 2, side="short"))
    m.set_symbol_metadata("BTC/USDT", {"note": "x", "n": [1, {"a": None}]})
    shown = CliRunner().invoke(cli, ["show", "--json", "--state-dir", str(cfg.state_dir), "--key-file", str(key_file)])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    with serving(m) as server:
        snap = httpx.get(server.url + "/api/account/snapshot").json()
        positions = httpx.get(server.url + "/api/positions").json()
    assert snap["positions"] == doc["positions"] == positions["positions"]
    assert snap["symbol_metadata"] == doc["symbol_metadata"]
    assert snap["generation"] == doc["generation"] == positions["generation"]


def test_order_detail_and_unknown_order() -> None:
    """issue 18.2: GET /api/account/orders/{id} gives the order; an unknown id is 404 with a JSON reason."""
    with serving(_store()) as server:
        found = httpx.get(server.url + "/api/account/orders/o1")
        missing = httpx.get(server.url + "/api/account/orders/nope")
    assert found.status_code == 200 and found.json()["order"]["price"] == "99"
    assert missing.status_code == 404 and missing.json()["error"] == "no open order with this id"


def test_health_is_503_with_the_reason_on_a_damaged_state_file(manager: Any, cfg: StateConfig, key: bytes) -> None:
    """issue 18.2: a damaged state file turns /api/health to 503 naming the problem; fixed, it is 200 again."""
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    m.close()
    read = ReadOptions(
        keyring=Keyring(key=key), max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew, require_encryption=True
    )
    good = cfg.state_path.read_bytes()
    with serving(cfg, read=read) as server:
        ok = httpx.get(server.url + "/api/health")
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["generation"] >= 1 and body["last_save"]["age_seconds"] is not None and body["journal"]["bytes"] is not None
        assert body["replica"] == {"configured": False, "lag_seconds": None} and body["ready"] is True
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        cfg.state_path.write_bytes(bytes(bad))
        server.source.poll()
        sick = httpx.get(server.url + "/api/health")
        assert sick.status_code == 503
        assert sick.json()["status"] == "unhealthy"
        assert any("checksum" in r or "damaged" in r for r in sick.json()["reasons"]), sick.json()
        # the last good state is still served, marked by the health endpoint
        assert httpx.get(server.url + "/api/positions").json()["positions"]
        cfg.state_path.write_bytes(good)
        server.source.poll()
        assert httpx.get(server.url + "/api/health").status_code == 200


@pytest.mark.parametrize("process", MODES)
def test_health_limits_and_not_yet_loaded(manager: Any, process: bool) -> None:
    """issue 18.2: before the bot loads its state the health is 503 (not ready); an age limit gives 503 with its reason."""
    m = manager()
    with serving(m, process=process) as server:
        first = httpx.get(server.url + "/api/health")
        assert first.status_code == 503 and "not been read" in " ".join(first.json()["reasons"])
    m.load_positions()
    m.save()
    with serving(m, limits=HealthLimits(max_backup_age=0.0), process=process) as server:
        aged = httpx.get(server.url + "/api/health").json()
    assert any("newest backup older than" in r for r in aged["reasons"])


def test_metrics_parse_with_the_prometheus_parser(manager: Any) -> None:
    """issue 18.2: /metrics parses with prometheus-client's parser and carries every metric the issue names."""
    m = manager()
    m.load_positions()
    with serving(m) as server:
        m.set_position(pos("BTC/USDT", 1))
        m.save()
        server.source.poll()
        text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "posstate_saves",
        "posstate_updates",
        "posstate_fsync_seconds",
        "posstate_compactions",
        "posstate_backups",
        "posstate_recoveries",
        "posstate_stream_clients",
        "posstate_stream_queue_use_ratio",
        "posstate_stream_drops",
        "posstate_snapshot_version_age_seconds",
        "posstate_last_save_age_seconds",
        "posstate_newest_backup_age_seconds",
        "posstate_healthy",
    ):
        assert name in families, name
    saves = next(s.value for s in families["posstate_saves"].samples if s.name == "posstate_saves_total")
    assert saves >= 1
    count = next(s.value for s in families["posstate_fsync_seconds"].samples if s.name == "posstate_fsync_seconds_count")
    assert count >= 1  # the bot's own fsyncs, observed in this process
    assert "posstate_replica_lag_seconds" not in families  # no replica: no made-up sample


# ------------------------------------------------------------------------------------------ 18.4
def test_any_address_but_loopback_needs_a_token(tmp_path: Path, cfg: StateConfig) -> None:
    """issue 18.4: binding 0.0.0.0 without a token is refused (library: ServeError; CLI: one Error line, exit 2)."""
    with pytest.raises(ServeError, match="without a token"), serving(cfg, host="0.0.0.0"):
        pass
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(cfg.state_dir)])
    assert res.exit_code == 2
    assert res.output.count("Error:") == 1 and "--token-file" in res.output


def test_token_files_that_are_refused(tmp_path: Path) -> None:
    """issue 18.4: a short token, or a token file other users may read, is refused before anything listens."""
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ServeError, match="at least"):
        read_token(short)
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    with pytest.raises(ServeError, match="readable by other users"):
        read_token(loose)


@pytest.mark.parametrize("process", MODES)
@pytest.mark.parametrize("host", [pytest.param("127.0.0.1", id="loopback"), pytest.param("0.0.0.0", id="all-addresses")])
def test_the_token_is_required_on_every_route_and_the_websocket(tmp_path: Path, host: str, process: bool) -> None:
    """issue 18.4: with a token (required off localhost) every route and the WebSocket refuse a request without it."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    good = {"Authorization": f"Bearer {TOKEN}"}
    with serving(_store(), host=host, token_file=token_file, process=process) as server:
        url = f"http://127.0.0.1:{server.port}"
        for path in (
            "/",
            "/static/status.js",
            "/api/account/snapshot",
            "/api/account/orders/o1",
            "/api/positions",
            "/api/health",
            "/api/backups",
            "/metrics",
        ):
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
                r = httpx.get(url + path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert TOKEN not in r.text and "BTC" not in r.text
            assert httpx.get(url + path, headers=good).status_code == 200, path

        async def refused() -> int:
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://127.0.0.1:{server.port}/api/account/stream"):
                    pass
            return int(info.value.response.status_code)

        async def accepted() -> str:
            async with connect(f"ws://127.0.0.1:{server.port}/api/account/stream", additional_headers=good) as ws:
                return str(json.loads(await ws.recv())["topic"])

        assert run(refused()) == 403
        assert run(accepted()) == "snapshot"


@pytest.mark.parametrize("process", MODES)
def test_loopback_refuses_a_rebound_host_and_a_cross_site_websocket(process: bool) -> None:
    """issue 18.4: on 127.0.0.1 a request naming another Host (DNS rebinding) and a WebSocket from another
    site's page (its Origin) are refused: a web page cannot read the state through the operator's browser."""
    with serving(_store(), process=process) as server:
        r = httpx.get(server.url + "/api/account/snapshot", headers={"Host": "evil.example:80"})
        assert r.status_code == 403 and "BTC" not in r.text

        async def cross_site() -> int:
            with pytest.raises(InvalidStatus) as info:
                async with connect(ws_url(server), origin="http://evil.example"):  # type: ignore[arg-type]
                    pass
            return int(info.value.response.status_code)

        async def same_site() -> str:
            async with connect(ws_url(server), origin=server.url) as ws:  # type: ignore[arg-type]
                return str(json.loads(await ws.recv())["topic"])

        assert run(cross_site()) == 403
        assert run(same_site()) == "snapshot"


@pytest.mark.parametrize("process", MODES)
def test_no_key_is_ever_served(manager: Any, key: bytes, process: bool) -> None:
    """issue 18.4: the key appears in no response: routes, page, metrics, stream (raw, base64, hex)."""
    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    forms = [base64.b64encode(key).decode(), key.hex(), base64.urlsafe_b64encode(key).decode().rstrip("=")]
    with serving(m, process=process) as server:
        bodies = [
            httpx.get(server.url + p).content
            for p in (
                "/",
                "/static/status.js",
                "/api/account/snapshot",
                "/api/positions",
                "/api/health",
                "/api/backups",
                "/metrics",
            )
        ]

        async def stream() -> bytes:
            async with connect(ws_url(server)) as ws:
                return str(await ws.recv()).encode()

        bodies.append(run(stream()))
    for body in bodies:
        assert key not in body
        assert not any(f.encode() in body for f in forms)
    assert generate_key() != key


def test_serve_without_the_extra_says_how_to_install_it(cfg: StateConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.1: `posstate serve` without the serve extra is one Error line naming `pip install 'posstate[serve]'` (exit 2)."""
    for name in [n for n in sys.modules if n == "posstate.serve.server" or n.startswith("posstate.serve.app")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    res = CliRunner().invoke(cli, ["serve", "--port", "0", "--state-dir", str(cfg.state_dir)])
    assert res.exit_code == 2
    assert res.output.count("Error:") == 1 and "pip install 'posstate[serve]'" in res.output
