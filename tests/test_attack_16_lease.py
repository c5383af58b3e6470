"""Issue 16 attack: the lease object deleted, damaged or forged "released" by someone with write access to the
bucket (no key), and a lease record with a hostile TTL. At no moment may two writers both hold a valid lease."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from replica_util import client

from posstate import StateLockedError
from posstate.replica import names as _names
from posstate.replica.lease import Lease, LeaseRecord


def _holder(c: Any, ttl: float = 2.0) -> Lease:
    holder = Lease(c, ttl=ttl, dir_id="a" * 32)
    holder.acquire()
    holder.start()
    c.put("snapshots/other-object-so-the-replica-is-not-empty", b"x")
    return holder


def test_lease_deleted_by_the_bucket_never_lets_a_second_writer_in_while_the_holder_writes(s3_server: Any) -> None:
    """issue 16.4 attack: lease.json deleted under a live holder: a contender waits until the holder has stopped."""
    c = client(s3_server.bucket(), s3_server.url)
    holder = _holder(c)
    try:
        c.delete([_names.LEASE])
        contender = Lease(c, ttl=2.0, dir_id="b" * 32)
        contender.acquire()
        assert holder.check() is not None, "two writers: the contender took the lease while the holder's was valid"
        assert contender.epoch > holder.epoch
    finally:
        holder.release()


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param(b"not json", id="damaged"),
        pytest.param(None, id="forged-released"),
    ],
)
def test_lease_replaced_by_the_bucket_never_lets_a_second_writer_in_while_the_holder_writes(
    s3_server: Any, planted: bytes | None
) -> None:
    """issue 16.4 attack: lease.json overwritten (garbage, or a forged "released" record): no overlap of writers."""
    c = client(s3_server.bucket(), s3_server.url)
    holder = _holder(c)
    try:
        if planted is None:
            rec = LeaseRecord(holder.epoch, "evil", 1, "e" * 32, "t", 2.0, 0.0, 0.0, released=True)
            planted = rec.to_bytes()
        c.put(_names.LEASE, planted)
        contender = Lease(c, ttl=2.0, dir_id="b" * 32)
        contender.acquire()
        assert holder.check() is not None, "two writers: the contender took the lease while the holder's was valid"
    finally:
        holder.release()


def test_holder_whose_lease_object_vanished_stops_for_good(s3_server: Any) -> None:
    """issue 16.4 attack: a renewal that finds lease.json gone means the lease is lost (not a retryable error)."""
    c = client(s3_server.bucket(), s3_server.url)
    holder = Lease(c, ttl=30.0, dir_id="a" * 32)
    holder.acquire()
    c.delete([_names.LEASE])
    assert holder.renew() is False
    assert holder.lost is not None and "gone" in holder.lost


@pytest.mark.parametrize(
    "ttl", [pytest.param("NaN", id="nan"), pytest.param("Infinity", id="inf"), pytest.param(1e12, id="huge")]
)
def test_a_planted_lease_with_a_hostile_ttl_never_hangs_or_skips_the_watch(s3_server: Any, ttl: Any) -> None:
    """issue 16.4 attack: a lease record with a NaN, infinite or absurd TTL is treated as damaged: the contender
    watches its own TTL (no instant takeover, no endless wait)."""
    c = client(s3_server.bucket(), s3_server.url)
    holder = _holder(c)
    try:
        body = json.loads(LeaseRecord(holder.epoch, "evil", 1, "e" * 32, "t", 2.0, 0.0, 0.0).to_bytes())
        body["ttl"] = ttl
        c.put(_names.LEASE, json.dumps(body).encode())
        contender = Lease(c, ttl=2.0, dir_id="b" * 32)
        contender.acquire()
        assert holder.check() is not None
    finally:
        holder.release()


def test_a_fresh_replica_is_taken_at_once(s3_server: Any) -> None:
    """issue 16.4: an empty replica (no objects, no lease) is taken at once; a live holder still refuses others."""
    c = client(s3_server.bucket(), s3_server.url)
    first = Lease(c, ttl=600.0, dir_id="a" * 32)
    assert first.acquire() is None and first.epoch == 1
    with pytest.raises(StateLockedError):
        Lease(c, ttl=600.0, dir_id="b" * 32).acquire()


def test_a_writer_whose_lease_lapsed_never_deletes_from_the_replica(tmp_path: Any, key: bytes) -> None:
    """issue 16.4/16.5 attack: a writer whose lease was not renewed in time (paused, partitioned) applies no
    retention: deleting objects is as fenced as uploading them."""
    from replica_util import Events, pos, rcfg

    from posstate import PositionStateManager

    url = f"file://{tmp_path}/rep"
    # close() does not wait out its flush: the lapsed lease refuses it (nothing is asserted after this test's
    # own refused pass)
    cfg = rcfg(tmp_path / "a", url, replica_lease=True, replica_lease_ttl=30, max_backups=1, replica_close_timeout=0.0)
    m = PositionStateManager(cfg, key=key)
    try:
        m.set_position(pos("A/USDT"))
        m.save()
        assert m.flush_replica(30)
        c = client(url)
        snaps, _, _ = _names.split(o.key for o in c.list())
        data = c.get(snaps[-1].key)
        old = _names.Snapshot(1, snaps[-1].epoch, 0, _names.digest(data))  # an older snapshot retention would remove
        c.put(old.key, data)
        lease = m._replica.lease  # type: ignore[union-attr]
        assert lease is not None
        lease._stop.set()
        lease._valid_until = 0.0  # lapsed: not renewed in time
        events = Events(m, "replicaLagging")
        assert not m.flush_replica(0)  # a listing, and with it retention, runs on every flush ...
        assert "shipping paused" in events.wait("replicaLagging")["reason"]  # ... refused: that pass is over
        assert old.key in {o.key for o in c.list()}
    finally:
        m.close()


def test_a_replayed_lease_record_of_this_directory_is_not_taken_back_at_once(s3_server: Any) -> None:
    """issue 16.4 attack: the bucket writes back an old lease record of directory C (its host and directory id)
    after H took over: C restarting must not take it at once as its own while H still holds a valid lease."""
    c = client(s3_server.bucket(), s3_server.url)
    first = Lease(c, ttl=1.0, dir_id="c" * 32, clock=lambda: time.time() - 3600)  # its record looks expired
    first.acquire()  # C holds epoch 1, then dies without releasing
    found = c.get_versioned(_names.LEASE)
    assert found is not None
    old_record = found[0]
    h = Lease(c, ttl=1.0, dir_id="h" * 32)
    h.acquire()  # H takes over after watching one TTL: epoch 2
    h.start()
    try:
        c.put(_names.LEASE, old_record)  # the replay
        again = Lease(c, ttl=1.0, dir_id="c" * 32)
        again.acquire()
        assert h.check() is not None, "two writers: C took back a replayed record while H's lease was valid"
        assert again.epoch > h.epoch
    finally:
        h.release()


def test_a_restart_fed_its_own_replayed_record_restores_the_newer_holders_state(
    s3_server: Any, tmp_path: Any, key: bytes
) -> None:
    """issue 16.4 attack: C dies, H takes over and writes, the bucket writes C's old lease record back: C
    restarting waits out H, then restores H's state (not its own older files) under the next epoch."""
    import os
    import signal

    from replica_util import held, pos
    from test_replica_lease import _child, _finish, _open_when_free, lcfg

    url = s3_server.bucket()
    kid = _child(tmp_path / "c", url, s3_server.url, key, ttl=1, n=2)
    try:
        assert kid.stdout is not None
        assert kid.stdout.readline().split() == ["ok", "1"]
        assert kid.stdout.readline().strip() == "flushed"
        c = client(url, s3_server.url)
        found = c.get_versioned(_names.LEASE)
        assert found is not None
        old_record = found[0]
        os.kill(kid.pid, signal.SIGKILL)
        kid.wait(30)
    finally:
        _finish(kid)
    h, _ = _open_when_free(lcfg(tmp_path / "h", url, s3_server.url, ttl=1), key)
    try:
        h.set_position(pos("H/USDT"))
        assert h.flush_replica(30)
        c.put(_names.LEASE, old_record)  # the replay
        m, _ = _open_when_free(lcfg(tmp_path / "c", url, s3_server.url, ttl=1), key)
        try:
            assert "H/USDT" in held(m)
            assert m.replica_status()["epoch"] == 3  # type: ignore[index]
        finally:
            m.close()
    finally:
        h.close()


def test_a_planted_lease_with_a_huge_epoch_never_pushes_epochs_past_a_name(s3_server: Any) -> None:
    """issue 16.4 attack: lease.json naming epoch 10**12 is damaged: the next epoch still fits an object name."""
    c = client(s3_server.bucket(), s3_server.url)
    c.put(_names.LEASE, LeaseRecord(10**12, "evil", 1, "e" * 32, "t", 1.0, 0.0, 0.0).to_bytes())
    contender = Lease(c, ttl=1.0, dir_id="b" * 32)
    contender.acquire()
    assert contender.epoch <= _names.MAX_COUNTER
    assert _names.parse(_names.Snapshot(1, contender.epoch, 1, "0" * 32).key) is not None


def test_a_cloned_machine_with_the_same_host_and_directory_never_takes_a_live_lease(s3_server: Any) -> None:
    """issue 16.4 attack (a second machine): a VM cloned from a running bot has the same hostname and a copy of
    its directory (the same directory id), but another boot: it must be refused while the lease is live, not
    take it at once as "its own" restart."""
    c = client(s3_server.bucket(), s3_server.url)
    holder = Lease(c, ttl=600.0, dir_id="a" * 32)
    holder.boot = "boot-of-the-original"
    holder.acquire()
    clone = Lease(c, ttl=600.0, dir_id="a" * 32)
    clone.boot = "boot-of-the-clone"
    with pytest.raises(StateLockedError):
        clone.acquire()
    assert holder.check() is None
