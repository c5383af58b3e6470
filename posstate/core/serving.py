"""``manager.serve(...)`` and ``store.serve(...)``: the hook through which a lower layer starts the server.

The server (posstate/serve/) sits above the manager and the account store, so they cannot import it. The
package root, which may import every layer, registers the function that starts it (:func:`register`); the
``serve`` method here calls whatever was registered. Nothing here imports a web framework.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class RunningServer(Protocol):
    """What ``serve()`` returns: a server running (in its own process, or in background threads) until
    :meth:`stop`."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...

    def __enter__(self) -> RunningServer: ...

    def __exit__(self, *exc: object) -> None: ...


_factory: Callable[..., RunningServer] | None = None


def register(factory: Callable[..., RunningServer]) -> None:
    global _factory
    _factory = factory


class Servable:
    """Adds :meth:`serve` to the manager and the account store."""

    def _serving_keyring(self) -> object | None:
        """The keyring this object's state is encrypted with, which the server refuses as a bearer token
        (every client would send it in clear); None when it has none. Never leaves the process."""
        return None

    def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8787,
        token_file: str | Path | None = None,
        **options: Any,
    ) -> RunningServer:
        """Serve this object's live state read-only over HTTP and WebSocket (docs/SERVE.md) from a server
        process of its own fed by one thread of this process (``process=False``: from background threads of
        this process); returns once the server listens (``port=0``: any free port, see ``.url``). Needs the
        ``serve`` extra (``pip install posstate[serve]``). Any *host* but a loopback address needs
        *token_file*. Call ``.stop()`` before closing the manager or store."""
        if _factory is None:  # pragma: no cover - the package root registers it on import
            raise RuntimeError("posstate.serve is not registered (import posstate first)")
        return _factory(self, host=host, port=port, token_file=token_file, **options)
