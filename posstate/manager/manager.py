"""PositionStateManager: crash-safe, encrypted, backed-up position state for one bot.

The class is assembled from one module per concern (see posstate/manager/base.py for the chain):
lifecycle and events (base), loading (loading), the durable commit path (commit), the state in memory and its
changes (changes), backups/recovery/validation (admin), the asyncio writers (aio).
"""

from __future__ import annotations

from posstate.core.serving import Servable
from posstate.manager.aio import AsyncChanges
from posstate.model.document import StateData


class PositionStateManager(AsyncChanges, Servable):
    """Crash-safe, encrypted, backed-up position state for one bot.

    Creating a manager takes the state directory's writer lock (a second writer gets
    :class:`~posstate.StateLockedError`) and sets aside temp files a crash left behind. The state is read on
    first use. Every save is atomic and durable when it returns; a failed save leaves the previous file
    intact and the in-memory state unchanged. All methods are thread-safe.
    """

    def _serving_keyring(self) -> object | None:
        return self._keyring

    def state_copy(self) -> StateData | None:
        """A private copy of the state in memory, or None before the first load (this never loads it).
        Holds the manager's lock only to copy the maps; for readers in other threads (``serve()``)."""
        with self._lock:
            return self._state.copy() if self._loaded and not self._closed else None

    @property
    def change_mark(self) -> int:
        """The state's change mark (moved by every change in memory), read without the lock."""
        return self._change_mark

    def state_copy_since(self, seen: int | None) -> tuple[int, StateData | None]:
        """``(mark, copy)``: the state's change mark and a private copy of the state, the copy None when the
        mark is still *seen* (nothing changed since that copy: no O(state) work under the lock) or before the
        first load. For a reader polling from another thread (``serve()`` with ``durability="snapshot"``,
        where neither the generation nor ``dirty`` moves with each change)."""
        with self._lock:
            mark = self._change_mark
            if mark == seen or not self._loaded or self._closed:
                return mark, None
            return mark, self._state.copy()
