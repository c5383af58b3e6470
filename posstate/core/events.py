"""Events: the reference design's names, synchronous handlers, and the optional stats logger.

A handler that raises never breaks the operation that emitted the event: the exception is logged and
reported as an ``error`` event (once; an ``error`` handler that raises is only logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from posstate.core.errors import InvalidArgumentError

log = logging.getLogger("posstate")

EVENTS: frozenset[str] = frozenset(
    {
        "stateSaved",
        "stateLoaded",
        "stateValidated",
        "stateCorrupted",
        "stateRepaired",
        "backupCreated",
        "backupRestored",
        "backupPruned",
        "backupFailed",
        "error",
        "validationError",
        "persistenceError",
        "recoveryError",
        "outcomeUnknown",
        "replicaLagging",
        "replicaResumed",
        "replicaReseeded",
        "replicaRestored",
        "replicaClosed",
        "leaseLost",
    }
)

Handler = Callable[[dict[str, Any]], object]


class StatsLogger(Protocol):
    def log_stats(self, stats: dict[str, Any]) -> object: ...


class EventBus:
    def __init__(self, stats_logger: StatsLogger | None = None) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._lock = threading.Lock()
        self._stats = stats_logger

    def on(self, event: str, handler: Handler) -> None:
        if event not in EVENTS:
            raise InvalidArgumentError(f"unknown event {event!r}", next_step=f"use one of: {', '.join(sorted(EVENTS))}")
        with self._lock:
            self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Handler | None = None) -> None:
        """Remove *handler* from *event*, or every handler of *event* when *handler* is None."""
        with self._lock:
            if handler is None:
                self._handlers.pop(event, None)
                return
            handlers = self._handlers.get(event, [])
            if handler in handlers:
                handlers.remove(handler)

    def emit(self, event: str, payload: Mapping[str, Any]) -> None:
        data = {"event": event, **payload}
        with self._lock:
            handlers = list(self._handlers.get(event, ()))
        log.debug("event %s %s", event, data)
        for handler in handlers:
            try:
                handler(dict(data))
            except Exception as exc:  # a handler must never break a save
                log.exception("handler for %s raised", event)
                if event != "error":
                    self.emit("error", {"context": f"handler:{event}", "error": f"{type(exc).__name__}: {exc}"})
        if self._stats is not None:
            try:
                self._stats.log_stats(
                    {"type": "STATE_MANAGEMENT", "event": event, "timestamp": int(time.time() * 1000), **payload}
                )
            except Exception:
                log.exception("stats_logger.log_stats raised for %s", event)
