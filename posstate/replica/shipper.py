"""The shipper: a background thread that copies the state file and the journal to the replica as they are on
disk (encrypted, authenticated), never on the caller's thread.

The manager calls :meth:`Shipper.notify` after every durable save (its one hook); journal records are picked
up every ``replica_interval`` seconds, or as soon as ``replica_batch_bytes`` of them wait. Each pass uploads
the snapshot if the replica lacks it, then the journal bytes after what was shipped, cut at record boundaries
into objects of at most ``replica_batch_bytes`` (docs/REPLICATION.md). A failed upload leaves the lag to grow:
a ``replicaLagging`` event, retries with a growing pause (at most ``replica_interval``), and a
``replicaResumed`` event once a pass succeeds. A listing (``check``) runs at start, on every flush, after every
snapshot upload (with retention) and every ten minutes: an object that vanished from the replica (a bucket
emptied under the bot) is reported (``replicaReseeded``) and shipped again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posstate.backup.retention import Policy
from posstate.core.errors import ReplicaError
from posstate.journal import format as jf
from posstate.replica import local as _local
from posstate.replica import names as _names
from posstate.replica import prune as _prune
from posstate.replica.client import ReplicaClient

log = logging.getLogger("posstate")

Emit = Callable[[str, dict[str, Any]], None]
_CHECK_EVERY = 600.0
_POLL = 0.5


class Shipper:
    """Ships one state directory to one replica. Start with :meth:`start`; stop with :meth:`close`."""

    def __init__(
        self,
        client: ReplicaClient,
        *,
        state_path: Path,
        journal_path: Path,
        emit: Emit,
        interval: float = 10.0,
        batch_bytes: int = 1024 * 1024,
        journal_size: Callable[[], int] | None = None,
        epoch: int = 0,
        policy: Policy | None = None,
        fence: Callable[[], str | None] | None = None,
        pause: Callable[[], str | None] | None = None,
    ) -> None:
        self.client = client
        self._state_path = state_path
        self._journal_path = journal_path
        self._emit = emit
        self._interval = interval
        self._batch = batch_bytes
        self._journal_size = journal_size
        self.epoch = epoch
        self._policy = policy
        self._fence = fence  # why shipping stopped for good (a lost lease), or None
        self._pause = pause  # why this writer may not ship now (a lease not renewed in time), or None
        self._cond = threading.Condition()
        self._notified = False
        self._flush_req = 0
        self._done_req = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.session: int | None = None
        self._snap: _names.Snapshot | None = None
        self._listed: set[tuple[int, str]] = set()  # (generation, digest) of every snapshot listed, any epoch
        self._jid: str | None = None
        self._joff = 0
        self._nid: str | None = None  # the ``.next`` segment of a pending background compaction (issue 14)
        self._noff = 0
        self._check_due = True
        self._check_at = 0.0
        self._last_pass = 0.0
        self.failing: str | None = None
        self.fenced: str | None = None
        self.last_ok: float | None = None  # wall time of the last successful pass
        self.requests = 0

    # ------------------------------------------------------------------ caller's side (cheap, never blocks on I/O)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="posstate-replica", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A save is durable: ship it soon. Costs one lock and one notify."""
        with self._cond:
            self._notified = True
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until a pass that started after this call (listing included) succeeded; False on timeout, or
        when shipping stopped (closed, lease lost)."""
        with self._cond:
            self._flush_req += 1
            mine = self._flush_req
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._done_req >= mine or self._stop or self.fenced is not None, timeout)
            return self._done_req >= mine

    def close(self, timeout: float) -> str | None:
        """Flush with a bounded wait, then stop the thread; what was left behind (None: nothing)."""
        left = None
        deadline = time.monotonic() + timeout
        alive = self._thread is not None and self._thread.is_alive() and self.fenced is None
        if alive and not self.flush(timeout):
            left = self.lag_text()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:  # a thread stuck in a request to a dead replica is a daemon: not waited for
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        return left

    def status(self) -> dict[str, Any]:
        """The lag as the local files show it against what this shipper knows was shipped (no request)."""
        local = _local.read_local(self._state_path, self._journal_path)
        behind, oldest = self._behind(local)
        return {
            "url": self.client.url,
            "epoch": self.epoch,
            "session": self.session,
            "records_behind": behind,
            "seconds_behind": 0.0 if oldest is None else round(max(0.0, time.time() - oldest / 1000), 3),
            "snapshot_shipped": self._snap is not None
            and local.snapshot is not None
            and self._snap.digest == _names.digest(local.snapshot),
            "failing": self.failing,
            "fenced": self.fenced,
            "last_ok": self.last_ok,
            "requests": self.requests,
        }

    def lag_text(self) -> str:
        s = self.status()
        why = f" ({s['failing']})" if s["failing"] else ""
        snap = "" if s["snapshot_shipped"] else " and the snapshot"
        return f"{s['records_behind']} journal records{snap} not yet in {self.client.url}{why}"

    def _behind(self, local: _local.LocalFiles) -> tuple[int, int | None]:
        oldest = None
        if local.snapshot is not None and (self._snap is None or self._snap.digest != _names.digest(local.snapshot)):
            from posstate.storage import container as _container

            oldest = _container.parse_header(local.snapshot).written_at_ms
        off = self._joff if local.header is not None and local.header.id_hex == self._jid else 0
        rest = [r for r in local.records if r.end > off]
        if local.following is not None:
            seg = local.following
            noff = self._noff if seg.header.id_hex == self._nid else 0
            rest += [r for r in seg.records if r.end > noff]
        if rest:
            first = min(r.time_ms for r in rest)
            oldest = first if oldest is None else min(oldest, first)
        return len(rest), oldest

    # ------------------------------------------------------------------ the thread
    def _due(self) -> bool:
        if self._notified or self._flush_req > self._done_req:
            return True
        if time.monotonic() - self._last_pass >= self._interval:
            return True
        size = self._journal_size() if self._journal_size is not None else 0
        return size - self._joff >= self._batch

    def _run(self) -> None:
        pause = 0.0
        while True:
            with self._cond:
                if pause:  # after a failure: wait even if a flush is waiting (no busy loop against a dead replica)
                    self._cond.wait_for(lambda: self._stop, pause)
                self._cond.wait_for(lambda: self._stop or self._notified or self._flush_req > self._done_req, _POLL)
                if self._stop:
                    return
                if not self._due():
                    continue
                self._notified = False
                req = self._flush_req
            reason = self._fence() if self._fence is not None else None
            if reason is not None:
                with self._cond:
                    self.fenced = reason
                    self._cond.notify_all()
                log.warning("replica %s: shipping stopped (%s)", self.client.url, reason)
                return
            try:
                if self._check_due or req > self._done_req or time.monotonic() >= self._check_at:
                    self._check()
                self._pass()
            except ReplicaError as exc:
                if self.fenced is not None:  # _guard: the lease is lost, a stop and not a failure to retry
                    log.warning("replica %s: shipping stopped (%s)", self.client.url, self.fenced)
                    return
                self._failed(exc)
                pause = min(max(self._interval, 0.5), 2 * pause + 0.5) if pause else 0.5
                continue
            except Exception as exc:  # never let the thread die: a bug here must not stop shipping for good
                log.exception("replica %s: unexpected error in the shipper", self.client.url)
                self._failed(ReplicaError(self.client.url, f"unexpected {type(exc).__name__}: {exc}"))
                pause = max(self._interval, 0.5)
                continue
            pause = 0.0
            self._last_pass = time.monotonic()
            self.last_ok = time.time()
            if self.failing is not None:
                self.failing = None
                self._emit("replicaResumed", {"url": self.client.url})
            with self._cond:
                self._done_req = max(self._done_req, req)
                self._cond.notify_all()

    def _failed(self, exc: ReplicaError) -> None:
        self._check_due = True  # what arrived of the failed pass is only known from a listing
        first = self.failing is None
        self.failing = exc.reason
        behind, oldest = self._behind(_local.read_local(self._state_path, self._journal_path))
        lag = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
        if first:
            log.warning("replica %s: shipping failed, lag grows (%s)", self.client.url, exc)
        self._emit(
            "replicaLagging",
            {"url": self.client.url, "reason": exc.reason, "records": behind, "seconds": round(lag, 3), "first": first},
        )

    def _check(self) -> None:
        """List the replica and learn what of the local files it holds (start, flush, after a snapshot)."""
        objects = self.client.list()
        self.requests += 1
        snaps, ranges, _ = _names.split(o.key for o in objects)
        if self.session is None:
            highest = max([s.session for s in snaps] + [r.session for r in ranges] + [0])
            self.session = _names.next_counter(highest, url=self.client.url, what="session")
        local = _local.read_local(self._state_path, self._journal_path)
        found = _local.compare(local, snaps, ranges, epoch=self.epoch)
        lost = []
        if (
            self._snap is not None
            and local.snapshot is not None
            and self._snap.digest == _names.digest(local.snapshot)
            and found.snapshot is None
        ):
            lost.append(self._snap.key)
        jid = local.header.id_hex if local.header is not None else None
        if jid is not None and jid == self._jid and found.journal_offset < self._joff:
            lost.append(f"journal {jid} bytes {found.journal_offset}..{self._joff}")
        nid = local.following.header.id_hex if local.following is not None else None
        if nid is not None and nid == self._nid and found.following_offset < self._noff:
            lost.append(f"journal {nid} bytes {found.following_offset}..{self._noff}")
        fenced = self._fence() if lost and self._fence is not None else None
        if fenced is not None:  # newcomer leftovers 5: a fenced writer ships nothing again (_guard raises)
            log.warning(
                "replica %s: lease lost (%s): this writer is fenced and ships nothing; what it shipped is no longer "
                "in the replica (%s), as after a takeover",
                self.client.url,
                fenced,
                "; ".join(lost),
            )
            self._guard()
        if lost:
            log.warning("replica %s: shipped objects are missing (%s); shipping them again", self.client.url, "; ".join(lost))
            self._emit("replicaReseeded", {"url": self.client.url, "missing": lost})
        self._snap = found.snapshot
        self._listed = {(s.generation, s.digest) for s in snaps}
        self._jid, self._joff = jid, found.journal_offset
        self._nid, self._noff = nid, found.following_offset
        if self._policy is not None and found.snapshot is not None:
            plan = _prune.plan(objects, policy=self._policy, current_journal=jid, following_journal=nid)
            if plan.remove:
                self._guard()  # a writer that lost (or could not renew) its lease deletes nothing either
                self.client.delete(plan.remove)
                self.requests += 1
        self._check_due = False
        self._check_at = time.monotonic() + _CHECK_EVERY

    def _pass(self) -> None:
        """Upload what the replica lacks of the local files, snapshot first."""
        assert self.session is not None
        for _ in range(3):  # a save between reading the snapshot and its journal: read again
            local = _local.read_local(self._state_path, self._journal_path)
            if local.snapshot is None or local.generation is None:
                return
            d = _names.digest(local.snapshot)
            # The snapshot first, so its journal's ranges are never listed without it; but when the replica
            # already lists these bytes (a takeover ships the state it restored under its own epoch), the journal
            # first: a restore ignores an older epoch's ranges after this epoch's snapshot, so a writer dying
            # between the two would leave the restored records out of every restore (session 11).
            later = (local.generation, d) in self._listed and local.header is not None and local.journal is not None
            if not later:
                self._ship_snapshot(local.generation, local.snapshot, d)
            if local.header is None or local.journal is None:
                if self._journal_newer(local.generation):
                    continue
                return
            if local.header.id_hex != self._jid:
                # The segment shipped while its compaction was pending is now the snapshot's journal (issue 14)
                off = self._noff if local.header.id_hex == self._nid else 0
                self._jid, self._joff = local.header.id_hex, off
            self._joff = self._ship_records(local.journal, local.header, local.generation, local.records, self._joff)
            seg = local.following
            if seg is not None:  # records acknowledged into .next while a background compaction is pending
                if seg.header.id_hex != self._nid:
                    self._nid, self._noff = seg.header.id_hex, 0
                self._noff = self._ship_records(seg.journal, seg.header, seg.header.base_generation, seg.records, self._noff)
            self._ship_snapshot(local.generation, local.snapshot, d)
            return

    def _ship_snapshot(self, generation: int, data: bytes, d: str) -> None:
        """Upload the snapshot under this writer's name unless it already did."""
        assert self.session is not None
        if self._snap is None or self._snap.digest != d:
            name = _names.Snapshot(generation, self.epoch, self.session, d)
            self._guard()
            self.client.put(name.key, data)
            self.requests += 1
            self._snap = name
            self._check_due = True  # retention, after a new snapshot

    def _journal_newer(self, generation: int) -> bool:
        from posstate.storage import fileops as fs

        try:
            return jf.parse_header(fs.read_file(self._journal_path, jf.HEADER_SIZE)).base_generation > generation
        except (OSError, jf.JournalProblem):
            return False

    def _ship_records(
        self, journal: bytes, header: jf.JournalHeader, generation: int, all_records: Sequence[jf.RawRecord], off: int
    ) -> int:
        """Upload the records of *journal* past *off* as ranges named by *generation*; the new offset."""
        assert self.session is not None
        records = [r for r in all_records if r.end > off]
        while records:
            limit = off + self._batch
            cut = next((i for i, r in enumerate(records) if r.end > limit), len(records)) or 1
            end = records[cut - 1].end
            chunk = journal[off:end]
            rng = _names.Range(generation, header.id_hex, off, end, self.epoch, self.session, _names.digest(chunk))
            self._guard()
            self.client.put(rng.key, chunk)
            self.requests += 1
            off = end
            if header.id_hex == self._jid:
                self._joff = off  # a failed upload later keeps what arrived
            elif header.id_hex == self._nid:
                self._noff = off
            records = records[cut:]
        return off

    def _guard(self) -> None:
        """Before every upload: a writer that lost its lease never ships again, and one whose lease is not
        renewed in time waits (the lag grows) until it is."""
        reason = self._fence() if self._fence is not None else None
        if reason is not None:
            with self._cond:
                self.fenced = reason
                self._cond.notify_all()
            raise ReplicaError(self.client.url, f"shipping stopped ({reason})")
        reason = self._pause() if self._pause is not None else None
        if reason is not None:
            raise ReplicaError(self.client.url, f"shipping paused: the lease is {reason}")
