"""Run the server: uvicorn in a background thread (``manager.serve()``, ``store.serve()``, tests) or in the
caller's thread (``posstate serve``), plus the poll thread that reads the source.

Safe by default: a loopback address needs no token (and answers only to a loopback ``Host``); any other
address needs a token file, whose token every route and the WebSocket then require. The token is never
logged, echoed or put in a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from posstate.account.store import AccountStateStore
from posstate.core.config import StateConfig
from posstate.core.errors import ServeError
from posstate.manager.manager import PositionStateManager
from posstate.serve import options as _options
from posstate.serve.app import AppState, build_app
from posstate.serve.health import HealthLimits
from posstate.serve.sources import DirectorySource, ManagerSource, Source, StoreSource
from posstate.serve.stream import StreamOptions
from posstate.serve.tokens import MIN_TOKEN_CHARS as MIN_TOKEN_CHARS  # the names tests and the CLI import from here
from posstate.serve.tokens import _keyring_of
from posstate.serve.tokens import check_token as check_token
from posstate.serve.tokens import is_loopback as is_loopback
from posstate.serve.tokens import loopback_hosts as loopback_hosts
from posstate.serve.tokens import read_token as read_token
from posstate.serve.tokens import refuse_the_key_as_token as refuse_the_key_as_token
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

log = logging.getLogger("posstate")
DEFAULT_PORT = 8787
#: Open connections (HTTP and WebSocket) past which a new one is closed at once: the server runs in the bot's
#: process, and its file descriptors are the bot's (a local process opening thousands of idle connections
#: made the bot's saves fail with EMFILE).
DEFAULT_MAX_CONNECTIONS = 128
#: Seconds a new connection may stay silent before its first request (then uvicorn's keep-alive timeout).
IDLE_TIMEOUT = 5.0


def _capped_http(stats: Any, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 HTTP protocol, closing a connection at once past *max_connections* (counted in
    ``stats.connections_refused``) and closing one that sends nothing for IDLE_TIMEOUT seconds.

    h11, not httptools (uvicorn's choice when installed): h11 refuses a request head over 16 KiB with 400,
    httptools buffers an endless header line without limit (one client could grow the bot's memory by
    every byte it sent). Only the handshake of a stream is parsed here, so its speed does not matter."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    base: Any = H11Protocol

    class CappedHTTP(base):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                stats.connections_refused += 1
                transport.abort()  # frees the descriptor now; nothing was read or sent
                return
            # the timer uvicorn arms after each response, armed for the first request too (any byte
            # received cancels it, as it does between requests)
            self.timeout_keep_alive_task = self.loop.call_later(IDLE_TIMEOUT, self.timeout_keep_alive_handler)

    return CappedHTTP


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT and SIGTERM only ask it to stop: uvicorn raises the signal again
    once it stopped, which killed ``posstate serve`` (SIGTERM) before its own clean-up, or made Ctrl-C an error."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _close_in_child(ref: weakref.ref[StateServer]) -> None:
    """In a forked child: close the child's copy of a running server's listening socket. The event loop holds
    a reference on the socket object (its close() only marks it), so the descriptor is closed here, once
    checked to be that socket still (same inode), and detached so the child never closes its number again."""
    server = ref()
    if server is None:
        return
    fd = server._sock.fileno()
    with contextlib.suppress(OSError):
        if fd >= 0 and fs.fstat(fd).st_ino == server._sock_inode:
            server._sock.detach()
            socket.close(fd)
    # and its copies of the open connections (else a connection the parent closes never ends for the client)
    for conn in list(server._server.server_state.connections):
        transport: Any = getattr(conn, "transport", None)
        with contextlib.suppress(Exception):  # a connection closed meanwhile, or no transport yet
            ends = (transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
            fd = transport.get_extra_info("socket").fileno()
            probe = socket.socket(fileno=fd)  # takes no ownership until checked: detached below
            try:
                same = (probe.getsockname(), probe.getpeername()) == ends
            finally:
                probe.detach()
            if same:
                socket.close(fd)


class StateServer:
    """A running read-only server over one source (see docs/SERVE.md). Use as a context manager or call
    :meth:`stop`; ``url`` is known once the constructor returns (the socket is bound there)."""

    def __init__(
        self,
        source: Source,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        token: str | None = None,
        poll_interval: float = 0.05,
        stream: StreamOptions | None = None,
        limits: HealthLimits | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        host, port = _options.host(host), _options.port(port)
        loopback = is_loopback(host)
        if not loopback and token is None:
            raise ServeError(
                f"refusing to listen on {host} without a token: only 127.0.0.1 (this machine) is served openly",
                next_step="pass --token-file FILE (token_file=) or bind 127.0.0.1",
            )
        if token is not None:
            token = check_token(token)
        poll_interval = _options.seconds("poll_interval", poll_interval)
        max_connections = _options.count("max_connections", max_connections)
        self.source = source
        self._poll_interval = poll_interval
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror})", next_step="choose another --port") from None
        self._sock = sock
        self._sock_inode = fs.fstat(sock.fileno()).st_ino
        # A child forked while this serves (a bot's worker) would keep the listening socket: after stop()
        # the port stays taken and new clients hang in its backlog. The child closes its copies
        # (:func:`_close_in_child`).
        os.register_at_fork(after_in_child=functools.partial(_close_in_child, weakref.ref(self)))
        self.host, self.port = host, sock.getsockname()[1]
        hosts = loopback_hosts(host, self.port) if loopback else None
        self._state = AppState(source, stream=stream or StreamOptions(), limits=limits or HealthLimits())
        self._state.on_loop = self._set_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        app = build_app(self._state, token=token, hosts=hosts)
        config = uvicorn.Config(
            app,
            http=_capped_http(source.stats, max_connections),
            # the library never configures logging: no uvicorn dictConfig, no level set (the bot's own setup decides)
            log_config=None,
            log_level=None,
            access_log=False,
            lifespan="on",
            # websockets-sansio waits for the socket to drain before each send (write flow control since
            # uvicorn 0.52.1): a client that stops reading blocks its own stream task, never the bot.
            ws="websockets-sansio",
            ws_max_size=64 * 1024,
            # no permessage-deflate: it compresses every message once per client, in the bot's process
            ws_per_message_deflate=False,
            # stop() (and SIGTERM) never waits forever for a stream task: they are cancelled after this
            timeout_graceful_shutdown=5,
            server_header=False,
            proxy_headers=False,
        )
        self._server = _Server(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller = threading.Thread(target=self._poll_loop, name="posstate-serve-poll", daemon=True)
        self._stopped = False
        self._start_failed = False
        source.poll()  # the first view before anyone connects
        self._poller.start()

    @property
    def url(self) -> str:
        shown = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def _set_loop(self, loop: Any) -> None:
        self._loop = loop

    def wake(self) -> None:
        """Wake the stream tasks now (the source changed outside the poll thread: serve/child.py)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed (stopping)
                loop.call_soon_threadsafe(self._state.wakeup.notify)

    def observe_fsync(self, seconds: float) -> None:
        """Count a sync the bot made in its own process in /metrics' fsync histogram (serve/child.py)."""
        self._state.metrics.fsync.observe(seconds)

    def _poll_loop(self) -> None:
        last = self.source.view().version
        while not self._stop.wait(self._poll_interval):
            try:
                self.source.poll()
            except Exception:  # the poll thread must outlive any one bad read
                log.exception("posstate serve: reading the state failed")
                continue
            version = self.source.view().version
            loop = self._loop
            if version != last and loop is not None:
                last = version
                with contextlib.suppress(RuntimeError):  # the loop closed (stopping)
                    loop.call_soon_threadsafe(self._state.wakeup.notify)

    # ---------------------------------------------------------------------------------------- running
    def start(self) -> StateServer:
        """Run uvicorn in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self._run, name="posstate-serve", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                self._start_failed = True
                self._raise_if_start_failed()
            self._thread.join(0.01)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except SystemExit:  # uvicorn's way to report a failed startup (its log says why)
            self._start_failed = True

    def _raise_if_start_failed(self) -> None:
        if self._start_failed:
            self.stop()  # the socket, the poll thread and the source's hooks on the bot's objects
            raise ServeError("the server stopped while starting", next_step="see the log for the cause")

    def serve_forever(self) -> None:
        """Run in this thread until Ctrl-C or SIGTERM (uvicorn handles both here), then stop."""
        try:
            self._run()
            self._raise_if_start_failed()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving: close every stream, stop the poll thread, stop listening. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._stop.set()
        if self._poller.is_alive() and self._poller is not threading.current_thread():
            self._poller.join(timeout=10)
        self._sock.close()
        self._state.metrics.close()
        self.source.close()

    def __enter__(self) -> StateServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def source_for(target: Any, *, read: _statefile.ReadOptions | None = None) -> Source:
    """The source of a manager, an account store (persisted or not) or a StateConfig (read from disk)."""
    if isinstance(target, AccountStateStore):
        return StoreSource(target)
    if isinstance(target, PositionStateManager):
        return ManagerSource(target)
    if isinstance(target, StateConfig):
        options = read or _statefile.ReadOptions(
            # the environment's key (POSSTATE_KEY, POSSTATE_KEY_FILE, POSSTATE_PASSPHRASE), as a manager of this
            # config would find it; None: health says the key is missing
            keyring=Keyring.resolve(),
            max_document_bytes=target.max_document_bytes,
            clock_skew=target.clock_skew,
        )
        return DirectorySource(target, options)
    raise TypeError(f"cannot serve a {type(target).__name__}: give a PositionStateManager, an AccountStateStore or a StateConfig")


def serve_state(
    target: Any,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token_file: str | Path | None = None,
    token: str | None = None,
    **options: Any,
) -> StateServer:
    """Start serving *target* read-only from background threads and return the running :class:`StateServer`
    (``manager.serve()`` and ``store.serve()`` call this). *options*: ``poll_interval``, ``stream``
    (:class:`StreamOptions`), ``limits`` (:class:`HealthLimits`), ``read`` (read options for a StateConfig)."""
    if token_file is not None:
        token = read_token(token_file)
    read = options.pop("read", None)
    passphrase = os.environ.get("POSSTATE_PASSPHRASE") or None
    if token is not None:  # before the source subscribes to the manager or store
        refuse_the_key_as_token(token, _keyring_of(target), passphrase=passphrase)
    source = source_for(target, read=read)
    if token is not None and source.backup_read is not None:  # a directory: the key it reads with
        refuse_the_key_as_token(token, source.backup_read.keyring, passphrase=passphrase)
    return StateServer(source, host=host, port=port, token=token, **options).start()
