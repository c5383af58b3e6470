"""``/api/account/stream``: one WebSocket client.

On connect the client gets ``{"topic": "snapshot", ...}``, then the changes (``position.update``,
``order.update``, ``order.fill``, ``order.closed``, ``balance.update``, ``metadata.update``,
``leverage.update``), each with the ``version`` it made, in ``{"topic": "batch", "version": v, "messages":
[...]}`` messages: one per poll of the source, holding that poll's changes in order (encoded once for every
client, serve/fanout.py). A filter narrows them (a batch it empties is not sent): ``?topics=a,b&symbols=X,Y`` on
the URL, or a message ``{"type": "subscribe", "topics": [...], "symbols": [...]}`` at any time (answered with
``{"topic": "subscribed", ...}``). Heartbeats go both ways: the server sends ``{"topic": "heartbeat"}`` every
``heartbeat_interval`` seconds; a client that sends nothing (any message counts, ``{"type": "heartbeat"}`` is
the usual one) for ``client_timeout`` seconds is closed with code 4408. Messages are JSON text: a binary message
is answered with ``{"topic": "error"}`` and closed with code 1003.

Backpressure is the account feed's policy: each client may fall ``queue_size`` updates behind, and the writer
never waits for it; past that the poll thread drops it; the client is sent ``{"topic": "resync"}`` and closed
with code 4409 (reconnect for a fresh snapshot). A client that does not read its socket for
``send_timeout`` seconds is closed the same way without the message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from posstate.serve import options as _options
from posstate.serve.fanout import Batch, Subscription, batch_text
from posstate.serve.shapes import to_bytes
from posstate.serve.sources import Source
from posstate.serve.view import View, symbol_of

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
    """Wakes every stream task when the poll thread saw a change, and every *tick* seconds for the heartbeats
    and timeouts (used from the loop's thread only).

    Each task waits on a future of its own (no task and no timer per client per wake-up, as ``wait_for``
    made). The tasks are woken SLICE at a time with GAP seconds between two slices: the server runs in the
    bot's process, and while the loop's thread sends to every client in one go the bot's thread, back from a
    system call (an fsync), waits for the interpreter lock behind it; in the pause the loop's thread blocks
    in its selector, so a waiting bot thread gets the lock after at most one slice."""

    #: Tasks woken (so clients sent to) between two pauses.
    SLICE = 4
    #: The pause between two slices, in seconds (the selector's resolution is a millisecond).
    GAP = 0.001

    def __init__(self, tick: float = 1.0) -> None:
        self.tick = tick
        self._waiters: list[asyncio.Future[None]] = []
        self._waking: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._slicing = False

    @classmethod
    def for_options(cls, options: StreamOptions) -> Wakeup:
        """Ticks often enough that a heartbeat or a timeout is at most a quarter of its period late."""
        return cls(min(1.0, options.heartbeat_interval / 4, options.client_timeout / 4, options.send_timeout / 4))

    def notify(self) -> None:
        """Wake every task waiting now (a slice now, the others after pauses)."""
        self._waking.extend(self._waiters)
        self._waiters = []
        if not self._slicing:
            self._slice()

    def _slice(self) -> None:
        woken = 0
        while self._waking and woken < self.SLICE:
            future = self._waking.popleft()
            if not future.done():
                future.set_result(None)
                woken += 1
        self._slicing = bool(self._waking)
        if self._slicing:
            # after the woken tasks ran (they were scheduled first), then a real pause
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_later, self.GAP, self._slice)

    def _on_tick(self) -> None:
        self._timer = None
        self.notify()

    async def wait(self) -> None:
        """Until the next change or tick."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiters.append(future)
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._on_tick)
        await future


if sys.version_info >= (3, 11):

    async def _within(seconds: float, coro: Awaitable[None]) -> None:
        async with asyncio.timeout(seconds):  # no task per call (wait_for makes one before 3.12)
            await coro

else:  # pragma: no cover - Python 3.10

    async def _within(seconds: float, coro: Awaitable[None]) -> None:
        await asyncio.wait_for(coro, seconds)


@dataclass
class _Filter:
    topics: frozenset[str] | None = None
    symbols: frozenset[str] | None = None

    def passes(self, message: dict[str, Any]) -> bool:
        return self.passes_topic(message["topic"], symbol_of(message))

    def passes_topic(self, topic: str, symbol: str | None) -> bool:
        if topic in _ALWAYS:
            return True
        if self.topics is not None and topic not in self.topics:
            return False
        return self.symbols is None or symbol is None or symbol in self.symbols

    @property
    def everything(self) -> bool:
        return self.topics is None and self.symbols is None


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

    async def send(self, message: dict[str, Any]) -> None:
        if self.filter.passes(message):
            await self.send_text(to_bytes(message).decode("utf-8"))

    async def send_text(self, text: str) -> None:
        await _within(self.options.send_timeout, self.ws.send_text(text))

    def batch(self, batch: Batch, start: int) -> str | None:
        """*batch* as this client sees it: the shared text when nothing is left out, else the items that
        pass its filter and are newer than its snapshot (*start*); None when none is left."""
        f = self.filter
        if not batch.items:
            return None
        if batch.items[0][0] > start and f.everything:
            return batch.text
        parts = [data for version, topic, symbol, data in batch.items if version > start and f.passes_topic(topic, symbol)]
        if len(parts) == len(batch.items):
            return batch.text
        return batch_text(batch.version, parts) if parts else None

    async def receive(self) -> None:
        """Read the client's messages: any message is a heartbeat; ``subscribe`` sets the filter; a binary
        message is answered with ``error`` and the close code 1003 (text JSON only)."""
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                self.heard = time.monotonic()  # the pump checks it at its next wake-up
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

    async def pump(self, sub: Subscription, start: int) -> int | None:
        """Send the batches not sent yet and the heartbeats until the client goes; returns the close code to send."""
        opts = self.options
        fanout = self.source.fanout
        beat = time.monotonic()
        while not self.gone:
            batches = fanout.read(sub)
            while batches and sub.resync is None:  # read again after sending: more may have come meanwhile
                for batch in batches:
                    if sub.resync is not None:
                        break
                    if batch.version > start:
                        text = self.batch(batch, start)
                        if text is not None:
                            await self.send_text(text)
                    sub.seq = batch.end
                batches = fanout.read(sub)
            if sub.resync is not None:
                await self.send({"topic": "resync", "version": sub.resync, "reason": "fell behind; reconnect"})
                return CLOSE_RESYNC
            now = time.monotonic()
            if now - self.heard > opts.client_timeout:
                self.source.stats.heartbeat_timeouts += 1
                return CLOSE_HEARTBEAT
            if now - beat >= opts.heartbeat_interval:
                beat = now
                await self.send({"topic": "heartbeat", "version": self.source.view().version, "time": time.time()})
            await self.wakeup.wait()
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
    sub, view = source.open_stream(options.queue_size)
    reader = asyncio.ensure_future(client.receive())
    code: int | None = None
    try:
        if snapshot_body is not None and client.filter.symbols is None:
            text = '{"topic":"snapshot",' + snapshot_body(view).decode("utf-8")[1:]
            await asyncio.wait_for(ws.send_text(text), options.send_timeout)
        else:
            await client.send({"topic": "snapshot", **view.snapshot_json(symbols=client.filter.symbols)})
        code = await client.pump(sub, view.version)
    except asyncio.TimeoutError:  # the client stopped reading: dropped like a full queue, without the message
        if sub.resync is None:  # else the poll thread dropped it already, and counted it
            source.stats.send_timeouts += 1
        code = CLOSE_RESYNC
    except (WebSocketDisconnect, RuntimeError, OSError):
        code = None
    finally:
        source.close_stream(sub)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        if code is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=code), options.send_timeout)
