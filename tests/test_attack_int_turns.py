"""Session 6 integration attack: the process's one background turn (posstate/storage/turns.py, issue 14) is
also taken on the caller's thread: ``create_backup()`` and ``prune_old_backups()`` check backups with the backup
service's cache, whose pause is the turn's. An exception raised while that thread waits for the turn
(KeyboardInterrupt from Ctrl-C, ``Terminated`` from the CLI's SIGTERM handler) must leave the turn lock as it
found it: before, the waiting ticket was never served nor given up, so every later background job (a
compaction, a backup) waited for ever, and the next ``save()`` waited for ever for that compaction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from posstate.storage import turns as _turns


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[_turns._Turns]:
    """A turn lock of its own for the test (the process's is shared with any manager still running)."""
    t = _turns._Turns()
    monkeypatch.setattr(_turns, "_turns", t)
    yield t


class _Holder:
    """A thread that holds the turn until released."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.holding.wait(10)

    def _run(self) -> None:
        with _turns.turn():
            self.holding.set()
            assert self.release.wait(30)

    def done(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _interrupt_next_wait(t: _turns._Turns, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next wait on the turn's condition in this thread raises KeyboardInterrupt (a signal arriving then)."""
    me = threading.current_thread()
    real = t.cond.wait

    def wait(timeout: Any = None) -> bool:
        if threading.current_thread() is me:
            monkeypatch.setattr(t.cond, "wait", real)
            raise KeyboardInterrupt
        return real(timeout)

    monkeypatch.setattr(t.cond, "wait", wait)


def _next_job_runs(t: _turns._Turns) -> bool:
    ran = threading.Event()

    def job() -> None:
        with _turns.turn():
            ran.set()

    threading.Thread(target=job, daemon=True).start()
    return ran.wait(10)


def test_an_interrupt_while_waiting_for_the_turn_gives_up_the_ticket(
    fresh: _turns._Turns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 x CLI SIGTERM (integration): an exception in the wait for the turn never leaves a ticket no one serves."""
    holder = _Holder()
    _interrupt_next_wait(fresh, monkeypatch)
    with pytest.raises(KeyboardInterrupt), _turns.turn():
        pytest.fail("the turn was taken while another thread held it")
    holder.done()
    assert _next_job_runs(fresh), "a background job waits for ever behind the interrupted ticket"


def test_an_interrupt_in_a_pause_neither_gives_the_turn_twice_nor_keeps_it(
    fresh: _turns._Turns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 x CLI SIGTERM (integration): an exception while a pause waits to take the turn back gives it once."""
    waiter_holds, waiter_release = threading.Event(), threading.Event()

    def waiter() -> None:
        with _turns.turn():
            waiter_holds.set()
            assert waiter_release.wait(30)

    with pytest.raises(KeyboardInterrupt), _turns.turn():
        t = threading.Thread(target=waiter, daemon=True)
        t.start()
        with fresh.cond:
            assert fresh.cond.wait_for(fresh.others_wait, 10)
        _interrupt_next_wait(fresh, monkeypatch)
        _turns.pause()  # hands the turn to the waiter, then the wait to take it back is interrupted
    assert waiter_holds.wait(10)
    assert not fresh.others_wait()  # the waiter's ticket is served; the interrupted one waits for nothing
    waiter_release.set()
    t.join(10)
    assert _next_job_runs(fresh)
    assert fresh.issued == fresh.serving  # every ticket served once: the lock is idle
