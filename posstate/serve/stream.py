"""``/api/account/stream``: one WebSocket client.

On connect the client gets ``{"topic": "snapshot", ...}``, then one message per change (``position.update``,
``order.update``, ``order.fill``, ``order.closed``, ``balance.update``, ``metadata.update``,
``leverage.update``), each with the ``version`` it made. A filter narrows them: ``?topics=a,b&symbols=X,Y`` on
the URL, or a message ``{"type": "subscribe", "topics": [...], "symbols": [...]}`` at any time (answered with
``{"topic": "subscribed", ...}``). Heartbeats go both ways: the server sends ``{"topic": "heartbeat"}`` every
``heartbeat_interval`` seconds; a client that sends nothing (any message counts, ``{"type": "heartbeat"}`` is
the usual one) for ``client_timeout`` seconds is closed with code 4408. Messages are JSON text: a binary message
is answered with ``{"topic": "error"}`` and closed with code 1003.

Backpressure is the account feed's policy: each client has a bounded queue the writer never waits for; when
it is full the writer drops the client and queues ``resync`` last; the client is sent ``{"topic": "resync"}``
and closed with code 4409 (reconnect for a fresh snapshot). A client that does not read its socket for
``send_timeout`` seconds is closed the same way without the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from posstate.account.types import AccountUpdate, Order
from posstate.serve import options as _options
from posstate.serve.shapes import to_bytes
from posstate.serve.sources import Source
from posstate.serve.view import View, messages, symbol_of

CLOSE_HEARTBEAT = 4408
CLOSE_RESYNC = 4409
CLOSE_UNSUPPORTED = 1003  # RFC 6455: a data type the endpoint cannot accept (a binary message)
_ALWAYS = frozenset({"resync", "heartbeat", "snapshot", "subscribed", "error"})


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOptions:
    queue_size: int = 256
    heartbeat_interval: float = 15.0
    client_timeout: float = 45.0
    send_timeout: float = 10.0

    def __post_init__(self) -> None:
        _options.count("queue_size", self.queue_size)
        for name in ("heartbeat_interval", "client_timeout", "send_timeout"):
            _options.seconds(name, getattr(self, name))


class Wakeup:
    """Wakes every stream task when the poll thread saw a change (set from the loop's thread only)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> None:
        event = self._event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(timeout, 0.0))


@dataclass
class _Filter:
    topics: frozenset[str] | None = None
    symbols: frozenset[str] | None = None

    def passes(self, message: dict[str, Any]) -> bool:
        topic = message["topic"]
        if topic in _ALWAYS:
            return True
        if self.topics is not None and topic not in self.topics:
            return False
        symbol = symbol_of(message)
        return self.symbols is None or symbol is None or symbol in self.symbols


def _names(value: Any) -> frozenset[str] | None:
    """A filter list from a query value (``a,b``) or a JSON list; None or empty: no filter."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("topics and symbols must be lists of strings")
    names = frozenset(i.strip() for i in items if i.strip())
    return names or None


class _Client:
    def __init__(self, ws: WebSocket, source: Source, options: StreamOptions, wakeup: Wakeup) -> None:
        self.ws = ws
        self.source = source
        self.options = options
        self.wakeup = wakeup
        self.filter = _Filter()
        self.heard = time.monotonic()
        self.gone = False
        #: The close code the reader decided on (None: the client went away, or nothing to say).
        self.close_code: int | None = None
        self.orders: dict[str, Order] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if self.filter.passes(message):
            await asyncio.wait_for(self.ws.send_text(to_bytes(message).decode("utf-8")), self.options.send_timeout)

    async def receive(self) -> None:
        """Read the client's messages: any message is a heartbeat; ``subscribe`` sets the filter; a binary
        message is answered with ``error`` and the close code 1003 (text JSON only)."""
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                self.heard = time.monotonic()
                self.wakeup.notify()
                text = message.get("text")
                if text is None:
                    await self.send({"topic": "error", "reason": "binary messages are not accepted: send JSON text"})
                    self.close_code = CLOSE_UNSUPPORTED
                    break
                try:
                    msg = orjson.loads(text)
                    if not isinstance(msg, dict):
                        raise ValueError("expected a JSON object")
                    if msg.get("type") in ("subscribe", "filter"):
                        self.filter = _Filter(_names(msg.get("topics")), _names(msg.get("symbols")))
                        await self.send({"topic": "subscribed", **self._filter_json()})
                except (ValueError, orjson.JSONDecodeError) as exc:
                    await self.send({"topic": "error", "reason": str(exc)[:200]})
        except (WebSocketDisconnect, RuntimeError, asyncio.TimeoutError):
            pass
        finally:
            self.gone = True
            self.wakeup.notify()

    def _filter_json(self) -> dict[str, Any]:
        f = self.filter
        return {"topics": sorted(f.topics) if f.topics else None, "symbols": sorted(f.symbols) if f.symbols else None}

    async def pump(self, q: queue.Queue[AccountUpdate], start: int) -> int | None:
        """Send what is queued and the heartbeats until the client goes; returns the close code to send."""
        opts = self.options
        beat = time.monotonic()
        while not self.gone:
            while True:
                try:
                    update = q.get_nowait()
                except queue.Empty:
                    break
                if update.kind == "resync":
                    await self.send({"topic": "resync", "version": update.version, "reason": "fell behind; reconnect"})
                    return CLOSE_RESYNC
                if update.version <= start:
                    continue  # already in the snapshot
                for message in messages(update, self.orders):
                    await self.send(message)
            now = time.monotonic()
            if now - self.heard > opts.client_timeout:
                self.source.stats.heartbeat_timeouts += 1
                return CLOSE_HEARTBEAT
            if now - beat >= opts.heartbeat_interval:
                beat = now
                await self.send({"topic": "heartbeat", "version": self.source.view().version, "time": time.time()})
            await self.wakeup.wait(min(opts.heartbeat_interval - (now - beat), opts.client_timeout - (now - self.heard)))
        return self.close_code


async def run_stream(
    ws: WebSocket,
    source: Source,
    options: StreamOptions,
    wakeup: Wakeup,
    *,
    snapshot_body: Callable[[View], bytes] | None = None,
) -> None:
    """Serve one accepted-to-be WebSocket until it closes, falls behind or stops sending heartbeats.
    *snapshot_body*: the view's snapshot JSON (``GET /api/account/snapshot``), serialized once per view, sent
    as the first message when no symbol filter cuts it."""
    client = _Client(ws, source, options, wakeup)
    try:
        client.filter = _Filter(_names(ws.query_params.get("topics")), _names(ws.query_params.get("symbols")))
    except ValueError:
        client.filter = _Filter()
    await ws.accept()
    q, view = source.open_stream(options.queue_size)
    client.orders = dict(view.orders)
    reader = asyncio.ensure_future(client.receive())
    code: int | None = None
    try:
        if snapshot_body is not None and client.filter.symbols is None:
            text = '{"topic":"snapshot",' + snapshot_body(view).decode("utf-8")[1:]
            await asyncio.wait_for(ws.send_text(text), options.send_timeout)
        else:
            await client.send({"topic": "snapshot", **view.snapshot_json(symbols=client.filter.symbols)})
        code = await client.pump(q, view.version)
    except asyncio.TimeoutError:  # the client stopped reading: dropped like a full queue, without the message
        source.stats.send_timeouts += 1
        code = CLOSE_RESYNC
    except (WebSocketDisconnect, RuntimeError, OSError):
        code = None
    finally:
        source.close_stream(q)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        if code is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=code), options.send_timeout)
