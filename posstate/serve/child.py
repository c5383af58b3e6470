"""The server process of ``manager.serve()`` / ``store.serve()`` (serve/process.py): ``python -m
posstate.serve.child``, fed by the bot's process over its stdin.

The first frame names what to serve and how (kind, config, the first view, host, port, token, options);
this process binds (a :class:`~posstate.serve.server.StateServer` over a :class:`MirrorSource`) and answers
one JSON line on stdout, ``{"port": N}`` or ``{"reason": ..., "message": ...}``, once uvicorn accepts
connections (in a background thread). Then the main thread applies each frame to the mirror (under the
source's lock, so a new stream client sees a view and a place in the log that agree) and wakes the stream
tasks. At the end of stdin (the bot stopped serving, or died) the server stops (streams closed with 1012) and
the process exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from typing import IO, TYPE_CHECKING, Any

from posstate.core.errors import ServeError
from posstate.serve import pipe
from posstate.serve.sources import Source

if TYPE_CHECKING:
    from posstate.serve.server import StateServer

log = logging.getLogger("posstate")
#: The counters the bot's process owns (the stream's own ones are counted here).
_BOT_STATS = ("saves", "updates", "compactions", "backups", "recoveries", "last_save")


class MirrorSource(Source):
    """The bot's view, as the frames from the bot's process build it (nothing is read here: :meth:`poll`
    does nothing)."""

    def __init__(self, init: dict[str, Any]) -> None:
        super().__init__(init["config"])
        self.kind = init["kind"]
        self._view = init["view"]
        self.fanout.reset_orders(init["orders"])
        self._stats(init["stats"])

    def _stats(self, stats: dict[str, Any]) -> None:
        for name in _BOT_STATS:
            setattr(self.stats, name, stats[name])
        self.problem = stats["problem"]
        self.ready = stats["ready"]

    def apply(self, msg: dict[str, Any]) -> None:
        """One frame: the updates into the stream's log, the view's delta, the counters, the fsync times."""
        with self._lock:
            if "reset" in msg:  # frames were dropped: every client starts again from this view
                view, orders = msg["reset"]
                self._view = view
                self.fanout.reset_orders(orders)
                self.fanout.resync_all(view.version)
            for op, arg in msg.get("ops", ()):
                if op == "publish":
                    self.fanout.publish(arg)
                elif op == "reset_orders":
                    self.fanout.reset_orders(arg)
                elif op == "resync_all":
                    self.fanout.resync_all(arg)
            if "delta" in msg:
                self._view = pipe.apply_delta(self._view, msg["delta"])
        if "stats" in msg:
            self._stats(msg["stats"])


def _reply(out: IO[bytes], body: dict[str, Any]) -> None:
    out.write(json.dumps(body).encode() + b"\n")
    out.flush()


def _read(stdin: IO[bytes], source: MirrorSource, server: StateServer) -> int:
    """Apply frames until the pipe ends (0), or until one cannot be applied (3): the mirror no longer follows
    the bot's view and later deltas would build on it, so this process ends and the bot's feeder starts a
    new one from the whole view (every client is sent resync meanwhile)."""
    try:
        while (msg := pipe.read_frame(stdin)) is not None:
            try:
                source.apply(msg)
            except Exception:
                log.exception("posstate serve: applying a frame from the bot failed; exiting for a fresh start")
                source.fanout.resync_all(source.view().version)
                return 3
            for seconds in msg.get("fsync", ()):
                server.observe_fsync(seconds)
            server.wake()
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):  # a broken pipe or a torn frame: the bot's process is gone
        log.warning("posstate serve: the pipe from the bot broke; stopping")
    return 0


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:  # the web stack first: without it, the answer names the extra to install (not a traceback)
        from posstate.serve.health import HealthLimits
        from posstate.serve.server import StateServer
        from posstate.serve.stream import StreamOptions
    except ImportError as exc:
        reason = f"the serve extra is not installed ({exc.name} is missing)"
        _reply(stdout, {"reason": reason, "message": f"{reason}; pip install 'posstate[serve]'"})
        return 2
    init = pipe.read_frame(stdin)
    if init is None:
        return 0
    source = MirrorSource(init)
    options: dict[str, Any] = dict(init["options"])
    try:
        server = StateServer(
            source,
            host=init["host"],
            port=init["port"],
            token=init["token"],
            poll_interval=1.0,  # the reader wakes the streams at each frame; the poll thread has nothing to read
            stream=options.get("stream") or StreamOptions(),
            limits=options.get("limits") or HealthLimits(),
            **{k: v for k, v in options.items() if k not in ("stream", "limits")},
        ).start()
    except ServeError as exc:
        _reply(stdout, {"reason": exc.reason, "message": str(exc)})
        return 2
    except (TypeError, ValueError) as exc:  # an option serve() does not know
        _reply(stdout, {"reason": str(exc), "message": f"{exc}; check the options given to serve()"})
        return 2
    del init  # the token stays only in the guard
    _reply(stdout, {"port": server.port})
    os.dup2(2, 1)  # anything printed later goes to stderr, never into the pipe the bot stopped reading
    try:
        return _read(stdin, source, server)  # until the bot's process stops serving or is gone
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
