"""Virtual time for the replica lease tests that need a takeover but do not test its timing (issue 16).

A takeover costs a contender the rest of the old holder's TTL (its record must look expired) and then one whole
TTL watching the lease unchanged (posstate/replica/lease.py): seconds per test, spent waiting. ``Lease`` takes
its wall and monotonic clocks as arguments; :func:`lease_time` patches the one place the managers build their
lease (``posstate.replica.attach.Lease``) to pass the clocks of one :class:`LeaseTime`, real time plus what the
test skips:

* :meth:`LeaseTime.skip` is "every holder stays paused for that long": a holder's own validity runs out with it
  and a contender sees the record expired;
* while a lease is acquiring (before its renewals start), its waits let virtual time pass at once: the watch
  still reads the lease at each step, but the whole TTL passes in a few requests. So a holder that renews in
  real time would NOT interrupt it: use this only when every other holder is paused or dead (the lease's own
  timing is tested in real time in tests/test_replica_lease.py).

After a lease starts renewing, its waits are real and the offset stays fixed: its validity and renewals run in
real time as in production.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from posstate.replica import attach
from posstate.replica.client import ReplicaClient
from posstate.replica.lease import Lease


class LeaseTime:
    """Real time plus an offset that only grows; the leases that started renewing while it is installed."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.leases: list[Lease] = []
        self._lock = threading.Lock()

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        """Let *seconds* pass at once, for every lease of this test (all holders are paused meanwhile)."""
        with self._lock:
            self.offset += seconds

    def holder(self, epoch: int) -> Lease:
        """The lease that took *epoch* (and started renewing it: an attempt refused on the way named it too)."""
        return next(lease for lease in self.leases if lease.epoch == epoch)

    def die(self, epoch: int) -> None:
        """The holder of *epoch* dies: it never renews, ships or releases again (its shipper stops at its next
        pass as if the lease were lost; its record stays in the replica, unreleased)."""
        self.holder(epoch).lost = "the machine died (test)"


class _Stop(threading.Event):
    """A lease's stop event: before its renewals start, a wait lets virtual time pass instead of real time."""

    def __init__(self, clock: LeaseTime) -> None:
        super().__init__()
        self._clock = clock
        self.instant = True

    def wait(self, timeout: float | None = None) -> bool:
        if self.instant and timeout is not None and not self.is_set():
            self._clock.skip(timeout)
            return False
        return super().wait(timeout)


def lease_time(monkeypatch: pytest.MonkeyPatch) -> LeaseTime:
    """Install a :class:`LeaseTime` for every manager opened from now on in this test."""
    clock = LeaseTime()

    class FastLease(Lease):
        def __init__(self, client: ReplicaClient, **kw: Any) -> None:
            super().__init__(client, clock=clock.time, monotonic=clock.monotonic, **kw)
            self._stop = _Stop(clock)

        def start(self) -> None:
            assert isinstance(self._stop, _Stop)
            self._stop.instant = False
            clock.leases.append(self)
            super().start()

    monkeypatch.setattr(attach, "Lease", FastLease)
    return clock
