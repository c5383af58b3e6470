"""Issue 18 attack: the server against a hostile local process, a key-less attacker who writes the state
directory, and an operator stopping `posstate serve` (real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from posstate import AccountStateStore, PositionStateManager, StateConfig
from tests.conftest import write_key
from tests.serve_support import pos, require, run, serving, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from posstate.serve import server as _server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the server closed *sock* (EOF or reset) within *timeout* seconds (a hang guard)."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_cannot_take_the_bots_file_descriptors() -> None:
    """issue 18.3 attack: connections past max_connections are closed at once, so a local process opening
    thousands of idle TCP connections to manager.serve() cannot exhaust the bot's file descriptors (its
    saves failed with EMFILE before)."""
    store = AccountStateStore()
    with serving(store, max_connections=4) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
        try:
            closed = [s for s in socks[4:] if _closed_by_peer(s, 10.0)]
            assert len(closed) == 8
            assert len(server._server.server_state.connections) <= 4
            assert server.source.stats.connections_refused >= 8
        finally:
            for s in socks:
                s.close()
        text = httpx.get(server.url + "/metrics").text
    assert "posstate_connections_refused_total" in text


def test_a_connection_that_never_sends_a_request_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: a connection that sends nothing is closed after IDLE_TIMEOUT, freeing its slot
    (before, it was held forever: a few of them took every connection the server allows)."""
    monkeypatch.setattr(_server, "IDLE_TIMEOUT", 0.2)
    with serving(AccountStateStore(), max_connections=2) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))
        try:
            assert _closed_by_peer(idle, 20.0)
        finally:
            idle.close()
        assert httpx.get(server.url + "/api/health").status_code == 200


def _plaintext_state(tmp_path: Path) -> bytes:
    """A valid plaintext state file holding a forged position, written without any key."""
    plain = StateConfig.in_dir(tmp_path / "forger", encryption=False)
    with PositionStateManager(plain) as m:
        m.load_positions()
        m.set_position(pos("FORGED/USDT", 999))
        m.save()
    return plain.state_path.read_bytes()


def test_a_plaintext_state_file_in_an_encrypted_directory_is_never_served_without_a_key(
    manager: Any, cfg: StateConfig, tmp_path: Path
) -> None:
    """issue 18.4 attack: an attacker without the key replaces the encrypted state file with a plaintext one;
    a server reading the directory without a key (no key: 503 before) must not turn healthy and serve the
    forged positions (anyone can write a plaintext file)."""
    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    m.close()
    forged = _plaintext_state(tmp_path)
    for path in (cfg.journal_path, cfg.legacy_journal_path):
        if path is not None and path.exists():
            path.unlink()
    cfg.state_path.write_bytes(forged)
    with serving(cfg) as server:
        health = httpx.get(server.url + "/api/health")
        snap = httpx.get(server.url + "/api/account/snapshot").json()
    assert health.status_code == 503, health.text
    assert any("plaintext" in r or "not encrypted" in r for r in health.json()["reasons"]), health.json()
    assert "FORGED/USDT|long" not in snap["positions"]


def test_posstate_serve_without_a_key_refuses_a_plaintext_state_file(manager: Any, cfg: StateConfig, tmp_path: Path) -> None:
    """issue 18.4 attack: the same through `posstate serve` with no key in the environment."""
    m = manager()
    m.load_positions()
    m.save()
    m.close()
    cfg.state_path.write_bytes(_plaintext_state(tmp_path))
    for path in (cfg.journal_path, cfg.legacy_journal_path):
        if path is not None and path.exists():
            path.unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSSTATE_")}
    proc, url = _start_cli(cfg, env=env)
    try:
        health = httpx.get(url + "/api/health")
        snap = httpx.get(url + "/api/account/snapshot").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _close(proc)
    assert health.status_code == 503, health.text
    assert "FORGED/USDT|long" not in snap["positions"]


def _start_cli(cfg: StateConfig, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "posstate", "serve", "--port", "0", "--state-dir", str(cfg.state_dir), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "read-only at http://127.0.0.1:" in line, line
    return proc, line.split(" at ", 1)[1].split(" ", 1)[0]


def _close(proc: subprocess.Popen[str]) -> tuple[str, str]:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return out, err


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="ctrl-c")])
def test_posstate_serve_stops_cleanly_on_sigterm_and_ctrl_c(
    manager: Any, cfg: StateConfig, key: bytes, tmp_path: Path, sig: signal.Signals
) -> None:
    """issue 18.1 attack: SIGTERM (systemd, docker stop) and Ctrl-C stop `posstate serve` with exit 0 after it
    closed its streams (SIGTERM killed the process by the signal before, skipping the stop; Ctrl-C was
    `Error: interrupted`, exit 1)."""
    m = manager()
    m.load_positions()
    m.save()
    m.close()
    proc, url = _start_cli(cfg, "--key-file", str(write_key(tmp_path / "k.key", key)))

    async def watch() -> int | None:
        async with connect(url.replace("http://", "ws://") + "/api/account/stream") as ws:
            assert json.loads(await ws.recv())["topic"] == "snapshot"
            proc.send_signal(sig)
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed:
                return ws.close_code

    try:
        code = run(watch())
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _, err = _close(proc)
    assert code == 1012  # the stream was told the server is going away
    assert rc == 0, err
    assert "Error" not in err and "Traceback" not in err


def test_a_binary_or_garbage_websocket_message_gets_an_error_and_a_proper_close() -> None:
    """issue 18.3 attack: a binary frame is answered with an error message and a close (1003), not a dropped
    TCP connection (before: KeyError in the reader, the socket cut without a close frame, 1006)."""
    with serving(AccountStateStore()) as server:

        async def send_binary() -> tuple[list[dict[str, Any]], int | None]:
            got: list[dict[str, Any]] = []
            async with connect(ws_url(server)) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                await ws.send(b"\x00\xffnot text")
                try:
                    while True:
                        got.append(json.loads(await ws.recv()))
                except ConnectionClosed:
                    return got, ws.close_code

        got, code = run(send_binary())
    assert code == 1003
    assert [g["topic"] for g in got if g["topic"] != "heartbeat"] == ["error"]


def test_bearer_scheme_is_case_insensitive(tmp_path: Path) -> None:
    """issue 18.4 attack: `bearer TOKEN` (RFC 9110: the scheme is case-insensitive) is accepted; a wrong token
    in any case is not."""
    token = "k" * 32
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    with serving(AccountStateStore(), token_file=token_file) as server:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(server.url + "/api/health", headers={"Authorization": f"{scheme} {token}"}).status_code == 200
            assert httpx.get(server.url + "/api/health", headers={"Authorization": f"{scheme} {token}x"}).status_code == 401
        assert httpx.get(server.url + "/api/health", headers={"Authorization": f"Basic {token}"}).status_code == 401
        assert httpx.get(server.url + "/api/health", headers={"Authorization": token}).status_code == 401


def test_an_endless_request_header_is_refused_not_buffered() -> None:
    """issue 18.3 attack: a client sending one endless header line is answered 400 and cut off after a few
    KiB (before: httptools buffered all of it, growing the bot's memory by every byte sent, no token needed)."""
    with serving(AccountStateStore()) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        try:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: ")
            sent, cut = 0, False
            chunk = b"a" * 65536
            while sent < 64 * 1024 * 1024 and not cut:
                try:
                    sock.sendall(chunk)
                    sent += len(chunk)
                except OSError:  # reset or broken pipe: the server stopped reading and closed
                    cut = True
            if not cut:
                ready, _, _ = select.select([sock], [], [], 10.0)
                cut = bool(ready) and sock.recv(64).startswith(b"HTTP/1.1 4")
        finally:
            sock.close()
    assert cut and sent < 16 * 1024 * 1024


def test_serving_configures_no_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.1 attack: store.serve() inside a bot adds no logging handler (the library never configures
    logging; uvicorn's default dictConfig put its own stderr handlers on the "uvicorn" loggers before)."""
    import logging

    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    for name in names:
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    root_handlers = list(logging.getLogger().handlers)
    with serving(AccountStateStore()) as server:
        assert httpx.get(server.url + "/api/health").status_code == 200
    assert {name: logging.getLogger(name).handlers for name in names} == {name: [] for name in names}
    assert logging.getLogger().handlers == root_handlers


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"poll_interval": _NAN}, id="poll-nan"),
        pytest.param({"poll_interval": _INF}, id="poll-inf"),
        pytest.param({"poll_interval": 1e300}, id="poll-huge"),
        pytest.param({"max_connections": 0}, id="connections-0"),
        pytest.param({"stream": {"queue_size": 0}}, id="queue-0-unbounded"),
        pytest.param({"stream": {"heartbeat_interval": _NAN}}, id="heartbeat-nan"),
        pytest.param({"stream": {"client_timeout": -1.0}}, id="client-timeout-negative"),
        pytest.param({"stream": {"send_timeout": _INF}}, id="send-timeout-inf"),
        pytest.param({"limits": {"max_save_age": _NAN}}, id="save-age-nan"),
        pytest.param({"limits": {"max_backup_age": -5.0}}, id="backup-age-negative"),
    ],
)
def test_hostile_server_options_are_a_typed_error_before_anything_listens(options: dict[str, Any]) -> None:
    """issue 18 attack: NaN, infinite, huge, negative or zero options are ServeError (a ValueError) before
    the server listens (before: NaN ages never turned health to 503, an infinite poll interval killed the
    poll thread with a traceback, queue_size=0 was an unbounded queue)."""
    from posstate.core.errors import ServeError
    from posstate.serve.health import HealthLimits
    from posstate.serve.stream import StreamOptions

    built: dict[str, Any] = dict(options)
    with pytest.raises(ServeError) as info:
        if "stream" in built:
            built["stream"] = StreamOptions(**built["stream"])
        if "limits" in built:
            built["limits"] = HealthLimits(**built["limits"])
        with serving(AccountStateStore(), **built):
            pass
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("option", ["--poll-interval", "--max-save-age", "--max-backup-age"])
def test_posstate_serve_refuses_nan_and_inf_options(cfg: StateConfig, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack: `posstate serve --poll-interval nan` (click's FloatRange lets NaN and inf through) is
    one Error line, exit 2, and nothing listens."""
    from click.testing import CliRunner

    from posstate.cli.main import cli

    served: list[Any] = []

    def fake_serve_forever(self: Any) -> None:
        served.append(self)
        self.stop()

    monkeypatch.setattr(_server.StateServer, "serve_forever", fake_serve_forever)

    for value in ("nan", "inf"):
        res = CliRunner().invoke(cli, ["serve", "--port", "0", "--state-dir", str(cfg.state_dir), option, value])
        assert res.exit_code == 2, res.output
        assert res.output.count("Error:") == 1 and "serving" not in res.output
    assert served == []


def test_a_state_rolled_back_to_an_older_authentic_copy_turns_health_503(
    manager: Any, cfg: StateConfig, key: bytes, tmp_path: Path
) -> None:
    """issue 18 attack (T1 rollback): while `posstate serve` runs it remembers the highest generation it read;
    an older authentic state file put back (the journal deleted) is 503 naming both generations, until the
    bot writes past it (before: served as healthy, the closed position back on every dashboard)."""
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    old = cfg.state_path.read_bytes()
    m.delete_position("BTC/USDT", "long")
    m.set_position(pos("ETH/USDT", 2))
    m.save()
    read = ReadOptions(keyring=Keyring(key=key), max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
    with serving(cfg, read=read) as server:
        assert httpx.get(server.url + "/api/health").status_code == 200
        newer = httpx.get(server.url + "/api/health").json()["generation"]
        cfg.state_path.write_bytes(old)  # the attacker's older authentic copy, journal gone
        for path in (cfg.journal_path, cfg.legacy_journal_path):
            if path is not None and path.exists():
                path.unlink()
        server.source.poll()
        sick = httpx.get(server.url + "/api/health")
        assert sick.status_code == 503, sick.text
        assert any("went back" in r and str(newer) in r for r in sick.json()["reasons"]), sick.json()
        m.close()
        with PositionStateManager(cfg, key=key) as again:  # the bot writes on past the highest generation
            again.load_positions()
            while again.generation <= newer:
                again.set_position(pos("SOL/USDT", again.generation + 1))
                again.save()
        server.source.poll()
        assert httpx.get(server.url + "/api/health").status_code == 200


@pytest.mark.parametrize("how", ["key-file", "POSSTATE_KEY", "POSSTATE_PASSPHRASE"])
def test_the_key_is_refused_as_the_bearer_token(
    cfg: StateConfig, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """issue 18.4 attack: `--token-file` naming the key file (or a file holding the key or passphrase) is
    refused: every client would send the state's key in clear in each request (before: served, the key
    became the token)."""
    import base64

    from click.testing import CliRunner

    from posstate.cli.main import cli

    served: list[Any] = []

    def fake_serve_forever(self: Any) -> None:
        served.append(self)
        self.stop()

    monkeypatch.setattr(_server.StateServer, "serve_forever", fake_serve_forever)
    for name in ("POSSTATE_KEY", "POSSTATE_KEY_FILE", "POSSTATE_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)
    key_file = write_key(tmp_path / "bot.key", key)
    args = ["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(cfg.state_dir), "--token-file"]
    if how == "key-file":
        args += [str(key_file), "--key-file", str(key_file)]
    else:
        secret = base64.b64encode(key).decode() if how == "POSSTATE_KEY" else "operator-passphrase-long-enough"
        monkeypatch.setenv(how, secret)
        token_file = tmp_path / "api.token"
        token_file.write_text(secret + "\n")
        token_file.chmod(0o600)
        args.append(str(token_file))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert res.output.count("Error:") == 1 and "key" in res.output and served == []
    assert base64.b64encode(key).decode() not in res.output


def test_repeated_snapshot_requests_serialize_the_state_once_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: a client hammering /api/account/snapshot and /api/positions costs one serialization
    per state version, not one per request (each was O(state) CPU in the bot's process, under its GIL)."""
    from posstate.serve.view import View

    calls: list[str] = []
    snapshot_json, positions_json = View.snapshot_json, View.positions_json

    def counted_snapshot(self: View, **kw: Any) -> dict[str, Any]:
        calls.append("snapshot")
        return snapshot_json(self, **kw)

    def counted_positions(self: View) -> dict[str, Any]:
        calls.append("positions")
        return positions_json(self)

    monkeypatch.setattr(View, "snapshot_json", counted_snapshot)
    monkeypatch.setattr(View, "positions_json", counted_positions)
    store = AccountStateStore()
    store.set_active_position(pos("BTC/USDT", 1))
    with serving(store) as server, httpx.Client() as client:
        bodies = {client.get(server.url + "/api/account/snapshot").content for _ in range(20)}
        assert len({client.get(server.url + "/api/positions").content for _ in range(20)}) == 1
        assert len(bodies) == 1 and calls.count("snapshot") == 1 and calls.count("positions") == 1
        version = store.version
        store.set_active_position(pos("BTC/USDT", 2))
        changed = threading.Event()
        for _ in range(2000):  # the poll thread publishes the change (a hang guard, not a timing)
            if server.source.view().version != version or changed.wait(0.01):
                break
        after = client.get(server.url + "/api/account/snapshot").json()
    assert after["positions"]["BTC/USDT|long"]["position"]["contracts"] == "2"
    assert calls.count("snapshot") == 2


def test_token_files_refused_with_the_reason(tmp_path: Path) -> None:
    """issue 18.4 attack: a symlinked, missing, FIFO or binary token file is refused naming why (before:
    "cannot read the token file (OSError)"), and never waits on a FIFO."""
    from posstate.core.errors import ServeError

    real = tmp_path / "real.token"
    real.write_text("k" * 32)
    real.chmod(0o600)
    link = tmp_path / "link.token"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.token"
    os.mkfifo(fifo, 0o600)
    binary = tmp_path / "binary.token"
    binary.write_bytes(b"\xff\xfe" * 20)
    binary.chmod(0o600)
    for path, reason in (
        (link, "symbolic link"),
        (tmp_path / "missing.token", "does not exist"),
        (fifo, "not a regular file"),
        (binary, "UTF-8"),
    ):
        with pytest.raises(ServeError, match=reason) as info:
            _server.read_token(path)
        assert "k" * 32 not in str(info.value)


class _NoWrites:
    """A FileOps that records every operation that could change or lock the directory (by name)."""

    WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, base: Any) -> None:
        self.base = base
        self.bad: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.base, name)
        if name in ("write", "pwrite", "fsync", "fdatasync", "ftruncate", "replace", "link", "unlink", "fsync_dir", "mkdir"):

            def refused(*args: Any, **kw: Any) -> Any:
                self.bad.append(f"{name}{args[:1]}")
                return real(*args, **kw)

            return refused
        if name == "open":

            def opened(path: Any, flags: int, mode: int = 0o600) -> int:
                if flags & self.WRITING:
                    self.bad.append(f"open({path}, {flags:#o})")
                return int(real(path, flags, mode))

            return opened
        return real


def test_serving_a_directory_never_writes_or_locks_it(
    manager: Any, cfg: StateConfig, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18.1 attack: every route, the stream and the poll thread over a directory (a change, a damaged
    file, a rollback) make no writing file operation and take no flock, recorded through storage/fileops."""
    import fcntl

    from posstate.storage import fileops as fs
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    m = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    m.save()
    m.close()
    good = cfg.state_path.read_bytes()
    locks: list[Any] = []
    real_flock = fcntl.flock

    def recorded_flock(fd: Any, op: int) -> None:
        locks.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", recorded_flock)
    recorder = _NoWrites(fs.backend())
    read = ReadOptions(keyring=Keyring(key=key), max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
    with fs.use(recorder), serving(cfg, read=read) as server:  # type: ignore[arg-type]
        paths = ("/", "/static/status.js", "/api/account/snapshot", "/api/positions", "/api/health", "/api/backups", "/metrics")
        for path in paths:
            assert httpx.get(server.url + path).status_code == 200, path

        async def stream() -> str:
            async with connect(ws_url(server)) as ws:
                return str(json.loads(await ws.recv())["topic"])

        assert run(stream()) == "snapshot"
        cfg.state_path.write_bytes(good[:-7])  # damaged: read, refused, reported
        server.source.poll()
        assert httpx.get(server.url + "/api/health").status_code == 503
    assert recorder.bad == [] and locks == []


@pytest.mark.parametrize("host", ["::", "0.0.0.0", "0", "::ffff:127.0.0.1", "127.1", "", "myhost.example"])
def test_every_spelling_of_a_non_loopback_address_needs_a_token(host: str) -> None:
    """issue 18.4 attack: wildcard and odd spellings (`::`, `0`, a v4-mapped address, `127.1`, empty, a name)
    are refused without a token before anything listens; only a literal loopback address or `localhost` is open."""
    from posstate.core.errors import ServeError

    with pytest.raises(ServeError, match="without a token"), serving(AccountStateStore(), host=host):
        pass


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2"])
def test_other_loopback_addresses_serve_and_check_the_host_header(host: str) -> None:
    """issue 18.4 attack: `localhost` and 127.0.0.2 serve without a token, and still refuse a foreign Host."""
    with serving(AccountStateStore(), host=host) as server:
        assert httpx.get(server.url + "/api/health").status_code == 200
        assert httpx.get(server.url + "/api/health", headers={"Host": f"evil.example:{server.port}"}).status_code == 403


def test_no_method_or_unknown_path_passes_the_token_check(tmp_path: Path) -> None:
    """issue 18.4 attack: HEAD, OPTIONS, POST and unknown paths (404/405 pages, path tricks) are 401 without
    the token, like GET: the guard runs before routing."""
    token_file = tmp_path / "token"
    token_file.write_text("z" * 32)
    token_file.chmod(0o600)
    with serving(AccountStateStore(), host="0.0.0.0", token_file=token_file) as server:
        url = f"http://127.0.0.1:{server.port}"
        for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/nope", "/static/../api/positions", "/static/status.js", "/metrics/", "/api/account/stream"):
                assert httpx.request(method, url + path).status_code == 401, (method, path)
        assert httpx.head(url + "/api/health", headers={"Authorization": "Bearer " + "z" * 32}).status_code == 200


def test_reconnecting_stream_clients_serialize_the_snapshot_once_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.3 attack: a client connecting and disconnecting the stream in a loop costs one snapshot
    serialization per state version (each connect was O(state) on the server's event loop, in the bot's
    process); a symbol filter still gets its own cut snapshot."""
    from posstate.serve.view import View

    calls: list[Any] = []
    snapshot_json = View.snapshot_json

    def counted(self: View, **kw: Any) -> dict[str, Any]:
        calls.append(kw.get("symbols"))
        return snapshot_json(self, **kw)

    monkeypatch.setattr(View, "snapshot_json", counted)
    store = AccountStateStore()
    store.set_active_position(pos("BTC/USDT", 1))
    store.set_active_position(pos("ETH/USDT", 1))
    with serving(store) as server:

        async def first(query: str = "") -> dict[str, Any]:
            async with connect(ws_url(server, query)) as ws:
                return dict(json.loads(await ws.recv()))

        snaps = [run(first()) for _ in range(10)]
        assert httpx.get(server.url + "/api/account/snapshot").json() == {k: v for k, v in snaps[0].items() if k != "topic"}
        cut = run(first("symbols=ETH/USDT"))
    assert all(s == snaps[0] for s in snaps) and snaps[0]["topic"] == "snapshot"
    assert set(snaps[0]["positions"]) == {"BTC/USDT|long", "ETH/USDT|long"}
    assert set(cut["positions"]) == {"ETH/USDT|long"}
    assert [c for c in calls if c is None] == [None] and len(calls) == 2


def test_a_planted_or_damaged_backup_does_not_count_as_the_newest(
    manager: Any, cfg: StateConfig, key: bytes, tmp_path: Path
) -> None:
    """issue 18.2 attack: with --max-backup-age, a file planted in backups/ under a fresh name (a plaintext
    backup anyone can write, or garbage) does not count as the newest backup: with the key the newest is
    authenticated, and a damaged one never counts (before: any file with a fresh name silenced the alarm)."""
    import time as _time

    from posstate.serve.health import HealthLimits
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions

    m = manager()
    m.load_positions()
    m.save()
    m.close()
    backups = cfg.state_dir / "backups"
    for old in backups.glob("positions_*.json"):
        old.unlink()  # the bot's backups are gone (or never made): the alarm must ring
    plain = StateConfig.in_dir(tmp_path / "forger", encryption=False)
    with PositionStateManager(plain) as p:
        p.load_positions()
        p.set_position(pos("FORGED/USDT", 1))
        p.save()
    stamp = _time.strftime("%Y%m%d_%H%M%S", _time.gmtime())
    read = ReadOptions(keyring=Keyring(key=key), max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
    with serving(cfg, read=read, limits=HealthLimits(max_backup_age=3600)) as server:
        assert httpx.get(server.url + "/api/health").status_code == 503
        (backups / f"positions_{stamp}.json").write_bytes(plain.state_path.read_bytes())
        forged = httpx.get(server.url + "/api/health")
        (backups / f"positions_{stamp}_9.json").write_bytes(b"garbage" * 100)
        damaged = httpx.get(server.url + "/api/health")
        listed = httpx.get(server.url + "/api/backups").json()["backups"]
    assert forged.status_code == 503, forged.text
    assert damaged.status_code == 503, damaged.text
    assert forged.json()["newest_backup"] is None and damaged.json()["newest_backup"] is None
    assert [b["valid"] for b in listed] == [False, False]


def test_manager_closed_while_serving_then_stopped_with_a_client_connected(manager: Any) -> None:
    """issue 18.1 attack: the bot closes its manager while clients are connected, then stops the server: health
    turns 503 ("closed"), stop() returns, the client gets 1012, and no server thread is left."""
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_position(pos("BTC/USDT", 1))
    server: Any = m.serve(port=0, poll_interval=0.01, process=False)
    try:

        async def scenario() -> int | None:
            async with connect(ws_url(server)) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                m.close()
                server.source.poll()  # what the poll thread does next (not waiting for it)
                health = httpx.get(server.url + "/api/health")
                assert health.status_code == 503 and "closed" in " ".join(health.json()["reasons"])
                stopper = threading.Thread(target=server.stop)
                stopper.start()
                try:
                    while True:
                        await ws.recv()
                except ConnectionClosed:
                    pass
                stopper.join(30)
                assert not stopper.is_alive()
                return ws.close_code

        assert run(scenario()) == 1012
    finally:
        server.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("posstate-serve")]


def test_a_forked_child_does_not_keep_the_port(recwarn: pytest.WarningsRecorder) -> None:
    """issue 18.1 attack: a bot that forks a worker while serving, then stops the server: the port is free
    again (a new server can listen there), a new client is refused, not left hanging in the listen backlog
    of the child's copy of the socket, and a client connected at the fork sees its connection end (before:
    none of these until the worker exited)."""
    import warnings

    store = AccountStateStore()
    server = _server.serve_state(store, port=0)
    port = server.port
    client = socket.create_connection(("127.0.0.1", port))  # a keep-alive client, connected at the fork
    client.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):  # the whole response (a small JSON body)
        answer += client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
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
        server.stop()
        assert _closed_by_peer(client, 10.0)  # its connection really ends (the child's copy is closed too)
        client.close()
        probe = socket.socket()
        probe.settimeout(10)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
        probe.close()
        again = _server.serve_state(store, port=port)
        again.stop()
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_port_80_accepts_the_host_header_without_the_port() -> None:
    """issue 18.4 attack: on port 80 a browser sends `Host: 127.0.0.1` (no default port), which must be
    accepted (before: every page request 403); other ports still need it, and foreign names never pass."""
    assert "127.0.0.1" in _server.loopback_hosts("127.0.0.1", 80)
    assert "localhost" in _server.loopback_hosts("127.0.0.1", 80)
    assert "127.0.0.1:80" in _server.loopback_hosts("127.0.0.1", 80)
    assert "127.0.0.1" not in _server.loopback_hosts("127.0.0.1", 8787)
    assert "127.0.0.2:8787" in _server.loopback_hosts("127.0.0.2", 8787)
    assert "[::1]:8787" in _server.loopback_hosts("::1", 8787)
    assert not any("evil" in h for h in _server.loopback_hosts("127.0.0.1", 80))


@pytest.mark.parametrize(
    "token", ["", "short", "sixteen chars ok but spaced", "x" * 15, "\u00a0" * 20, "\u00e9" * 20, "tab\there-is-long-enough"]
)
def test_a_weak_token_given_directly_is_refused(token: str) -> None:
    """issue 18.4 attack: `serve(token=...)` (the library's direct form) obeys the token-file rules: empty,
    short or spaced tokens are ServeError before anything listens (before: any token was taken, the empty
    one letting `Authorization: Bearer` in)."""
    from posstate.core.errors import ServeError

    with pytest.raises(ServeError, match="at least"), serving(AccountStateStore(), host="0.0.0.0", token=token):
        pass


def test_a_server_that_fails_to_start_frees_its_port_and_the_bots_hooks(manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18.1 attack: when uvicorn fails to start, serve() raises ServeError and leaves nothing behind: the
    port is free and the manager carries none of the server's event handlers (before: the bound socket and
    six handlers stayed for the life of the bot)."""
    import uvicorn

    from posstate.core.errors import ServeError

    m: PositionStateManager = manager()
    m.load_positions()
    before = {event: list(handlers) for event, handlers in m._events._handlers.items()}

    async def failing_startup(self: Any, sockets: Any = None) -> None:
        raise SystemExit(3)  # what uvicorn does when its startup fails

    with socket.socket() as free:  # a port nobody uses, to check it is free again afterwards
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setattr(uvicorn.Server, "startup", failing_startup)
    with pytest.raises(ServeError, match="stopped while starting"):
        m.serve(port=port, process=False)
    assert {event: list(handlers) for event, handlers in m._events._handlers.items() if handlers} == {
        e: h for e, h in before.items() if h
    }
    with socket.socket() as again:  # no SO_REUSEADDR: fails while any socket still listens there
        again.bind(("127.0.0.1", port))
        again.listen(1)
