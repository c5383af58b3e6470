"""PersistedAccountStateStore: an AccountStateStore whose positions and metadata live in a PositionStateManager.

Like the Redis example of accountstate's README, but to the crash-safe state file and without its race:

* At start it restores positions and metadata from the manager; the restore goes through
  ``set_all_symbol_metadata`` and does not mark pending persist.
* A persist takes ``(token, copies)`` with ``begin_persist``, applies the differences to the manager with
  its mutators (``set_position``/``delete_position``/``set_symbol_metadata``/``delete_symbol_metadata``),
  makes them durable (``manager.save()`` under ``durability="snapshot"``; under the journal's durabilities
  each mutator is durable on return), then ``finish_persist(token)``: an edit made meanwhile keeps the
  pending flag set, so it is written by the next persist, never lost.
* ``write_through=True`` (the default) persists inside every position or metadata change before it returns,
  so nothing the exchange cannot give back is lost across kill -9. ``write_through=False`` with
  ``persist_interval`` persists from a background thread instead (a window of up to one interval), and
  :meth:`flush` persists on demand. Balances, leverage, orders and price ticks are not persisted: the
  exchange gives them back.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from posstate.account.store import AccountStateStore
from posstate.account.types import is_reserved
from posstate.core.errors import InvalidArgumentError, PosStateError
from posstate.manager.manager import PositionStateManager

log = logging.getLogger("posstate")


class PersistedAccountStateStore(AccountStateStore):
    """An :class:`AccountStateStore` persisted through *manager* (which the caller keeps and closes)."""

    _persist_positions = True

    def __init__(
        self,
        manager: PositionStateManager,
        *,
        write_through: bool = True,
        persist_interval: float | None = None,
        restore: bool = True,
    ) -> None:
        super().__init__()
        if persist_interval is not None and persist_interval <= 0:
            raise InvalidArgumentError(
                f"persist_interval must be > 0 seconds, got {persist_interval}",
                next_step="give a positive number of seconds, or None to persist every change at once",
            )
        self._manager = manager
        self._write_through = write_through
        self._persist_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if restore:
            self.restore()
        if persist_interval is not None:
            self._thread = threading.Thread(
                target=self._run, args=(persist_interval,), name="posstate-account-persist", daemon=True
            )
            self._thread.start()

    @property
    def manager(self) -> PositionStateManager:
        return self._manager

    def __enter__(self) -> PersistedAccountStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restore(self) -> None:
        """Load positions and metadata from the manager into the store (does not mark pending persist)."""
        positions = self._manager.get_positions()
        metadata = {s: d for s, d in self._manager.get_all_symbol_metadata().items() if not is_reserved(s)}
        with self._lock:
            self._restore_positions(positions)
            self.set_all_symbol_metadata(metadata)

    def _after_write(self, persistable: bool) -> None:
        if persistable and self._write_through and not self._closed:
            self.flush()

    def flush(self) -> bool:
        """Persist pending changes now; returns True if something was written.

        Raises the manager's error (e.g. :class:`~posstate.PersistenceError`) if the write fails; the
        changes stay pending and the next flush writes them.
        """
        # Inside the manager's transaction() the write would be undone with it while this store counts it
        # as persisted: refused (TransactionError), like every other writer there.
        with self._manager._lock:  # another thread's transaction is not ours: wait for it to end
            self._manager._check_writable("a flush of the account store (reconcile apply, write-through)")
        with self._persist_lock:
            ticket = self.begin_persist()
            if not ticket.pending:
                return False
            try:
                self._write(ticket.positions, ticket.metadata)
            except Exception as exc:
                self._emit("persistFailed", {"error": f"{type(exc).__name__}: {exc}"})
                raise
            cleared = self.finish_persist(ticket.token)
            self._emit("persisted", {"version": ticket.version, "generation": self._manager.generation, "pending": not cleared})
            return True

    def _write(self, positions: dict[Any, Any], metadata: dict[str, dict[str, Any]]) -> None:
        m = self._manager
        # One transaction: in the journal modes the whole flush is one record, durable all or nothing.
        with m.transaction():
            current = m.get_positions()
            for key in [k for k in current if k not in positions]:
                m.delete_position(key[0], key[1])
            for key, p in positions.items():
                if current.get(key) != p:
                    m.set_position(p)
            stored = m.get_all_symbol_metadata()
            for symbol in [s for s in stored if s not in metadata and not is_reserved(s)]:
                m.delete_symbol_metadata(symbol)
            for symbol, data in metadata.items():
                if stored.get(symbol) != data:
                    m.set_symbol_metadata(symbol, data)
        if m.config.durability == "snapshot":
            m.save()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self.is_pending_persist():
                continue
            try:
                self.flush()
            except PosStateError as exc:
                log.warning("background persist of account state failed (will retry): %s", exc)
            except Exception:  # keep the thread alive; the change stays pending
                log.exception("background persist of account state raised (will retry)")

    def close(self) -> None:
        """Stop the background thread and persist what is pending (errors propagate). Idempotent.
        The manager stays open: it belongs to the caller."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._closed = True
        self.flush()
