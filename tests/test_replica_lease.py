"""Issue 16.4: one writer across machines, a lease in the replica taken and renewed with S3 conditional writes
(moto's server over HTTP): races, takeover after the TTL, a stale writer fenced, wrong clocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from replica_util import client, held, pos, rcfg, restore_into

from posstate import LeaseLostError, PositionStateManager, StateConfig, StateLockedError
from posstate.replica import names as _names
from posstate.replica.lease import Lease, read_holder

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import base64, os, sys
    from decimal import Decimal
    from posstate import Position, PositionStateManager, StateConfig, StateLockedError
    state_dir, url, endpoint, key, ttl, n = sys.argv[1:7]
    cfg = StateConfig.in_dir(state_dir, replica_url=url, replica_endpoint_url=endpoint, replica_lease=True,
                             replica_lease_ttl=float(ttl), replica_interval=0.2)
    try:
        m = PositionStateManager(cfg, key=base64.b64decode(key))
    except StateLockedError as exc:
        print("locked", exc.host, exc.pid, flush=True)
        sys.exit(0)
    print("ok", m.replica_status()["epoch"], flush=True)
    for i in range(int(n)):
        m.set_position(Position(symbol=f"K{i}/USDT", side="long", contracts=Decimal(1), entry_price=Decimal(10)))
    assert m.flush_replica(60)
    print("flushed", flush=True)
    sys.stdin.readline()
    m.close()
    """
)


def _child(state_dir: Path, url: str, endpoint: str, key: bytes, *, ttl: float = 2.0, n: int = 0) -> subprocess.Popen[str]:
    import base64

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state_dir), url, endpoint, base64.b64encode(key).decode(), str(ttl), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(kid: subprocess.Popen[str]) -> None:
    """Let a child end (a newline tells it to close its manager) and close its pipes."""
    if kid.poll() is None:
        kid.communicate("\n", timeout=60)
    for pipe in (kid.stdin, kid.stdout):
        if pipe is not None:
            pipe.close()


def lcfg(state_dir: Path, url: str, endpoint: str, **kw: Any) -> StateConfig:
    return rcfg(state_dir, url, endpoint, replica_lease=True, replica_lease_ttl=kw.pop("ttl", 2.0), **kw)


def _open_when_free(cfg: StateConfig, key: bytes, *, within: float = 60.0) -> tuple[PositionStateManager, list[StateLockedError]]:
    """Open a lease-holding manager, retrying while another holder's lease is live (each try blocks for at most
    one TTL on the lease itself); the refusals seen on the way."""
    refused: list[StateLockedError] = []
    deadline = time.monotonic() + within
    while True:
        try:
            return PositionStateManager(cfg, key=key), refused
        except StateLockedError as exc:
            refused.append(exc)
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.2)  # poll interval between attempts (each attempt itself waits on the lease)


def test_two_processes_racing_for_the_lease_exactly_one_wins(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.4: two processes on different directories opening one replica at once: exactly one holds the
    lease, the other gets StateLockedError naming the holder's host and pid."""
    url = s3_server.bucket()
    kids = [_child(tmp_path / f"m{i}", url, s3_server.url, key, ttl=30) for i in range(2)]
    try:
        lines = [k.stdout.readline().split() for k in kids if k.stdout is not None]
        winners = [(k, line) for k, line in zip(kids, lines, strict=True) if line[0] == "ok"]
        losers = [line for line in lines if line[0] == "locked"]
        assert len(winners) == 1 and len(losers) == 1, lines
        assert losers[0][2] == str(winners[0][0].pid)
        holder = read_holder(client(url, s3_server.url))
        assert holder is not None and holder.pid == winners[0][0].pid and holder.epoch == 1
    finally:
        for k in kids:
            _finish(k)


def test_takeover_after_the_ttl_restores_and_takes_the_next_epoch(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.4: the holder is SIGKILLed; another machine is refused while the lease is live, then takes it over
    after the TTL with the next epoch, restores what the replica holds and goes on."""
    url = s3_server.bucket()
    kid = _child(tmp_path / "m1", url, s3_server.url, key, ttl=4, n=5)  # renewals have 3 s of margin under load
    try:
        assert kid.stdout is not None
        assert kid.stdout.readline().split() == ["ok", "1"]
        assert kid.stdout.readline().strip() == "flushed"
        os.kill(kid.pid, signal.SIGKILL)
        kid.wait(30)
    finally:
        _finish(kid)
    m, refused = _open_when_free(lcfg(tmp_path / "m2", url, s3_server.url, ttl=30), key)
    try:
        assert all(e.pid == kid.pid for e in refused)
        assert m.replica_status()["epoch"] == 2  # type: ignore[index]
        assert set(held(m)) == {f"K{i}/USDT" for i in range(5)}
        m.set_position(pos("NEW/USDT"))
        assert m.flush_replica(30)
    finally:
        m.close()
    cfg, result = restore_into(tmp_path / "r", url, s3_server.url, key)
    assert result.epoch == 2
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert "NEW/USDT" in held(r) and len(held(r)) == 6


def test_a_stale_writer_raises_lease_lost_and_its_late_objects_are_ignored(
    s3_server: Any, tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4: a writer whose renewals stopped (a paused process) raises LeaseLostError on its next change once
    another machine took the lease; a journal object it uploads late (older epoch) is never used by restore. (The
    pause lasts one TTL in virtual time, tests/lease_time.py: the takeover's timing is tested above.)"""
    from lease_time import lease_time

    clock = lease_time(monkeypatch)
    url = s3_server.bucket()
    a = PositionStateManager(lcfg(tmp_path / "a", url, s3_server.url, ttl=3, replica_interval=3600), key=key)
    b = None
    try:
        a.set_position(pos("X/USDT"))
        assert a.flush_replica(30)
        a.set_position(pos("LATE/USDT"))  # acknowledged locally, not shipped yet (a long interval)
        lease = a._replica.lease  # type: ignore[union-attr]
        assert lease is not None
        lease._stop.set()  # the process "pauses": no more renewals
        clock.skip(3)  # ... for one TTL
        b, _ = _open_when_free(lcfg(tmp_path / "b", url, s3_server.url, ttl=30), key)
        with pytest.raises(LeaseLostError):
            a.set_position(pos("NOPE/USDT"))
        with pytest.raises(LeaseLostError):
            a.save()
        # What a PUT in flight when A paused would leave: A's unshipped journal bytes under A's epoch, late.
        c = client(url, s3_server.url)
        _, ranges, _ = _names.split(o.key for o in c.list())
        mine = max((r for r in ranges if r.epoch == 1), key=lambda r: r.end)
        data = (tmp_path / "a" / "positions.json.journal").read_bytes()
        from posstate.journal import format as jf

        end = jf.scan(data, jf.parse_header(data)).good_end
        late = data[mine.end : end]
        assert late
        c.put(_names.Range(mine.base_generation, mine.journal_id, mine.end, end, 1, mine.session, _names.digest(late)).key, late)
        b.set_position(pos("B/USDT"))
        assert b.flush_replica(30)
        assert lease.renew() is False and lease.lost  # A wakes: B's lease refuses its renewal, for good
    finally:
        a.close()
        if b is not None:
            b.close()
    cfg, _ = restore_into(tmp_path / "r", url, s3_server.url, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"X/USDT", "B/USDT"}


def test_a_renewal_refused_by_the_condition_means_the_lease_is_lost(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.4: another writer's conditional write to the lease makes the holder's next renewal fail: leaseLost,
    and every later change and save raises LeaseLostError."""
    url = s3_server.bucket()
    m = PositionStateManager(lcfg(tmp_path / "a", url, s3_server.url, ttl=30), key=key)
    try:
        lease = m._replica.lease  # type: ignore[union-attr]
        assert lease is not None
        c = client(url, s3_server.url)
        found = c.get_versioned(_names.LEASE)
        assert found is not None
        c.put_if(_names.LEASE, b'{"epoch": 7}', etag=found[1])  # someone else's write
        assert lease.renew() is False
        with pytest.raises(LeaseLostError, match="another writer took the lease"):
            m.set_position(pos("A/USDT"))
    finally:
        m.close()


def test_a_holder_whose_clock_is_behind_is_never_taken_over_while_it_renews(s3_server: Any) -> None:
    """issue 16.4 (wrong clock): a holder whose clock is an hour behind writes leases that look expired; a
    contender watches the lease for one TTL on its own clock, sees it renewed, and is refused."""
    url = s3_server.bucket()
    c = client(url, s3_server.url)
    holder = Lease(c, ttl=1.5, dir_id="a" * 32, clock=lambda: time.time() - 3600)
    holder.acquire()
    holder.start()
    try:
        contender = Lease(c, ttl=1.5, dir_id="b" * 32)
        with pytest.raises(StateLockedError, match="renewed while this process watched"):
            contender.acquire()
        assert holder.check() is None
    finally:
        holder.release()


def test_a_dead_holder_whose_clock_was_ahead_is_taken_over_after_one_ttl(s3_server: Any) -> None:
    """issue 16.4 (wrong clock): a dead holder's lease dated far in the future does not block a contender for
    that long: it watches one TTL on its own clock and takes the lease with the next epoch."""
    url = s3_server.bucket()
    c = client(url, s3_server.url)
    holder = Lease(c, ttl=1.0, dir_id="a" * 32, clock=lambda: time.time() + 3600)
    holder.acquire()  # never renewed: the holder "died"
    contender = Lease(c, ttl=1.0, dir_id="b" * 32)
    prev = contender.acquire()
    assert prev is not None and prev.epoch == 1 and contender.epoch == 2
    assert holder.renew() is False and holder.lost


def test_a_restart_on_the_same_directory_takes_the_lease_at_once(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.4: the same directory on the same host (its writer lock proves the old process is gone) takes its
    own expired lease back at once with the next epoch, and keeps its local state (no restore)."""
    url = s3_server.bucket()
    kid = _child(tmp_path / "m1", url, s3_server.url, key, ttl=300, n=3)
    try:
        assert kid.stdout is not None
        assert kid.stdout.readline().split() == ["ok", "1"]
        assert kid.stdout.readline().strip() == "flushed"
        os.kill(kid.pid, signal.SIGKILL)
        kid.wait(30)
    finally:
        _finish(kid)
    with PositionStateManager(lcfg(tmp_path / "m1", url, s3_server.url, ttl=300), key=key) as m:
        assert m.replica_status()["epoch"] == 2  # type: ignore[index]
        assert len(held(m)) == 3
        assert m._replica.restored is None  # type: ignore[union-attr]


class _FenceAfterArm:
    """A lease lost while a listing runs: after :meth:`arm` the first call (the loop's check) still sees the lease
    held, every later one (the listing's and the uploads' guard) sees it lost."""

    def __init__(self) -> None:
        self.calls = 0
        self.armed = False

    def arm(self) -> None:
        self.armed, self.calls = True, 0

    def __call__(self) -> str | None:
        if not self.armed:
            return None
        self.calls += 1
        return None if self.calls == 1 else "the lease was taken over by epoch 2"


def test_a_fenced_writer_logs_lease_lost_not_missing_objects(
    tmp_path: Path, key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """newcomer leftovers 5: a writer whose lease was taken over while it listed a replica that no longer holds its
    objects logs that it is fenced (lease lost), never "shipped objects are missing; shipping them again"."""
    import logging

    from posstate.replica.file import FileClient
    from posstate.replica.shipper import Shipper

    cfg = StateConfig.in_dir(tmp_path / "s", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A"))
        m.save()
        m.set_position(pos("B"))
    root = tmp_path / "rep"
    events: list[str] = []
    fence = _FenceAfterArm()
    shipper = Shipper(
        FileClient(f"file://{root}"),
        state_path=cfg.state_path,
        journal_path=cfg.journal_path,
        emit=lambda name, _data: events.append(name),
        fence=fence,
    )
    shipper.start()
    try:
        assert shipper.flush(30.0)
        for p in root.rglob("*"):  # the new holder's retention removed what this writer shipped
            if p.is_file():
                p.unlink()
        fence.arm()
        with caplog.at_level(logging.WARNING, logger="posstate"):
            assert not shipper.flush(30.0)
    finally:
        shipper.close(5.0)
    text = [r.getMessage() for r in caplog.records]
    assert shipper.fenced == "the lease was taken over by epoch 2"
    assert not any("shipped objects are missing" in t for t in text), text
    assert any("lease lost (the lease was taken over by epoch 2)" in t and "ships nothing" in t for t in text), text
    assert "replicaReseeded" not in events
    assert not [p for p in root.rglob("*") if p.is_file()]  # nothing shipped again
