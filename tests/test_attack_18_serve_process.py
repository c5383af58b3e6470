"""Issue 18 attack (the server process of ``manager.serve()`` / ``store.serve()``): a server process that
answers garbage, never answers or never reads; a bot that restored SIGPIPE's default action; a frozen bot
(its ``sys.executable`` is the bot itself); a server process that falls behind with a state larger than the
pipe while the bot keeps writing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from posstate import AccountStateStore, PositionStateManager
from tests.serve_support import pos, read_until, require, run, ws_url

require("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")

from websockets.asyncio.client import connect  # noqa: E402

from posstate.core.errors import ServeError  # noqa: E402
from posstate.serve import process as _process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _until(check: Any, timeout: float = 30.0) -> bool:
    """Wait for *check()* (a hang guard: each turn waits on a fresh event with a short timeout)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _big_store() -> AccountStateStore:
    """A store whose first frame (about 3 MB) is larger than the 1 MiB pipe."""
    store = AccountStateStore()
    for n in range(3000):
        store.set_symbol_metadata(f"S{n}", {"blob": "x" * 1000})
    return store


def _fake_python(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """An executable standing in for ``python -m posstate.serve.child``: it writes its pid, then runs *body*."""
    pid_file = tmp_path / "fake.pid"
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\necho $$ > {pid_file}\n{body}\n")
    exe.chmod(0o700)
    return exe, pid_file


_FAKES = [
    pytest.param("echo 42; exec sleep 120", id="a-json-line-that-is-not-an-object"),
    pytest.param('echo \'{"port": "http"}\'; exec sleep 120', id="a-port-that-is-not-a-number"),
    pytest.param("printf x; exec sleep 120", id="garbage-without-a-newline"),
    pytest.param("exec sleep 120", id="never-reads-its-stdin-nor-answers"),
]


@pytest.mark.parametrize("body", _FAKES)
def test_a_server_process_that_answers_garbage_or_nothing_is_a_serve_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    """issue 18 attack: whatever the server process does at start (a line that is not the JSON object, bytes
    without a newline, never reading a first frame larger than the pipe), serve() raises ServeError with the
    next step within START_TIMEOUT and leaves no process behind (before: TypeError, or a hang for ever)."""
    exe, pid_file = _fake_python(tmp_path, body)
    store = _big_store()
    monkeypatch.setattr(sys, "executable", str(exe))
    monkeypatch.setattr(_process, "START_TIMEOUT", 1.0)
    outcome: list[BaseException | object] = []

    def start() -> None:
        try:
            outcome.append(store.serve(port=0))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=start, daemon=True)
    t.start()
    t.join(30)
    try:
        assert not t.is_alive(), "serve() hung on a server process that never answered"
        assert len(outcome) == 1 and isinstance(outcome[0], ServeError), outcome
        assert "server process" in str(outcome[0]) and "process=False" in str(outcome[0])
        assert _until(lambda: _gone(int(pid_file.read_text()))), "the server process was left running"
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


_SIGPIPE_BOT = """
import signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a bot piped into `head` may do
from posstate import AccountStateStore, PositionStateManager
from posstate.core.errors import ServeError
sys.executable = sys.argv[1]
store = AccountStateStore()
for n in range(3000):
    store.set_symbol_metadata(f"S{n}", {"blob": "x" * 1000})
try:
    store.serve(port=0)
except ServeError as exc:
    print("ServeError:", exc, flush=True)
"""

_CLOSES_ITS_STDIN = """
import os, sys
head = os.read(0, 4)
size = int.from_bytes(head, "big")
while size:
    size -= len(os.read(0, min(size, 65536)))
print('{"port": 1}', flush=True)
os.close(0)
import time
time.sleep(120)
"""

_SIGPIPE_FEEDER_BOT = """
import signal, sys, threading
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
from posstate import AccountStateStore, PositionStateManager
sys.executable = sys.argv[1]
store = AccountStateStore()
server = store.serve(port=0, poll_interval=0.01)
deadline = threading.Event()
for n in range(3000):
    store.set_wallet_balance(str(n))
    if server.exit_code is not None:
        break
    deadline.wait(0.01)
print("exit_code", server.exit_code, flush=True)
server.stop()
"""


def test_a_bot_with_sigpipe_default_survives_a_server_process_that_dies_at_start(tmp_path: Path) -> None:
    """issue 18 attack: a bot that set SIGPIPE back to its default action gets ServeError when the server
    process exits before reading its first frame (before: the bot was killed by SIGPIPE in serve())."""
    exe, _ = _fake_python(tmp_path, "exit 3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_BOT, str(exe)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("ServeError: the server process exited with code 3")


def test_a_bot_with_sigpipe_default_survives_a_server_process_that_closes_its_pipe(tmp_path: Path) -> None:
    """issue 18 attack: a server process that closes its end of the pipe but lives on is stopped and reported
    (exit_code) by the feeder; a bot with SIGPIPE's default action is not killed (before: killed by SIGPIPE
    at the feeder's next write)."""
    script = tmp_path / "closes.py"
    script.write_text(_CLOSES_ITS_STDIN)
    exe, pid_file = _fake_python(tmp_path, f"exec {sys.executable} {script}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        with (tmp_path / "stderr").open("w") as err:  # not a pipe: the server process inherits the bot's stderr
            done = subprocess.run(
                [sys.executable, "-c", _SIGPIPE_FEEDER_BOT, str(exe)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, (done.returncode, (tmp_path / "stderr").read_text()[-2000:])
        assert done.stdout.startswith("exit_code ") and done.stdout.split()[1] != "None"
        assert _until(lambda: _gone(int(pid_file.read_text())))
    finally:
        if pid_file.exists() and not _gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_frozen_bot_refuses_to_start_itself_as_the_server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack: in a frozen application (PyInstaller and the like) sys.executable is the bot itself:
    ``-m posstate.serve.child`` would start a second bot. serve() refuses with ServeError naming
    process=False, before starting anything."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)

    def no_spawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    store = AccountStateStore()
    with pytest.raises(ServeError, match="process=False"):
        store.serve(port=0)


def test_a_state_larger_than_the_pipe_catches_up_without_resync_while_the_bot_writes() -> None:
    """issue 18 attack: while a frame larger than the pipe is still being written, a change of the bot is
    kept for the next frame, not a resync for every client (before: with a state over the pipe's size and a
    bot writing faster than a whole-view frame drains, every client was sent resync again and again)."""
    store = AccountStateStore()
    store.set_wallet_balance("1")
    with store.serve(port=0, poll_interval=0.01) as server:

        async def scenario() -> list[dict[str, Any]]:
            async with connect(ws_url(server), max_size=None) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    store.set_symbol_metadata("BIG", {"blob": "x" * (3 * 1024 * 1024)})  # one frame > the pipe
                    assert _until(lambda: server.backlog > 0)
                    store.set_wallet_balance("2")
                    polls = server.polls
                    assert _until(lambda: server.polls >= polls + 2)
                    assert server.resyncs == 0
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                return await read_until(ws, lambda g: any(x["topic"] == "balance.update" for x in g), timeout=60)

        got = run(scenario())
        assert [x["topic"] for x in got] == ["metadata.update", "balance.update"]
        assert server.resyncs == 0


def test_a_missing_serve_extra_in_the_server_process_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack: when the server process cannot import the web stack (the serve extra is missing where
    it runs), serve() raises ServeError naming ``pip install 'posstate[serve]'`` (before: "exited with code 1",
    and a next step, process=False, that fails the same way)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "uvicorn.py").write_text("raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    store = AccountStateStore()
    with pytest.raises(ServeError, match=r"uvicorn is missing.*pip install 'posstate\[serve\]'"):
        store.serve(port=0)


@pytest.mark.parametrize("process", [pytest.param(True, id="process"), pytest.param(False, id="threads")])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"port": 70000}, id="port-70000"),
        pytest.param({"port": -1}, id="port-negative"),
        pytest.param({"port": "8787"}, id="port-text"),
        pytest.param({"port": 8787.5}, id="port-float"),
        pytest.param({"port": True}, id="port-true-would-bind-1"),
        pytest.param({"host": None, "port": 0}, id="host-none"),
    ],
)
def test_a_bad_port_or_host_is_a_serve_error_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, process: bool, options: dict[str, Any]
) -> None:
    """issue 18 attack: a port outside 0-65535, not a whole number, or True (port 1), or a host that is not
    text, is ServeError in the bot before a server process starts (before: OverflowError/TypeError/
    AttributeError in process, a traceback on stderr and "exited with code 1" from the server process, and
    True served on port 1)."""

    def no_spawn(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a server process was started")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    store = AccountStateStore()
    with pytest.raises(ServeError, match=r"(port|host) must be"):
        store.serve(process=process, **options)


def test_a_crashed_server_process_is_started_again_on_the_same_port_with_the_bots_state() -> None:
    """issue 18 attack: a server process killed under the bot (the OOM killer, a crash) is started again by
    the feeder, on the same port, from the bot's current state (a change made while none ran included), and
    counted in ``restarts`` (before: nothing was served until the bot itself called serve() again)."""
    import httpx

    store = AccountStateStore()
    store.set_wallet_balance("1")
    with store.serve(port=0, poll_interval=0.01) as server:
        port, first = server.port, server.pid
        os.kill(first, signal.SIGKILL)
        assert _until(lambda: server.exit_code is not None)
        store.set_wallet_balance("2")  # while no server process runs
        assert _until(lambda: server.restarts == 1, timeout=60), "the server process was not started again"
        assert server.pid != first and server.port == port and server.exit_code == -signal.SIGKILL
        url = f"http://127.0.0.1:{port}/api/account/snapshot"
        assert httpx.get(url).json()["balances"]["wallet"] == "2"
        store.set_wallet_balance("3")
        assert _until(lambda: httpx.get(url).json()["balances"]["wallet"] == "3")
        second = server.pid
    assert _until(lambda: _gone(second)) and _gone(first)


def test_a_restart_that_cannot_bind_is_retried_and_stop_ends_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 18 attack: when the port was taken meanwhile, starting the server process again fails with the
    reason logged and is retried (with a growing delay) until the port is free; stop() leaves no process."""
    import logging
    import socket

    import httpx

    from posstate.serve.process import ChildServer

    monkeypatch.setattr(ChildServer, "RESTART_DELAY", 0.05)
    store = AccountStateStore()
    store.set_wallet_balance("1")
    server = store.serve(port=0, poll_interval=0.01)
    try:
        port, first = server.port, server.pid
        taker = socket.socket()
        with caplog.at_level(logging.ERROR, logger="posstate"):
            os.kill(first, signal.SIGKILL)
            assert _until(lambda: server.exit_code is not None)
            assert _until(lambda: _bind(taker, port)), "the port was not freed by the killed server process"
            assert _until(lambda: any("again failed" in r.getMessage() for r in caplog.records))
        assert any("cannot listen" in r.getMessage() for r in caplog.records)
        assert server.restarts == 0
        taker.close()
        assert _until(lambda: server.restarts == 1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/account/snapshot").json()["balances"]["wallet"] == "1"
    finally:
        server.stop()
    assert _until(lambda: _gone(server.pid))


def _bind(sock: Any, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        return False
    return True


def test_a_frame_the_server_process_cannot_apply_ends_it_for_a_fresh_start(tmp_path: Path) -> None:
    """issue 18 attack: a frame the server process cannot apply (here a malformed view delta) ends it with an
    error code and the reason on stderr, so the bot's feeder starts a new one from the whole view (before: it
    logged, kept serving a view that had silently stopped following the bot's, and every later delta was
    applied on top of it)."""
    from posstate.serve import pipe
    from posstate.serve.view import View

    stats = {"saves": 0, "updates": 0, "compactions": 0, "backups": 0, "recoveries": 0, "last_save": None}
    init = {
        "kind": "store",
        "config": None,
        "view": View("store", 1, balance=None),
        "orders": {},
        "stats": {**stats, "problem": None, "ready": True},
        "host": "127.0.0.1",
        "port": 0,
        "token": None,
        "options": {},
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (tmp_path / "stderr").open("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "posstate.serve.child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(pipe.encode(init))
            child.stdin.flush()
            assert "port" in json.loads(child.stdout.readline())
            child.stdin.write(pipe.encode({"delta": {"positions": 5}}))
            child.stdin.flush()
            try:
                code = child.wait(30)
            except subprocess.TimeoutExpired:
                code = None
            assert code not in (None, 0), "the server process kept serving a view it could not update"
        finally:
            child.kill()
            child.wait()
            for f in (child.stdin, child.stdout):
                if f is not None:
                    f.close()
    assert "applying a frame from the bot failed" in (tmp_path / "stderr").read_text()


def test_stop_ends_a_stopped_server_process_cleanly() -> None:
    """issue 18 attack: stop() on a server process stopped by SIGSTOP (a debugger, an operator) continues it so
    it reads the end of its pipe and exits by itself with 0 (before: the bot's stop() waited STOP_TIMEOUT,
    10 s, then killed it)."""
    store = AccountStateStore()
    store.set_wallet_balance("1")
    server = store.serve(port=0, poll_interval=0.01)
    proc = server._proc
    os.kill(server.pid, signal.SIGSTOP)
    try:
        store.set_wallet_balance("2")
        server.stop()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0


def test_stop_in_a_forked_child_never_closes_a_descriptor_the_child_reused() -> None:
    """issue 18 attack: a child forked inside ``with store.serve():`` that leaves the block (stop() in the
    child) does not close whatever now holds the number of the pipe its fork hook closed (before: the hook
    closed the raw descriptor, and stop() closed the same number again through the pipe's file object)."""
    import warnings

    store = AccountStateStore()
    server = store.serve(port=0, poll_interval=0.01)
    try:
        number = server._proc.stdin.fileno()  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running (Python 3.12+)
            pid = os.fork()
        if pid == 0:  # the child: its own file on that number, then leave the block
            code = 1
            try:
                mine = os.open(os.devnull, os.O_RDONLY)
                os.dup2(mine, number)
                server.stop()
                os.fstat(number)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "stop() in the child closed a descriptor it did not own"
        store.set_wallet_balance("2")  # the parent's server is untouched
        assert _until(lambda: server.polls > 0 and server.exit_code is None)
    finally:
        server.stop()


def test_a_module_planted_in_the_bots_working_directory_is_never_imported_by_the_server_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18 attack: ``python -m`` puts the working directory first on sys.path; a bot whose working
    directory others can write (its state directory, say) must not run their ``json.py`` or ``uvicorn.py`` in
    the server process (before: the server process imported them, as the bot's user)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran"
    for name in ("json", "uvicorn", "starlette", "posstate"):
        (cwd / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise ImportError('planted')\n")
    monkeypatch.chdir(cwd)
    store = AccountStateStore()
    store.set_wallet_balance("1")
    with store.serve(port=0) as server:
        import httpx

        assert httpx.get(server.url + "/api/account/snapshot").json()["balances"]["wallet"] == "1"
    assert not marker.exists(), marker.read_text()


def test_an_installed_posstate_does_not_put_site_packages_before_the_standard_library() -> None:
    """issue 18 attack: when posstate runs from a site-packages folder (installed), the server process's
    PYTHONPATH does not get that folder first (it would come before the standard library there, and a stray
    ``pathlib.py`` from PyPI would replace the standard one); from a checkout it does (the bot's code)."""
    from posstate.serve import spawn

    site_dir = "/venv/lib/python3/site-packages"
    env = spawn.child_env({"PYTHONPATH": "/mine", "POSSTATE_KEY": "k", "HOME": "/h"}, site_dir, [site_dir])
    assert env == {"PYTHONPATH": "/mine", "HOME": "/h"}
    env = spawn.child_env({"PYTHONPATH": "/mine"}, "/src/checkout", [site_dir])
    assert env["PYTHONPATH"] == os.pathsep.join(["/src/checkout", "/mine"])


def test_stop_during_a_restart_ends_the_process_being_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack: stop() while the feeder waits for a new server process that never answers kills that
    process, so the feeder ends at once (not after START_TIMEOUT) and nothing is left running."""
    from posstate.serve.process import ChildServer

    monkeypatch.setattr(ChildServer, "RESTART_DELAY", 0.01)
    store = AccountStateStore()
    server = store.serve(port=0, poll_interval=0.01)
    exe, pid_file = _fake_python(tmp_path, "exec sleep 120")
    try:
        monkeypatch.setattr(sys, "executable", str(exe))  # the next start never answers
        os.kill(server.pid, signal.SIGKILL)
        assert _until(lambda: pid_file.exists() and server._restarting)
        server.stop()
        assert not server._feeder.is_alive()
        assert _until(lambda: _gone(int(pid_file.read_text())))
        assert server.restarts == 0
    finally:
        server.stop()
        if pid_file.exists() and not _gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_value_replaced_by_an_equal_one_of_another_type_reaches_the_server_process(manager: Any) -> None:
    """issue 18 attack: metadata changed from 1 to true (or 1 to 1.0: equal in Python, not in JSON) is in the
    server process's snapshot as in the in-process server's (before: the view's delta compared with ==, left
    the entry out, and the server process served 1 for ever)."""
    import httpx

    m: PositionStateManager = manager()
    m.load_positions()
    m.set_symbol_metadata("A/USDT", {"flag": 1, "n": 1})
    with m.serve(port=0, poll_interval=0.01) as server, m.serve(port=0, poll_interval=0.01, process=False) as threads:
        m.set_symbol_metadata("A/USDT", {"flag": True, "n": 1.0})

        def data(s: Any) -> Any:
            return httpx.get(s.url + "/api/account/snapshot").json()["symbol_metadata"]["A/USDT"]["data"]

        assert _until(lambda: data(threads) == {"flag": True, "n": 1.0} and type(data(threads)["flag"]) is bool)
        m.set_position(pos("B/USDT", 1))  # a later change, so the server process has surely had the frame
        assert _until(lambda: "B/USDT|long" in httpx.get(server.url + "/api/positions").json()["positions"])
        got = data(server)
        assert got == {"flag": True, "n": 1.0} and type(got["flag"]) is bool and type(got["n"]) is float


@pytest.mark.parametrize("process", [pytest.param(True, id="process"), pytest.param(False, id="threads")])
def test_the_stream_sends_a_value_replaced_by_an_equal_one_of_another_type(manager: Any, process: bool) -> None:
    """issue 18 attack: metadata changed from 1 to true is a ``metadata.update`` on the stream, in both modes
    (before: the source compared entries with ==, 1 == True, and stream clients never heard of it while a
    new snapshot showed true)."""
    m: PositionStateManager = manager()
    m.load_positions()
    m.set_symbol_metadata("A/USDT", {"flag": 1})
    with m.serve(port=0, poll_interval=0.01, process=process) as server:

        async def watch() -> list[dict[str, Any]]:
            async with connect(ws_url(server)) as ws:
                assert json.loads(await ws.recv())["topic"] == "snapshot"
                m.set_symbol_metadata("A/USDT", {"flag": True})
                m.set_position(pos("B/USDT", 1))  # a later change: its update ends the wait either way
                return await read_until(ws, lambda g: any(x["topic"] == "position.update" for x in g))

        got = run(watch())
    updates = [x for x in got if x["topic"] == "metadata.update"]
    assert len(updates) == 1 and updates[0]["data"] == {"flag": True}, got


def test_a_frame_larger_than_the_pipe_is_never_copied_again_at_each_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack: the rest of a frame the pipe took in part is written from a view of that frame, not
    a new copy of it at every poll (before: bytes slicing copied the rest each poll, in the bot's process and
    under its interpreter lock: about 50 ms per poll for a 100 MB frame)."""
    from posstate.serve.process import ChildServer

    written: list[type] = []
    real = ChildServer._write

    def recording(self: ChildServer, data: Any) -> int:
        written.append(type(data))
        return real(self, data)

    store = AccountStateStore()
    with store.serve(port=0, poll_interval=0.01) as server:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            monkeypatch.setattr(ChildServer, "_write", recording)
            store.set_symbol_metadata("BIG", {"blob": "x" * (3 * 1024 * 1024)})  # one frame > the pipe
            assert _until(lambda: server.backlog > 0)
            polls = server.polls
            assert _until(lambda: server.polls >= polls + 2)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert _until(lambda: server.backlog == 0)
    assert written.count(memoryview) >= 2, written  # the rest, written from a view at each later poll


def test_a_bot_with_more_than_1024_open_descriptors_can_serve() -> None:
    """issue 18 attack: the pipes to the server process numbered above FD_SETSIZE (a bot holding a thousand
    sockets or files) still start it (before: ``ValueError: filedescriptor out of range in select()``)."""
    import resource

    import httpx

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is under 1,200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        store = AccountStateStore()
        store.set_wallet_balance("7")
        with store.serve(port=0, poll_interval=0.01) as server:
            assert server._fd > 1024
            assert httpx.get(server.url + "/api/account/snapshot").json()["balances"]["wallet"] == "7"
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stop_in_a_forked_child_does_not_wait_for_a_lock_held_at_the_fork() -> None:
    """issue 18 attack: a child forked while the handle's lock was held (the feeder starting a new server
    process) can still call stop() (before: it waited for ever on a lock no thread of the child would free)."""
    import warnings

    store = AccountStateStore()
    server = store.serve(port=0, poll_interval=0.01)
    try:
        with server._lock:  # as the feeder holds it while it starts a server process
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running (Python 3.12+)
                pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.alarm(20)  # a hang ends the child (SIGALRM), not the test run
                    server.stop()
                    code = 0
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "stop() in the forked child hung on the inherited lock"
    finally:
        server.stop()


def test_the_server_process_inherits_none_of_the_bots_other_secrets() -> None:
    """issue 18 (integration): the server process talks to the network, so it inherits only what it needs to
    start (PATH, PYTHONPATH, locale, HOME, TMPDIR ...): never a replica's AWS credentials or an exchange's API
    key the bot keeps in its environment, and never a posstate key variable."""
    from posstate.serve import spawn

    environ = {
        "PATH": "/bin",
        "LC_CTYPE": "C.UTF-8",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "EXCHANGE_API_SECRET": "x",
        "POSSTATE_PASSPHRASE": "p",
    }
    env = spawn.child_env(environ, "/src/checkout", [])
    assert env == {"PATH": "/bin", "LC_CTYPE": "C.UTF-8", "PYTHONPATH": "/src/checkout"}
