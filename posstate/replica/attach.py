"""What a manager with ``replica_url`` holds: the client, the lease (``replica_lease=True``) and the shipper.

The manager's whole contact with replication: :class:`Replication` is built when the manager opens (takes the
lease, restores the replica onto this directory when another machine wrote last), :meth:`notify` after each
durable save, :meth:`fence` before each change, :meth:`flush` and :meth:`close`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posstate.core.config import StateConfig
from posstate.core.errors import LeaseLostError, PosStateError
from posstate.replica import names as _names
from posstate.replica import prune as _prune
from posstate.replica.clients import open_client
from posstate.replica.lease import Lease
from posstate.replica.shipper import Shipper
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

log = logging.getLogger("posstate")

Emit = Callable[[str, dict[str, Any]], None]


def read_marker(path: Path) -> dict[str, Any] | None:
    """``positions.json.replica``: this directory's id and the lease epoch it last held (None: none)."""
    try:
        found = json.loads(fs.read_file(path, max_size=4096))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("dir_id"), str) else None


class Replication:
    """Replication of one manager's state directory (docs/REPLICATION.md)."""

    def __init__(
        self, config: StateConfig, *, emit: Emit, journal_size: Callable[[], int], options: _statefile.ReadOptions
    ) -> None:
        assert config.replica_url is not None
        self.config = config
        self._path = config.state_path
        self.client = open_client(config.replica_url, endpoint_url=config.replica_endpoint_url)
        self.lease: Lease | None = None
        self.restored: dict[str, Any] | None = None
        self.took_over = False
        if config.replica_lease:
            self._take_lease(emit, options)
        self.shipper = Shipper(
            self.client,
            state_path=config.state_path,
            journal_path=config.journal_path,
            emit=emit,
            interval=config.replica_interval,
            batch_bytes=config.replica_batch_bytes,
            journal_size=journal_size,
            epoch=self.lease.epoch if self.lease is not None else 0,
            policy=_prune.policy_of(config),
            fence=self._lost,
            pause=self._lapsed,
        )
        self.shipper.start()
        if self.took_over:
            # Ship the restored state under the new epoch before the first change: from then on a restore
            # never uses the old holder's objects, whatever it uploads late.
            self.shipper.flush(config.replica_lease_ttl)

    def _take_lease(self, emit: Emit, options: _statefile.ReadOptions) -> None:
        cfg = self.config
        marker = read_marker(cfg.replica_marker_path)
        dir_id = marker["dir_id"] if marker is not None else secrets.token_hex(16)
        lease = Lease(self.client, ttl=cfg.replica_lease_ttl, dir_id=dir_id, path=self._path, emit=emit)
        prev = lease.acquire()
        try:
            # The last holder was this directory: its record, its epoch, and no epoch after it (an old record of
            # ours written back by the bucket after another machine took over is not "us").
            we_were_last = (
                prev is not None
                and marker is not None
                and prev.dir_id == dir_id
                and prev.epoch == marker.get("epoch")
                and prev.epoch == lease.epoch - 1
            )
            someone_else = prev is not None and not we_were_last
            self.took_over = someone_else
            snaps, _, _ = _names.split(o.key for o in self.client.list())
            if snaps and (someone_else or not fs.exists(cfg.state_path)):
                from posstate.replica.restore import restore

                result = restore(self.client, cfg, options=options, replace=True)
                self.restored = result.to_dict()
                log.info(
                    "replica %s: took over the lease (epoch %d) and restored generation %d",
                    self.client.url,
                    lease.epoch,
                    result.generation,
                )
                emit("replicaRestored", {"url": self.client.url, "epoch": lease.epoch, **self.restored})
            fs.ensure_dir(cfg.state_dir)
            _atomic.write_file(
                cfg.replica_marker_path, json.dumps({"dir_id": dir_id, "epoch": lease.epoch, "url": self.client.url}).encode()
            )
        except BaseException:
            lease.release()
            raise
        lease.start()
        self.lease = lease

    def _lost(self) -> str | None:
        return self.lease.lost if self.lease is not None else None

    def _lapsed(self) -> str | None:
        return self.lease.check() if self.lease is not None else None

    # ------------------------------------------------------------------ the manager's hooks
    def fence(self) -> None:
        """Before each change: LeaseLostError unless this writer holds a live lease (no request)."""
        if self.lease is not None:
            reason = self.lease.check()
            if reason is not None:
                raise LeaseLostError(self._path, url=self.client.url, epoch=self.lease.epoch, reason=reason)

    def guarded(self, check: Callable[[], None]) -> Callable[[], None]:
        """*check* (the writer lock's), then :meth:`fence`: the journal's guard before each record."""
        if self.lease is None:
            return check
        fence = self.fence

        def guard() -> None:
            check()
            fence()

        return guard

    def notify(self) -> None:
        self.shipper.notify()

    def flush(self, timeout: float | None) -> bool:
        return self.shipper.flush(timeout)

    def status(self) -> dict[str, Any]:
        out = self.shipper.status()
        if self.lease is not None:
            out["lease"] = {"epoch": self.lease.epoch, "ttl": self.lease.ttl, "problem": self.lease.check()}
        return out

    def close(self, timeout: float) -> str | None:
        """Flush with a bounded wait, stop shipping, release the lease; what was left behind (None: nothing)."""
        deadline = time.monotonic() + timeout
        try:
            left = self.shipper.close(timeout)
        except PosStateError as exc:  # pragma: no cover - close never raises
            left = str(exc)
        if self.lease is not None:
            self.lease.release(max(1.0, deadline - time.monotonic()))
        return left
