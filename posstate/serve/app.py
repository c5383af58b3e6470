"""The Starlette application: the read-only routes, the guard in front of them, and the status page.

Routes (docs/SERVE.md): ``/`` (status page), ``/api/account/snapshot``, ``/api/account/orders/{id}``,
``/api/positions``, ``/api/health``, ``/api/backups``, ``/metrics``, and the WebSocket
``/api/account/stream``. Only GET (and the WebSocket) exist: nothing here can change the state.

The guard runs before every route and the WebSocket: with a token, ``Authorization: Bearer <token>``
(compared in constant time) or 401; on a loopback address, a ``Host`` header naming the loopback address and
port (a DNS-rebinding page names its own host: 403); a browser's WebSocket ``Origin`` must be this server's
own (a page on another site cannot read the stream: 403).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from posstate.serve import health as _health
from posstate.serve.metrics import CONTENT_TYPE, Metrics
from posstate.serve.shapes import order_json, to_bytes
from posstate.serve.sources import Source
from posstate.serve.stream import StreamOptions, Wakeup, run_stream
from posstate.serve.view import View
from posstate.storage import fileops as fs

STATIC = Path(__file__).resolve().parent / "static"
_PAGE_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(to_bytes(body), status_code=status, media_type="application/json", headers=_HEADERS)


class Guard:
    """ASGI middleware: token, Host and Origin checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str | None, hosts: frozenset[str] | None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None
        self._hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, reason = refusal
        if scope["type"] == "websocket":
            # Before accept: the server answers the handshake with HTTP 403; nothing of the state is sent.
            await send({"type": "websocket.close", "code": 4401 if status == 401 else 4403, "reason": reason})
            return
        extra = {"www-authenticate": 'Bearer realm="posstate"'} if status == 401 else {}
        await _json({"error": reason}, status)(scope, receive, _with_headers(send, extra))

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self._hosts is not None and host not in self._hosts:
            return 403, "unexpected Host header (this server answers to its loopback address only)"
        origin = headers.get(b"origin")
        if scope["type"] == "websocket" and origin is not None and urlsplit(origin.decode("latin-1")).netloc.lower() != host:
            return 403, "cross-origin WebSocket refused"
        if self._token is not None:
            # RFC 9110: the scheme is case-insensitive ("bearer" from some clients); the token is compared
            # in constant time whatever the scheme, so the answer's timing says nothing about it
            scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
            if not hmac.compare_digest(credentials, self._token) or scheme.lower() != b"bearer" or not credentials:
                return 401, "missing or wrong bearer token"
        return None


def _with_headers(send: Send, extra: dict[str, str]) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and extra:
            message = {**message, "headers": [*message.get("headers", []), *((k.encode(), v.encode()) for k, v in extra.items())]}
        await send(message)

    return wrapped  # type: ignore[return-value]


class AppState:
    """What the routes share: the source, the backups cache, the metrics, the stream's wake-up."""

    def __init__(self, source: Source, *, stream: StreamOptions, limits: _health.HealthLimits) -> None:
        self.source = source
        self.stream = stream
        self.limits = limits
        self.backups = _health.BackupCache()
        self.wakeup = Wakeup.for_options(stream)
        self.metrics = Metrics(source, self.health)
        self.pages = {name: fs.read_file(STATIC / name) for name in _PAGE_TYPES}
        self.on_loop: Callable[[Any], None] = lambda _loop: None
        self._bodies: dict[str, tuple[View, bytes]] = {}

    def body(self, name: str, view: View, build: Callable[[View], Any]) -> bytes:
        """``build(view)`` as JSON, serialized once per view (views are immutable): a client hammering a
        route, or reconnecting the stream, costs the bot's process O(state) CPU once per change, not per
        request. (Two threads may both build it once; either result is the same.)"""
        hit = self._bodies.get(name)
        if hit is None or hit[0] is not view:
            hit = (view, to_bytes(build(view)))
            self._bodies[name] = hit
        return hit[1]

    def snapshot_body(self, view: View) -> bytes:
        return self.body("snapshot", view, lambda v: v.snapshot_json())

    def health(self) -> tuple[bool, dict[str, Any]]:
        return _health.report(self.source, self.backups, self.limits, clients=len(self.source.streams()))


def build_app(state: AppState, *, token: str | None, hosts: frozenset[str] | None) -> ASGIApp:
    source = state.source

    def page(name: str) -> Callable[[Request], Response]:
        def endpoint(_request: Request) -> Response:
            return Response(state.pages[name], media_type=_PAGE_TYPES[name], headers=_HEADERS)

        return endpoint

    def snapshot(_request: Request) -> Response:
        return Response(state.snapshot_body(source.view()), media_type="application/json", headers=_HEADERS)

    def positions(_request: Request) -> Response:
        body = state.body("positions", source.view(), lambda v: v.positions_json())
        return Response(body, media_type="application/json", headers=_HEADERS)

    def order(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        view = source.view()
        found = view.orders.get(order_id)
        if found is None:
            return _json({"error": "no open order with this id", "id": order_id, "version": view.version}, 404)
        return _json({"version": view.version, "order": order_json(found)})

    def health(_request: Request) -> Response:
        ok, body = state.health()
        return _json(body, 200 if ok else 503)

    def backups(_request: Request) -> Response:
        return _json({"backups": _health.backups_json(state.backups, source)})

    def metrics(_request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE, headers={"cache-control": "no-store"})

    async def stream(ws: WebSocket) -> None:
        await run_stream(ws, source, state.stream, state.wakeup, snapshot_body=state.snapshot_body)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        import asyncio

        state.on_loop(asyncio.get_running_loop())
        yield

    routes = [
        Route("/", page("index.html")),
        Route("/static/status.js", page("status.js")),
        Route("/static/status.css", page("status.css")),
        Route("/api/account/snapshot", snapshot),
        Route("/api/account/orders/{order_id:str}", order),
        Route("/api/positions", positions),
        Route("/api/health", health),
        Route("/api/backups", backups),
        Route("/metrics", metrics),
        WebSocketRoute("/api/account/stream", stream),
    ]
    return Guard(Starlette(routes=routes, lifespan=lifespan), token=token, hosts=hosts)
