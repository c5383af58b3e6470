"""Fan-out of the store's incremental updates to bounded per-subscriber queues.

Policy for a slow subscriber: the writer never blocks and never waits for a reader. When a subscriber's
queue is full at the moment an update is published, that subscriber is dropped: it is detached (it gets
nothing more), the oldest queued update is discarded to make room, and a final ``AccountUpdate("resync",
version, None, None)`` is put last. The consumer that reads ``resync`` (or sees ``queue.dropped``) takes a
fresh :meth:`~posstate.AccountStateStore.snapshot` and subscribes again. Updates before the resync are
still valid, but the stream has a gap, so it must not be used without the fresh snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterable

from posstate.account.types import AccountUpdate
from posstate.core.errors import InvalidArgumentError

log = logging.getLogger("posstate")


class UpdateQueue(queue.Queue[AccountUpdate]):
    """A bounded queue of :class:`AccountUpdate` for one subscriber.

    ``start_version`` is the store version when the queue was attached: every later change arrives in
    order (``version`` strictly increasing), none from before. A consumer that also wants the state takes
    ``store.snapshot()`` after subscribing and skips updates with ``version <= snapshot.version``.
    """

    def __init__(self, maxsize: int, *, start_version: int, feed: UpdateFeed) -> None:
        super().__init__(maxsize=maxsize)
        self.start_version = start_version
        self._feed = feed
        self._dropped = threading.Event()

    @property
    def dropped(self) -> bool:
        """True once the writer dropped this subscriber (a ``resync`` update is its last item)."""
        return self._dropped.is_set()

    def close(self) -> None:
        """Stop receiving updates (what is already queued stays readable)."""
        self._feed.remove(self)


class UpdateFeed:
    """The subscriber list. ``publish`` is called by the one writer (under the store's lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Replaced, never mutated: publish() iterates a tuple no one changes under it.
        self._subscribers: tuple[UpdateQueue, ...] = ()
        self.dropped_count = 0

    def add(self, maxsize: int, *, start_version: int) -> UpdateQueue:
        if maxsize < 2:
            raise InvalidArgumentError(
                f"maxsize must be >= 2 (room for one update and the resync message), got {maxsize}",
                next_step="give subscribe() a maxsize of 2 or more",
            )
        q = UpdateQueue(maxsize, start_version=start_version, feed=self)
        with self._lock:
            self._subscribers = (*self._subscribers, q)
        return q

    def remove(self, q: UpdateQueue) -> bool:
        with self._lock:
            if q not in self._subscribers:
                return False
            self._subscribers = tuple(s for s in self._subscribers if s is not q)
            return True

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def publish(self, updates: Iterable[AccountUpdate]) -> None:
        subs = self._subscribers
        if not subs:
            return
        batch = tuple(updates)
        if not batch:
            return
        for q in subs:
            for update in batch:
                try:
                    q.put_nowait(update)
                except queue.Full:
                    self._drop(q, batch[-1].version)
                    break

    def _drop(self, q: UpdateQueue, version: int) -> None:
        if not self.remove(q):
            return
        q._dropped.set()
        self.dropped_count += 1
        resync = AccountUpdate("resync", version, None, None)
        # Only the consumer takes items out now, so after one discard there is room; loop in case the
        # consumer emptied the queue in between (then the put succeeds at once).
        while True:
            try:
                q.put_nowait(resync)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    q.get_nowait()
        log.warning("account update subscriber fell behind (queue of %s full); dropped it with a resync message", q.maxsize)
