"""One writer across machines: a lease object in the replica, taken and renewed with conditional writes.

``lease.json`` holds the holder (host, pid, directory id), the fencing *epoch* and a random token. It is
created with ``If-None-Match: *`` and replaced with ``If-Match: <ETag>`` only, so of two machines racing for it
exactly one write succeeds. Safety never rests on comparing two machines' clocks (docs/REPLICATION.md):

* the holder counts its lease valid until ``start of its last successful renewal + 3/4 TTL`` on its own
  monotonic clock, renews every TTL/3 on a thread of its own, and refuses every change once that passes
  (:class:`~posstate.LeaseLostError`); a renewal refused by the condition means another machine took the
  lease: lost for good;
* a contender takes an expired-looking lease only after watching its ETag stay unchanged for a full TTL on its
  own monotonic clock, which a live holder's renewals always interrupt. The wall-clock ``expires_at`` in the
  record only decides whether to refuse at once (:class:`~posstate.StateLockedError`) or to start watching.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posstate.core.errors import ReplicaError, StateLockedError
from posstate.core.text import BAD_TEXT
from posstate.replica import names as _names
from posstate.replica.client import ObjectMissing, PreconditionFailed, ReplicaClient

log = logging.getLogger("posstate")

_SAFETY = 0.75  # the part of the TTL a holder trusts after the start of its last renewal
MAX_TTL = 86400.0  # the longest TTL a lease may name (StateConfig refuses a longer replica_lease_ttl)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    epoch: int
    host: str
    pid: int
    dir_id: str
    token: str
    ttl: float
    renewed_at: float
    expires_at: float
    released: bool = False
    boot: str = ""  # the holder's kernel boot id: a restart of the same directory on the same boot is "ours"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not one (damaged, or written by someone else)."""
        try:
            d = json.loads(data)
            ttl, renewed, expires = float(d["ttl"]), float(d["renewed_at"]), float(d["expires_at"])
            # A NaN or absurd TTL would make a contender skip its watch or wait for ever; an epoch no name can
            # hold would push the next one past the names' ten digits: damaged, both.
            if not all(math.isfinite(v) for v in (ttl, renewed, expires)) or not 0 < ttl <= MAX_TTL:
                return None
            if not 0 <= int(d["epoch"]) <= _names.MAX_COUNTER:
                return None
            return cls(
                epoch=int(d["epoch"]),
                host=_clean(d["host"], 255),  # the bucket writes these: they reach messages and terminals
                pid=int(d["pid"]),
                dir_id=_clean(d["dir_id"], 64),
                token=_clean(d["token"], 64),
                ttl=ttl,
                renewed_at=renewed,
                expires_at=expires,
                released=bool(d.get("released", False)),
                boot=_clean(d.get("boot", ""), 64),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _boot_id() -> str:
    """This kernel boot's id (Linux; "" elsewhere): another machine, a clone included, has another."""
    from posstate.storage import fileops as fs

    try:  # a /proc file's size is 0: read it by descriptor
        fd = fs.open_("/proc/sys/kernel/random/boot_id", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _clean(fs.pread(fd, 64, 0).decode("ascii", "replace").strip(), 64)
        finally:
            fs.close(fd)
    except OSError:
        return ""


def _clean(value: object, limit: int) -> str:
    return BAD_TEXT.sub("?", str(value)[:limit])


class Lease:
    """The lease of one writer. :meth:`acquire`, then :meth:`start`; :meth:`check` before every change."""

    def __init__(
        self,
        client: ReplicaClient,
        *,
        ttl: float,
        dir_id: str,
        path: Path | None = None,
        emit: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.dir_id = dir_id
        self._path = path
        self._emit = emit
        self._clock = clock
        self._mono = monotonic
        self.host = socket.gethostname()
        self.boot = _boot_id()
        self.pid = os.getpid()
        self.token = secrets.token_hex(16)
        self.epoch = 0
        self._etag: str | None = None
        self._valid_until = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0

    def _record(self, *, released: bool = False) -> LeaseRecord:
        now = self._clock()
        return LeaseRecord(
            self.epoch,
            self.host,
            self.pid,
            self.dir_id,
            self.token,
            self.ttl,
            now,
            0.0 if released else now + self.ttl,
            released,
            self.boot,
        )

    def _locked(self, rec: LeaseRecord | None, why: str) -> StateLockedError:
        return StateLockedError(
            self._path,
            pid=rec.pid if rec else None,
            host=rec.host if rec else None,
            reason=f"the replica lease of {self.client.url} is held by "
            + (f"pid {rec.pid} on host {rec.host} (epoch {rec.epoch})" if rec else "another writer")
            + f" ({why})",
            next_step=f"stop that process first, or wait until its lease expires ({self.ttl:g} s after it stops renewing)",
        )

    def acquire(self) -> LeaseRecord | None:
        """Take the lease with the next epoch; the previous holder's record (None: there was none).

        StateLockedError while another holder's lease is live. May wait one TTL watching a lease that looks
        expired (its holder's clock may be wrong), released, damaged or absent from a replica that holds
        objects (anyone with write access to the bucket can delete or forge it: only a whole TTL without a
        change proves its holder stopped), never longer."""
        floor, used = self._highest_epoch()
        while True:
            found = self.client.get_versioned(_names.LEASE)
            if found is None:
                # An empty replica is new: take it at once. One that holds objects had a writer: its lease was
                # deleted (a bucket attacker, an operator), so watch it stay absent for one TTL (ours: the
                # holder's is gone with its record; every writer of a replica must use the same TTL).
                if used and not self._unchanged_for(None, self.ttl):
                    continue  # it appeared meanwhile: look at it
                self.epoch = _names.next_counter(floor, url=self.client.url, what="epoch")
                try:
                    self._took(self.client.put_if(_names.LEASE, self._record().to_bytes(), etag=None), self._mono())
                except PreconditionFailed:
                    continue  # another writer created it a moment ago: look at theirs
                self._mark()
                return None
            data, etag = found
            prev = LeaseRecord.parse(data)
            # Our own record (a restart of this directory: its writer lock proves the old process is gone),
            # unless a later epoch exists: then it is a replay of an old record by the bucket.
            # A VM cloned from a running bot has the same host name and directory id: only the same boot counts.
            ours = (
                prev is not None
                and prev.host == self.host
                and prev.dir_id == self.dir_id
                and prev.boot == self.boot
                and prev.epoch >= floor
            )
            if not ours:
                if prev is not None and not prev.released:
                    left = prev.expires_at - self._clock()
                    if 0 < left <= 2 * max(prev.ttl, self.ttl):
                        raise self._locked(prev, f"lease live for {left:.0f} more s")
                # Expired, released, damaged: none of it is authenticated (the bucket may have written it), so
                # watch it unchanged for one whole TTL (the holder's when the record names one, which outlasts
                # the 3/4 of it the holder trusts after a renewal); a live holder's renewal interrupts that.
                if not self._unchanged_for(etag, prev.ttl if prev is not None else self.ttl):
                    again = self.client.get_versioned(_names.LEASE)
                    rec = LeaseRecord.parse(again[0]) if again is not None else None
                    if rec is None or rec.released:
                        continue
                    raise self._locked(rec, "renewed while this process watched it; its holder's clock may be wrong")
            self.epoch = _names.next_counter(max(floor, prev.epoch if prev is not None else 0), url=self.client.url, what="epoch")
            start = self._mono()
            try:
                self._took(self.client.put_if(_names.LEASE, self._record().to_bytes(), etag=etag), start)
            except (PreconditionFailed, ObjectMissing):
                raise self._locked(prev, "another writer took it first") from None
            self._mark()
            return prev

    def _highest_epoch(self) -> tuple[int, bool]:
        """The highest epoch any object in the replica was shipped under (a damaged lease must not reset it),
        and whether the replica holds any object besides the lease (a writer was here)."""
        keys = [o.key for o in self.client.list()]
        snaps, ranges, other = _names.split(keys)
        marks = _names.epoch_marks(keys)
        return max([s.epoch for s in snaps] + [r.epoch for r in ranges] + marks + [0]), bool(snaps or ranges or other or marks)

    def _unchanged_for(self, etag: str | None, ttl: float) -> bool:
        """Watch the lease for *ttl* seconds on our monotonic clock (*etag* None: absent); False as soon as it
        changes."""
        until = self._mono() + ttl
        while self._mono() < until:
            if self._stop.wait(min(ttl / 5, max(0.0, until - self._mono()))):
                return False
            found = self.client.get_versioned(_names.LEASE)
            if (found[1] if found is not None else None) != etag:
                return False
        return True

    def _mark(self) -> None:
        """Leave ``epochs/<epoch>`` (a taken epoch is never handed out again, even with the lease deleted);
        without it the lease is given back and the error raised."""
        try:
            self.client.put(_names.epoch_key(self.epoch), b"")
        except ReplicaError:
            self.release()
            raise

    def _took(self, etag: str, start: float) -> None:
        self._etag = etag
        self._valid_until = start + _SAFETY * self.ttl
        self.lost = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="posstate-lease", daemon=True)
        self._thread.start()

    def check(self) -> str | None:
        """Why this writer may not change anything now (None: it may). Cheap: no request."""
        if self.lost is not None:
            return self.lost
        late = self._mono() - self._valid_until
        if late >= 0:
            return f"not renewed for {late + _SAFETY * self.ttl:.1f} s (replica unreachable or process paused)"
        return None

    def renew(self) -> bool:
        """One renewal; False when it failed (the lease may still be valid until its deadline)."""
        if self.lost is not None:
            return False
        start = self._mono()
        try:
            etag = self.client.put_if(_names.LEASE, self._record().to_bytes(), etag=self._etag)
        except (PreconditionFailed, ObjectMissing):  # S3 answers If-Match on a deleted object with 404
            found = self.client.get_versioned(_names.LEASE)
            rec = LeaseRecord.parse(found[0]) if found is not None else None
            if found is not None and rec is not None and rec.token == self.token and rec.epoch == self.epoch:
                self._took(found[1], start)  # our last write landed, its answer was lost
                return True
            holder = f"pid {rec.pid} on host {rec.host}, epoch {rec.epoch}" if rec else "the lease object is gone or damaged"
            self.lost = f"another writer took the lease ({holder})"
            log.error("replica %s: %s", self.client.url, self.lost)
            if self._emit is not None:
                self._emit("leaseLost", {"url": self.client.url, "epoch": self.epoch, "reason": self.lost})
            return False
        self._took(etag, start)
        self.renewals += 1
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except ReplicaError as exc:
                log.warning("replica %s: lease renewal failed (%s)", self.client.url, exc)
            if self.lost is not None:
                return

    def release(self, timeout: float = 5.0) -> None:
        """Stop renewing and mark the lease released, so the next writer need not wait for it to expire. Best
        effort and bounded by *timeout* seconds (a replica that does not answer must not hold up close():
        the write goes on in the background and the lease expires after its TTL anyway)."""
        self._stop.set()
        deadline = self._mono() + timeout
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - self._mono()))
        if self.lost is None and self.check() is None and self._etag is not None:
            record, etag, done = self._record(released=True).to_bytes(), self._etag, threading.Event()

            def put() -> None:
                try:
                    self.client.put_if(_names.LEASE, record, etag=etag)
                except ReplicaError as exc:
                    log.warning(
                        "replica %s: could not release the lease (%s); it expires after %g s", self.client.url, exc, self.ttl
                    )
                finally:
                    done.set()

            threading.Thread(target=put, name="posstate-lease-release", daemon=True).start()
            if not done.wait(max(0.0, deadline - self._mono())):
                log.warning(
                    "replica %s: the lease release did not finish in %g s; it expires after %g s",
                    self.client.url,
                    timeout,
                    self.ttl,
                )
        self.lost = self.lost or "released"


def read_holder(client: ReplicaClient) -> LeaseRecord | None:
    found = client.get_versioned(_names.LEASE)
    return LeaseRecord.parse(found[0]) if found is not None else None
