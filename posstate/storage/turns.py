"""One O(state) background job runs at a time in a process: the others wait their turn, asleep (issue 14.3).

The background compaction and the background backups (their encode, and the full checks of a prune) run in
slices and call a pause between slices so that the bot's threads get the GIL. With two such threads at once
(a compaction while a prune verifies 24 backups) both stay runnable, and on a 2-core machine the bot's
writers then wait for a processor as well as for the GIL: measured with four writers that sleep as an
``fdatasync`` does, p99.9 of their wake-up delay was 5-8 ms with two background threads, 2.6-3 ms with one
(benchmarks/bench_tail.py, docs/JOURNAL.md "Background compaction").

:func:`turn` gives the calling thread the one turn (FIFO among background threads, in this process);
:func:`pause`, called between slices, hands the turn to the next waiting thread if there is one (else it
only lets the GIL go with ``time.sleep(0)``) and takes it back in order. A thread waiting for its turn is
blocked on a condition: it uses no processor and never takes the GIL. The bot's threads wait here only in
``create_backup()`` and ``prune_old_backups()`` (their full checks use the backup service's cache, sliced
like the background thread's), at most a slice per job ahead of them. A wait that ends in an exception
(Ctrl-C, the CLI's SIGTERM) gives its ticket up, so no later job waits for ever behind it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

__all__ = ["pause", "turn"]


class _Turns:
    """A FIFO ticket lock: ``serving`` is the ticket that holds the turn; tickets below ``issued`` wait.

    A wait for the turn can end in an exception (KeyboardInterrupt, or the CLI's SIGTERM handler, on a caller's
    thread that checks backups): its ticket is then given up (``abandoned``, skipped when its time comes), so
    no later ticket waits for ever behind it."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.issued = 0
        self.serving = 0
        self.abandoned: set[int] = set()
        self.local = threading.local()

    def take(self) -> None:
        with self.cond:
            ticket = self.issued
            self.issued += 1
            self.cond.notify_all()  # a holder (or a test) waiting to see someone queue
            try:
                while self.serving != ticket:
                    self.cond.wait()
            except BaseException:
                if self.serving == ticket:
                    self._advance()  # served meanwhile: hand it on at once
                else:
                    self.abandoned.add(ticket)
                raise
            self.local.held = True  # set before the lock is let go: no exception can fall in between

    def give(self) -> None:
        """Hand the turn on, if this thread holds it."""
        with self.cond:
            if getattr(self.local, "held", False):
                self.local.held = False
                self._advance()

    def holds(self) -> bool:
        return bool(getattr(self.local, "held", False))

    def _advance(self) -> None:
        """Under the condition: the turn goes to the next ticket still waiting for it."""
        self.serving += 1
        while self.serving in self.abandoned:
            self.abandoned.discard(self.serving)
            self.serving += 1
        self.cond.notify_all()

    def others_wait(self) -> bool:
        return self.issued - len(self.abandoned) > self.serving + 1


_turns = _Turns()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's background threads: nobody holds or waits for a turn."""
    global _turns
    _turns = _Turns()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def turn() -> Iterator[None]:
    """Hold the process's one background turn inside the block (re-entrant in one thread)."""
    turns = _turns
    local = turns.local
    depth = getattr(local, "depth", 0)
    local.depth = depth + 1
    try:
        if depth == 0:
            turns.take()
        yield
    finally:
        local.depth = depth
        if depth == 0:
            turns.give()  # only if held: a pause whose take-back was interrupted holds nothing


def pause() -> None:
    """Between two slices of background work: let the GIL go, and hand the turn over when another
    background thread waits for it (then wait for it again, behind that one)."""
    turns = _turns
    local = turns.local
    if getattr(local, "depth", 0) and turns.holds() and turns.others_wait():
        turns.give()
        turns.take()
    else:
        time.sleep(0)
