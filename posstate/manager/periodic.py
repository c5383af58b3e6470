"""Periodic validation: a daemon thread that validates the file on disk every ``validation_interval``.

It only reads (the check is :meth:`PositionStateManager.validate_state`, which emits ``stateValidated`` or
``validationError``) and it stops when the manager closes. The wait is :meth:`threading.Event.wait`, so
``stop()`` ends it at once instead of after the current interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("posstate")


class PeriodicValidator:
    """Calls *check* every *interval* seconds on a daemon thread until :meth:`stop`."""

    def __init__(self, check: Callable[[], object], *, interval: float, name: str = "posstate-validator") -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._check = check
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.runs = 0

    def start(self) -> PeriodicValidator:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._check()
            except Exception:  # the check reports through events; a bug must not kill the thread silently
                log.exception("periodic validation raised")
            self.runs += 1

    def stop(self, *, timeout: float | None = 2.0) -> None:
        """Ask the thread to stop and wait for it (not when called from the thread itself)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def start_for(check: Callable[[], object], *, enabled: bool, interval: float) -> PeriodicValidator | None:
    """A running validator when enabled with a positive interval, else None."""
    if not enabled or interval <= 0:
        return None
    return PeriodicValidator(check, interval=interval).start()
