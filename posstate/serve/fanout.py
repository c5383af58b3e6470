"""The stream's fan-out: each change is turned into its message and encoded once, whatever the number of
clients, and each client is sent one ``batch`` message per poll (several when a poll's messages pass
MAX_BATCH_BYTES).

The server runs in the bot's process, so every microsecond it spends holding the interpreter lock is one the
bot's thread may wait for (a write back from ``fdatasync`` needs the lock again). With one queue per client
and one WebSocket message per change, 50 clients and 200 changes a second were 10,000 queue puts, message
builds, JSON encodings and WebSocket sends a second in the bot's process, in bursts of 20 ms every poll.
Here the poll thread appends one :class:`Batch` per poll to one shared log (its messages built and encoded
once, with the batch's whole text for a client without a filter) and each client reads the log from its own
position: the poll thread's work does not grow with the clients, and a client costs one send per poll.

Backpressure keeps the account feed's policy (:mod:`posstate.account.feed`): a client more than its
``maxsize`` updates behind the newest is dropped by the poll thread (the writer never waits); it is sent
``resync`` and closed. The log keeps only what some connected client has not read yet.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from posstate.account.types import AccountUpdate, Order
from posstate.serve.shapes import to_bytes
from posstate.serve.view import messages, symbol_of

#: The most message bytes in one batch: a poll's changes past it are sent as several batches (each whole
#: updates, in order). The websockets client's default ``max_size`` is 1 MiB and a frame over it closes the
#: connection (1009): one batch per poll would make it up to ``queue_size`` large changes. A single larger change
#: is a batch of its own, as big as the change.
MAX_BATCH_BYTES = 512 * 1024

#: One message of a batch: (version, topic, symbol or None, its JSON).
Item = tuple[int, str, "str | None", bytes]


@dataclass(frozen=True, slots=True)
class Batch:
    """The messages of one poll, in order; ``start``/``end``: the updates before and after it (a running count)."""

    start: int
    end: int
    version: int
    items: tuple[Item, ...]
    #: ``{"topic": "batch", "version": v, "messages": [...]}`` with every item (a client without a filter).
    text: str


def batch_text(version: int, parts: Iterable[bytes]) -> str:
    """The ``batch`` message holding the already encoded *parts*."""
    body = b'{"topic":"batch","version":%d,"messages":[%b]}' % (version, b",".join(parts))
    return body.decode("utf-8")


def _batch(start: int, end: int, items: list[Item]) -> Batch:
    version = items[-1][0]
    return Batch(start, end, version, tuple(items), batch_text(version, (i[3] for i in items)))


class Subscription:
    """One client's place in the log: ``seq`` counts the updates it has read (sent, filtered out or skipped)."""

    __slots__ = ("maxsize", "resync", "seq")

    def __init__(self, maxsize: int, seq: int) -> None:
        self.maxsize = maxsize
        self.seq = seq
        #: Set by the poll thread when it dropped this client: the version to put in its ``resync`` message.
        self.resync: int | None = None


class Fanout:
    """The shared log of batches and the subscriptions reading it. ``publish`` is called by one thread at a
    time (the poll thread, under the source's lock); ``read`` by the clients' tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: deque[Batch] = deque()
        self._end = 0
        self._subs: tuple[Subscription, ...] = ()  # replaced, never changed in place
        self._orders: dict[str, Order] = {}
        self.dropped_count = 0

    def reset_orders(self, orders: Mapping[str, Order]) -> None:
        """The open orders before the next update (``order.fill`` is the growth of ``filled`` from these)."""
        self._orders = dict(orders)

    # ---------------------------------------------------------------------------------- subscriptions
    def add(self, maxsize: int) -> Subscription:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        with self._lock:
            sub = Subscription(maxsize, self._end)
            self._subs = (*self._subs, sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._trim()

    def subscriptions(self) -> tuple[Subscription, ...]:
        return self._subs

    def pending(self, sub: Subscription) -> int:
        """Updates published that *sub* has not read yet (its queue, for /metrics)."""
        return max(0, self._end - sub.seq)

    # ---------------------------------------------------------------------------------- writing
    def publish(self, updates: Iterable[AccountUpdate]) -> None:
        """Append the messages of *updates* (in order) as one batch, then drop the clients now more than
        their ``maxsize`` behind. Nothing is built when no client is connected."""
        ups = tuple(updates)
        if not ups:
            return
        end = self._end + len(ups)
        if self._subs and all(end - s.seq > s.maxsize for s in self._subs):
            # A storm (more changes in one poll than any client may fall behind): every client is dropped with
            # resync, so none of these messages would be sent; the poll thread, in the bot's process, does not
            # encode them (10,000 changes were 10,000 encodings, then all thrown away).
            self.resync_all(ups[-1].version)
        if not self._subs:
            for u in ups:  # keep the open orders current for the next client's order.fill
                if u.kind == "order":
                    if u.value is None:
                        self._orders.pop(str(u.key), None)
                    else:
                        self._orders[str(u.key)] = u.value
            self._end += len(ups)
            return
        version = ups[-1].version
        try:
            batches = self._build(ups)
        except BaseException:
            # Never a silent gap: a client that missed these changes is sent resync (a fresh snapshot).
            self._end += len(ups)
            self.resync_all(version)
            raise
        with self._lock:
            self._log.extend(batches)
            self._end = batches[-1].end
            late = [s for s in self._subs if self._end - s.seq > s.maxsize]
            if late:
                self._subs = tuple(s for s in self._subs if s not in late)
            for s in late:
                s.resync = version
            self.dropped_count += len(late)
            self._trim()

    def _build(self, ups: tuple[AccountUpdate, ...]) -> list[Batch]:
        """The batches of *ups*: one, or several of whole updates when one would pass MAX_BATCH_BYTES."""
        batches: list[Batch] = []
        items: list[Item] = []
        size = start = 0
        for n, u in enumerate(ups):
            mine = [(u.version, m["topic"], symbol_of(m), to_bytes(m)) for m in messages(u, self._orders)]
            grown = sum(len(i[3]) + 1 for i in mine)
            if items and size + grown > MAX_BATCH_BYTES:  # a frame a default client accepts: split between updates
                batches.append(_batch(self._end + start, self._end + n, items))
                items, size, start = [], 0, n
            items.extend(mine)
            size += grown
        batches.append(_batch(self._end + start, self._end + len(ups), items))
        return batches

    def resync_all(self, version: int) -> None:
        """Drop every client (the source itself lost updates): each is sent ``resync``."""
        with self._lock:
            for s in self._subs:
                s.resync = version
            self.dropped_count += len(self._subs)
            self._subs = ()
            self._trim()

    def _trim(self) -> None:
        """Forget the batches every subscription has read (lock held)."""
        low = min((s.seq for s in self._subs), default=self._end)
        log = self._log
        while log and log[0].end <= low:
            log.popleft()

    # ---------------------------------------------------------------------------------- reading
    def read(self, sub: Subscription) -> list[Batch]:
        """The batches *sub* has not read yet, oldest first (it marks them read with ``sub.seq = batch.end``
        once sent)."""
        if sub.seq >= self._end:
            return []
        with self._lock:
            out: list[Batch] = []
            for batch in reversed(self._log):
                if batch.end <= sub.seq:
                    break
                out.append(batch)
        out.reverse()
        return out
