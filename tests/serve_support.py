"""Helpers for the serve tests: the optional dependencies (a skip here, a failure under POSSTATE_CI=1), a real
server on a free 127.0.0.1 port, and a WebSocket client that reads until a condition holds."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest

from posstate import Position

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client", "httpx", "websockets")


def require(*modules: str) -> None:
    """Skip (with the reason) when a module of the ``serve``/``test`` extras is missing; under POSSTATE_CI=1
    (CI installs ``.[dev]``) a missing module is an error instead, never a silent skip."""
    for name in modules:
        if os.environ.get("POSSTATE_CI") == "1":
            importlib.import_module(name)
        else:
            pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[dev]'); CI fails here instead")


def pos(symbol: str, contracts: int | str = 1, side: str = "long", entry: str = "100") -> Position:
    return Position(symbol=symbol, side=side, contracts=Decimal(str(contracts)), entry_price=Decimal(entry))  # type: ignore[arg-type]


@contextmanager
def serving(target: Any, *, process: bool = False, **options: Any) -> Iterator[Any]:
    """A real uvicorn server on a free 127.0.0.1 port for *target*, stopped at the end: in threads of this
    process (``server.source`` is the one the server reads), or with *process* in a server process of its own
    (what ``manager.serve()``/``store.serve()`` start by default)."""
    from posstate.serve.process import serve

    options.setdefault("poll_interval", 0.01)
    server = serve(target, process=process, host=options.pop("host", "127.0.0.1"), port=0, **options)
    try:
        yield server
    finally:
        server.stop()


def ws_url(server: Any, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/api/account/stream" + (f"?{query}" if query else "")


async def read_until(ws: Any, done: Callable[[list[dict[str, Any]]], bool], *, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Messages received (heartbeats left out, the messages of each ``batch`` taken out of it) until
    ``done(messages)`` holds; fails after *timeout* seconds without it (a hang guard, not a timing assertion)."""
    got: list[dict[str, Any]] = []

    async def loop() -> None:
        while not done(got):
            msg = json.loads(await ws.recv())
            if msg["topic"] == "batch":
                got.extend(msg["messages"])
            elif msg["topic"] != "heartbeat":
                got.append(msg)

    await asyncio.wait_for(loop(), timeout)
    return got


def run(coro: Any) -> Any:
    return asyncio.run(coro)
