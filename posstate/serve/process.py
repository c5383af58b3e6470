"""``manager.serve()`` / ``store.serve()`` from a server process of its own (the default): the bot's process
keeps only a feeder thread; uvicorn, the stream's fan-out and the status page run in a fresh interpreter
(``python -m posstate.serve.child``), which never shares the bot's interpreter lock.

In process, the server's event loop and fan-out (about 5% of a core with 50 stream clients) held the lock
whenever the bot's thread came back from an ``fdatasync``, and the bot waited for it. The feeder does the
polling the server's poll thread did (the same :class:`~posstate.serve.sources.ManagerSource` or
:class:`~posstate.serve.sources.StoreSource`, so the same updates with the same versions) and, every poll
that changed something, writes one frame to the server process's stdin (serve/pipe.py): the updates, the
view's delta, the counters /metrics shows and the bot's fsync latencies. The pipe is non-blocking: while the
pipe holds part of a frame (a frame larger than the pipe, or a server process that fell behind), changes wait
for the next frame; past ``HELD_UPDATES`` of them the feeder drops them and, once the pipe drains, sends the
whole view with ``resync`` for every client (the slow-client policy, one level up).

The server process gets no key (nor the bot's environment's POSSTATE_KEY*, nor any of its descriptors): its
/api/health checks backups by header and checksum, as the in-process server of a manager did. It exits when
its stdin ends (the bot stopped it, or the bot died, even by SIGKILL). A server process that dies while the bot
runs is logged (``posstate serve: the server process ... exited``), shown by :attr:`ChildServer.exit_code`,
and started again by the feeder on the same port (:attr:`ChildServer.restarts`), with a growing delay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posstate.account.store import AccountStateStore
from posstate.account.types import AccountUpdate, Order
from posstate.core import priority
from posstate.core.errors import ServeError
from posstate.manager.manager import PositionStateManager
from posstate.serve import options as _options
from posstate.serve import pipe, spawn
from posstate.serve.fanout import Fanout
from posstate.serve.sources import ManagerSource, Source, StoreSource
from posstate.serve.tokens import _keyring_of, check_token, is_loopback, read_token, refuse_the_key_as_token
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")
#: Seconds the server process may take to import its modules and bind.
START_TIMEOUT = 60.0
#: Seconds stop() waits for the server process to finish its streams before killing it.
STOP_TIMEOUT = 10.0
PIPE_BYTES = spawn.PIPE_BYTES
SECRET_ENV = spawn.SECRET_ENV
_STATS = ("saves", "updates", "compactions", "backups", "recoveries", "last_save")


class Tap(Fanout):
    """The bot-side source's fan-out: it builds no message, it records what the source published for the
    next frame (the server process's real fan-out replays it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, Any]] = []
        #: Updates (and other operations) recorded since the last take().
        self.count = 0

    def reset_orders(self, orders: Mapping[str, Order]) -> None:
        self.ops.append(("reset_orders", dict(orders)))
        self.count += 1

    def publish(self, updates: Iterable[AccountUpdate]) -> None:
        ups = tuple(updates)
        if ups:
            self.ops.append(("publish", ups))
            self.count += len(ups)

    def resync_all(self, version: int) -> None:
        self.ops.append(("resync_all", version))
        self.count += 1

    def take(self) -> list[tuple[str, Any]]:
        ops, self.ops, self.count = self.ops, [], 0
        return ops


def _close_in_child(ref: weakref.ref[ChildServer]) -> None:
    """In a process forked from the bot: close its copy of the pipe, else the server process would never see
    the end of its stdin when the bot dies."""
    server = ref()
    if server is not None:
        server._fd = -1
        server._lock = threading.Lock()  # held by a thread of the parent at the fork, maybe (a restart)
        # through its file object, which then knows it is closed (closing the number alone left the object
        # to close it again later, by then another file of the child's); also mid-restart, before _fd is set.
        # The raw file: the buffered one's lock may have been held by a thread of the parent at the fork.
        stdin = server._proc.stdin
        with contextlib.suppress(OSError, ValueError, AttributeError):
            getattr(stdin, "raw", stdin).close()  # type: ignore[union-attr]


class ChildServer:
    """A server process fed by a thread of the bot's process. ``url`` is known once the constructor returns
    (the server process bound it); :meth:`stop` (or the context manager) ends both."""

    #: Added to the server process's nice value: on a busy machine the scheduler runs the bot's thread,
    #: back from an fdatasync, before the server's sends (a dashboard's update waits a little instead).
    NICENESS = 10
    #: Updates kept for the next frame while the pipe still holds part of one (a frame larger than the pipe,
    #: or a server process that stopped reading); past this many they are dropped for a resync.
    HELD_UPDATES = 65536
    #: Seconds before a server process that died under the bot is started again; doubled after each start
    #: that ran less than RESTART_MAX seconds (a crash loop), up to RESTART_MAX.
    RESTART_DELAY = 1.0
    RESTART_MAX = 60.0

    def __init__(
        self,
        source: Source,
        *,
        host: str,
        port: int,
        token: str | None,
        poll_interval: float = 0.05,
        **server_options: Any,
    ) -> None:
        self.source = source
        self._interval = _options.seconds("poll_interval", poll_interval)
        unknown = set(server_options) - {"stream", "limits", "max_connections"}
        if unknown:
            raise TypeError(f"serve() got unexpected options: {', '.join(sorted(unknown))}")
        if "max_connections" in server_options:
            _options.count("max_connections", server_options["max_connections"])
        self._tap = Tap()
        source.fanout = self._tap
        self._syncs: deque[float] = deque(maxlen=65536)
        self._stop_observing = fs.observe_syncs(self._syncs.append)
        #: Times the feeder dropped changes (the server process fell HELD_UPDATES behind a frame in the pipe):
        #: each made every stream client reconnect (resync).
        self.resyncs = 0
        #: The feeder's turns so far (a test waits on it).
        self.polls = 0
        #: The exit code of the last server process that ended by itself (None: none did); the feeder starts
        #: a new one on the same port (``restarts`` counts them).
        self.exit_code: int | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the current process, between the feeder's restart and stop()
        self._stopped = self._released = self._restarting = False
        #: The rest of a frame the pipe took in part: a view of it (slicing bytes would copy the rest of a
        #: frame of any size at every poll, under the bot's interpreter lock).
        self._pending = memoryview(b"")
        self._behind = False
        self._fd = -1
        self._delay = self.RESTART_DELAY
        self._launch = {"host": host, "port": port, "token": token, "options": server_options}
        try:
            source.poll()  # the first view before anyone connects
            init = self._init_frame()
            self._proc = spawn.spawn(priority.target_nice(self.NICENESS))
        except BaseException:
            self._stop_observing()
            source.close()
            raise
        try:
            self.host, self.port = host, self._handshake(init)
            del init  # the token stays only in the server process (and in _launch, for a restart)
        except BaseException:
            self._kill()
            self._stop_observing()
            source.close()
            raise
        self._launch["port"] = self.port
        self._started = time.monotonic()
        os.register_at_fork(after_in_child=functools.partial(_close_in_child, weakref.ref(self)))
        self._feeder = threading.Thread(target=self._feed, name="posstate-serve-feed", daemon=True)
        self._feeder.start()

    # ---------------------------------------------------------------------------------------- start
    def _init_frame(self) -> bytes:
        """The first frame of a server process: what it serves (the whole view now) and how."""
        self._tap.take()
        self._sent, self._sent_stats = self.source.view(), self._stats()
        self._pending, self._behind = memoryview(b""), False
        source = self.source
        init = {"kind": source.kind, "config": source.config, "view": self._sent, "orders": dict(self._sent.orders)}
        return pipe.encode({**init, "stats": self._sent_stats, **self._launch})

    def _handshake(self, init: bytes) -> int:
        self._fd = self._proc.stdin.fileno()  # type: ignore[union-attr]
        return spawn.handshake(self._proc, init, timeout=START_TIMEOUT)

    @property
    def url(self) -> str:
        shown = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    @property
    def backlog(self) -> int:
        """Bytes of a frame the pipe has not taken yet (the server process is behind)."""
        return len(self._pending)

    @property
    def pid(self) -> int:
        """The server process's id."""
        return self._proc.pid

    # ---------------------------------------------------------------------------------------- feeding
    def _stats(self) -> dict[str, Any]:
        st = self.source.stats
        out: dict[str, Any] = {name: getattr(st, name) for name in _STATS}
        out["problem"] = self.source.problem
        out["ready"] = self.source.ready
        return out

    def _feed(self) -> None:
        spawn.block_sigpipe()  # a bot that set SIGPIPE back to its default is not ended by a closed pipe
        while not self._stopping.wait(self._interval):
            code = self._proc.poll()
            if code is not None:
                if not self._restart(code):
                    return
                continue
            try:
                self.source.poll()
                self._send()
            except BrokenPipeError:  # it closed its end: it is ending, or it no longer reads (then kill it)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(1.0)
                if self._proc.poll() is None:
                    self._proc.kill()
                self._proc.wait()
                continue  # the next turn starts a new one
            except Exception:  # the feeder must outlive any one bad read
                log.exception("posstate serve: feeding the server process failed")
            self.polls += 1

    def _frame(self) -> bytes | None:
        """The next frame (None: nothing changed). After frames were dropped: the whole view and a resync."""
        ops = self._tap.take()
        view = self.source.view()
        stats = self._stats()
        syncs = [self._syncs.popleft() for _ in range(len(self._syncs))]
        msg: dict[str, Any] = {}
        if self._behind:
            self._behind = False
            msg["reset"] = (view, dict(view.orders))
        else:
            if ops:
                msg["ops"] = ops
            if view is not self._sent:
                delta = pipe.view_delta(self._sent, view)
                if delta:
                    msg["delta"] = delta
        if stats != self._sent_stats:
            msg["stats"] = stats
        if syncs:
            msg["fsync"] = syncs
        if not msg:
            return None
        self._sent, self._sent_stats = view, stats
        return pipe.encode(msg)

    def _send(self) -> None:
        """Finish the frame the pipe took in part, then write the next one with one write. While the pipe
        is still full, changes are dropped (nothing is encoded) and the next frame is the whole view with a
        resync for every client."""
        if self._pending:
            self._pending = self._pending[self._write(self._pending) :]
        if self._pending:
            # Changes wait for the next frame (its delta is against the view of the frame in the pipe): a
            # frame larger than the pipe takes a few turns, and a busy bot must not turn each into a resync.
            if self._tap.count > self.HELD_UPDATES:
                self._tap.take()
                self.resyncs += 0 if self._behind else 1
                self._behind = True
            return
        frame = self._frame()
        if frame is not None:
            self._pending = memoryview(frame)[self._write(frame) :]

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    def _restart(self, code: int) -> bool:
        """Start a new server process, on the same port, after one ended with *code* under the bot; retried
        with a growing delay. False once stop() was called."""
        self.exit_code = code
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        self._fd = -1
        if time.monotonic() - self._started >= self.RESTART_MAX:
            self._delay = self.RESTART_DELAY
        delay, self._delay = self._delay, min(self._delay * 2, self.RESTART_MAX)
        log.error(
            "posstate serve: the server process %d exited with code %s while the bot runs; nothing is served "
            "until a new one starts in %g s",
            self._proc.pid,
            code,
            delay,
        )
        while not self._stopping.wait(delay):
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return False
                    self._proc, self._restarting = spawn.spawn(priority.target_nice(self.NICENESS)), True
                self._handshake(self._init_frame())
                self.restarts += 1
                self._started = time.monotonic()
                log.warning("posstate serve: server process %d serves on port %d again", self._proc.pid, self.port)
                return True
            except ServeError as exc:
                self._kill()
                if self._stopping.is_set():  # stop() killed it mid-start
                    return False
                delay, self._delay = self._delay, min(self._delay * 2, self.RESTART_MAX)
                log.error("posstate serve: starting the server process again failed (%s); next try in %g s", exc, delay)
            finally:
                self._restarting = False
        return False

    # ---------------------------------------------------------------------------------------- stopping
    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            self._fd = -1
        self._stop_observing()
        self.source.close()

    def _kill(self) -> None:
        self._fd = -1
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(STOP_TIMEOUT)
        for f in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()

    def stop(self) -> None:
        """Stop the feeder, end the server process's stdin (it closes every stream and exits), and kill it
        if it has not exited after STOP_TIMEOUT seconds. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        with self._lock:
            if self._restarting:  # a new process mid-start: killing it ends the feeder's handshake at once
                with contextlib.suppress(OSError):
                    self._proc.kill()
        if self._feeder is not threading.current_thread():
            self._feeder.join(timeout=STOP_TIMEOUT)
        self._release()
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):  # stopped (SIGSTOP): let it read the end of its pipe and exit
                self._proc.send_signal(signal.SIGCONT)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("posstate serve: the server process %d did not stop; killing it", self._proc.pid)
        self._kill()

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    target: Any,
    *,
    process: bool = True,
    host: str = "127.0.0.1",
    port: int = 8787,
    token_file: str | Path | None = None,
    token: str | None = None,
    **options: Any,
) -> Any:
    """``manager.serve()`` / ``store.serve()``: from a server process (*process*, the default) or from
    background threads of this process (``process=False``, :func:`posstate.serve.server.serve_state`)."""
    host, port = _options.host(host), _options.port(port)
    if not process or not isinstance(target, (PositionStateManager, AccountStateStore)):
        from posstate.serve.server import serve_state

        return serve_state(target, host=host, port=port, token_file=token_file, token=token, **options)
    if token_file is not None:
        token = read_token(token_file)
    if not is_loopback(host) and token is None:
        raise ServeError(
            f"refusing to listen on {host} without a token: only 127.0.0.1 (this machine) is served openly",
            next_step="pass --token-file FILE (token_file=) or bind 127.0.0.1",
        )
    if token is not None:
        token = check_token(token)
        refuse_the_key_as_token(token, _keyring_of(target), passphrase=os.environ.get("POSSTATE_PASSPHRASE") or None)
    source: Source = StoreSource(target) if isinstance(target, AccountStateStore) else ManagerSource(target)
    return ChildServer(source, host=host, port=port, token=token, **options)
