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
blocked on a condition: it uses no processor and never takes the GIL. The bot's writers never wait here (an
explicit ``prune_old_backups()``/``create_backup()`` does its full checks in a turn on the calling thread).
Only CPU work is done in a turn (a file is read before it is taken), so every holder reaches its next pause;
a wait ended by an exception, or given up (*abandon*, :func:`wake`), leaves no ticket behind.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["Abandoned", "pause", "turn", "wake"]


class Abandoned(Exception):
    """The job waiting for its turn was given up meanwhile (``abandon()`` became true): it never ran."""


class _Turns:
    """A FIFO ticket lock: ``serving`` is the ticket that holds the turn; tickets below ``issued`` wait.

    A wait interrupted by an exception (a KeyboardInterrupt on a caller's main thread) gives its ticket up:
    ``abandoned`` tickets are skipped when the turn moves on, so no one waits for a ticket nobody holds."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.issued = 0
        self.serving = 0
        self.abandoned: set[int] = set()
        self.local = threading.local()

    def take(self, abandon: Callable[[], bool] | None = None) -> None:
        """Wait for the turn; the calling thread then holds it (``local.held``) until :meth:`give`."""
        with self.cond:
            ticket = self.issued
            try:
                self.issued = ticket + 1
                self.cond.notify_all()  # a holder (or a test) waiting to see someone queue
                while self.serving != ticket:
                    if abandon is not None and abandon():
                        raise Abandoned
                    self.cond.wait()
                self.local.held = True
            except BaseException:  # Condition.wait re-took the lock: this ticket is given up, never left behind
                if self.issued > ticket:
                    if self.serving == ticket:
                        self.local.held = False
                        self._next()
                    else:
                        self.abandoned.add(ticket)
                raise

    def give(self) -> None:
        with self.cond:
            self.local.held = False
            self._next()

    def _next(self) -> None:
        self.serving += 1
        while self.serving in self.abandoned:
            self.abandoned.discard(self.serving)
            self.serving += 1
        self.cond.notify_all()

    def others_wait(self) -> bool:
        return self.issued > self.serving + 1 + len(self.abandoned)


_turns = _Turns()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's background threads: nobody holds or waits for a turn."""
    global _turns
    _turns = _Turns()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def turn(abandon: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold the process's one background turn inside the block (re-entrant in one thread). *abandon*: while
    it waits, give its place up and raise :class:`Abandoned` once this is true (checked at each :func:`wake`)."""
    turns = _turns
    local = turns.local
    depth = getattr(local, "depth", 0)
    try:  # an exception anywhere (a KeyboardInterrupt) gives back exactly what this thread holds
        if depth == 0:
            turns.take(abandon)
        local.depth = depth + 1
        yield
    finally:
        local.depth = depth
        if depth == 0 and getattr(local, "held", False):
            turns.give()


def pause() -> None:
    """Between two slices of background work: let the GIL go, and hand the turn over when another
    background thread waits for it (then wait for it again, behind that one)."""
    turns = _turns
    local = turns.local
    if getattr(local, "depth", 0) and getattr(local, "held", False) and turns.others_wait():
        turns.give()
        turns.take()  # an exception here gave its ticket up: the block ends holding nothing
    else:
        time.sleep(0)


def wake() -> None:
    """Make every thread waiting for its turn check its *abandon* (a job was just given up)."""
    turns = _turns
    with turns.cond:
        turns.cond.notify_all()
