"""Issue 16: continuous encrypted replication to S3 (moto's server over HTTP) and file://, restore anywhere."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from replica_util import Events, client, held, pos, rcfg, restore_into

from posstate import ConfigError, CorruptStateError, PositionStateManager, StateConfig, WrongKeyError, generate_key
from posstate.replica import names as _names
from posstate.replica.file import FileClient
from posstate.storage import fileops as fs


# ------------------------------------------------------------------ 16.1 configuration (failure paths first)
def test_s3_url_without_boto3_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """issue 16.1: without boto3 an s3:// replica URL is a ConfigError that says `pip install posstate[s3]`."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install posstate\[s3\]"):
        StateConfig.in_dir(tmp_path, replica_url="s3://bucket/prefix")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("s3://KEYID:SECRET@bucket/p", id="credentials"),
        pytest.param("ftp://host/p", id="scheme"),
        pytest.param("file://relative/p", id="relative-file"),
        pytest.param("s3:///p", id="no-bucket"),
    ],
)
def test_bad_replica_urls_are_refused(tmp_path: Path, url: str) -> None:
    """issue 16.1: a URL posstate cannot ship to (or one holding credentials) is refused, never echoing a secret."""
    with pytest.raises(ConfigError) as info:
        StateConfig.in_dir(tmp_path, replica_url=url)
    assert "SECRET" not in str(info.value)


def test_replica_lease_needs_a_url(tmp_path: Path) -> None:
    """issue 16.4: replica_lease=True without a replica URL is a ConfigError."""
    with pytest.raises(ConfigError, match="replica_url"):
        StateConfig.in_dir(tmp_path, replica_lease=True)


# ------------------------------------------------------------------ 16.2 shipping: failure paths
def test_replica_down_mid_stream_grows_the_lag_and_resumes(own_s3: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.2: a replica that goes down never fails a local update: the lag grows (replicaLagging, status),
    and shipping resumes once it is back; a restore then holds every change."""
    url = own_s3.bucket()
    m = PositionStateManager(rcfg(tmp_path / "a", url, own_s3.url), key=key)
    ev = Events(m, "replicaLagging", "replicaResumed")
    try:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        own_s3.stop()
        for i in range(20):
            m.set_position(pos(f"B{i}/USDT"))  # never raises: local durability first
        m.save()
        lag = ev.wait("replicaLagging")
        assert lag["records"] >= 0 and lag["reason"]
        status = m.replica_status()
        assert status is not None and status["failing"]
        assert not m.flush_replica(0.5)
        own_s3.start()
        assert m.flush_replica(60)
        ev.wait("replicaResumed")
        assert m.replica_status()["records_behind"] == 0  # type: ignore[index]
        m.set_position(pos("C/USDT"))
        assert m.flush_replica(30)
    finally:
        m.close()
    cfg, _ = restore_into(tmp_path / "b", url, own_s3.url, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT", "C/USDT", *(f"B{i}/USDT" for i in range(20))}


def test_a_partial_upload_is_never_listed(s3_server: Any) -> None:
    """issue 16.2: an upload cut off mid-body (the connection dies) leaves no object the replica lists."""
    url = s3_server.bucket()
    bucket = url[5:].split("/")[0]
    with socket.create_connection(("127.0.0.1", s3_server.port)) as sock:
        sock.sendall(
            f"PUT /{bucket}/bot/snapshots/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4096\r\n\r\n".encode() + b"x" * 100
        )
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)  # the server answers (an error) once it sees the body end short
    assert client(url, s3_server.url).list() == []


class _FailingFsync(fs.FileOps):
    """fsync fails for files under *root* (a mounted replica disk that errors mid-upload)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.armed = True

    def fsync(self, fd: int) -> None:
        if self.armed and str(Path(f"/proc/self/fd/{fd}").readlink()).startswith(self.root):
            raise OSError(errno.EIO, "injected")
        super().fsync(fd)


def test_file_replica_failed_upload_leaves_no_listed_object_and_is_retried(tmp_path: Path, key: bytes) -> None:
    """issue 16.2: file://, an upload failing at fsync leaves only a temp (never listed); the next pass ships it."""
    root = tmp_path / "mnt"
    ops = _FailingFsync(root)
    with fs.use(ops):
        m = PositionStateManager(rcfg(tmp_path / "a", f"file://{root}/p"), key=key)
        ev = Events(m, "replicaLagging")
        try:
            m.set_position(pos("A/USDT"))
            m.save()
            ev.wait("replicaLagging")
            assert FileClient(f"file://{root}/p").list() == []
            ops.armed = False
            assert m.flush_replica(30)
        finally:
            m.close()
    keys = [o.key for o in FileClient(f"file://{root}/p").list()]
    assert any(k.startswith("snapshots/") for k in keys)


def test_shipping_never_runs_on_the_callers_thread(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 16.2: uploads run on the shipper thread; a replica that hangs never blocks set_position or save."""
    release = threading.Event()
    threads: list[str] = []
    real_put = FileClient.put

    def slow_put(self: FileClient, k: str, data: bytes) -> None:
        threads.append(threading.current_thread().name)
        release.wait(30)
        real_put(self, k, data)

    monkeypatch.setattr(FileClient, "put", slow_put)
    m = PositionStateManager(rcfg(tmp_path / "a", f"file://{tmp_path}/rep"), key=key)
    try:
        for i in range(10):
            m.set_position(pos(f"A{i}/USDT"))
        m.save()  # returns although every upload hangs
        release.set()
        assert m.flush_replica(30)
    finally:
        m.close()
    assert threads and set(threads) == {"posstate-replica"}


def test_journal_ranges_are_batched(tmp_path: Path, key: bytes) -> None:
    """issue 16.2: many updates within one interval become one journal object, not one per update."""
    url = f"file://{tmp_path}/rep"
    m = PositionStateManager(rcfg(tmp_path / "a", url, replica_interval=3600), key=key)
    try:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        for i in range(200):
            m.set_position(pos(f"B{i}/USDT"))
        assert m.flush_replica(30)
    finally:
        m.close()
    _, ranges, _ = _names.split(o.key for o in client(url).list())
    assert len(ranges) <= 3


# ------------------------------------------------------------------ attacker with write access to the bucket
def _ship_some(tmp_path: Path, url: str, endpoint: str | None, key: bytes) -> None:
    with PositionStateManager(rcfg(tmp_path / "a", url, endpoint), key=key) as m:
        m.set_position(pos("A/USDT"))
        m.save()
        for i in range(5):
            m.set_position(pos(f"B{i}/USDT", i + 1))
        assert m.flush_replica(30)


def test_a_changed_object_in_the_bucket_is_refused_by_restore(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: a byte flipped in a journal object (bucket write access, no key) fails restore, naming it."""
    url = s3_server.bucket()
    _ship_some(tmp_path, url, s3_server.url, key)
    c = client(url, s3_server.url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    victim = ranges[-1]
    data = bytearray(c.get(victim.key))
    data[-3] ^= 0x01
    c.put(victim.key, bytes(data))
    with pytest.raises(CorruptStateError, match="changed or damaged after upload") as info:
        restore_into(tmp_path / "b", url, s3_server.url, key)
    assert victim.key in str(info.value)
    assert not (tmp_path / "b" / "positions.json").exists()


def test_a_forged_object_with_a_matching_name_fails_authentication(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: an attacker who renames a changed journal object to its new digest still fails: every record is
    authenticated with the key, so restore refuses it (nothing written)."""
    url = s3_server.bucket()
    _ship_some(tmp_path, url, s3_server.url, key)
    c = client(url, s3_server.url)
    _, ranges, _ = _names.split(o.key for o in c.list())
    victim = ranges[-1]
    data = bytearray(c.get(victim.key))
    data[-3] ^= 0x01
    forged = dataclasses.replace(victim, digest=_names.digest(bytes(data)))
    c.delete([victim.key])
    c.put(forged.key, bytes(data))
    with pytest.raises(CorruptStateError):
        restore_into(tmp_path / "b", url, s3_server.url, key)
    assert not (tmp_path / "b" / "positions.json").exists()


def test_a_planted_snapshot_of_a_later_epoch_is_refused(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: a snapshot written with another key (or in plaintext) under a newer epoch name is refused with
    WrongKeyError (CLI exit 3), never restored as the newest state."""
    url = s3_server.bucket()
    _ship_some(tmp_path, url, s3_server.url, key)
    other = generate_key()
    with PositionStateManager(StateConfig.in_dir(tmp_path / "evil"), key=other) as m:
        m.set_position(pos("EVIL/USDT"))
        m.save()
    data = (tmp_path / "evil" / "positions.json").read_bytes()
    c = client(url, s3_server.url)
    c.put(_names.Snapshot(999, 99, 1, _names.digest(data)).key, data)
    with pytest.raises(WrongKeyError):
        restore_into(tmp_path / "b", url, s3_server.url, key)


# ------------------------------------------------------------------ 16.3 restore anywhere
def test_restore_on_a_fresh_directory_continues_replicating_without_gaps(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: a restored directory goes on replicating to the same URL, and a second restore holds the
    changes made after the first (litestream's restored-then-silent bug)."""
    url = s3_server.bucket()
    _ship_some(tmp_path, url, s3_server.url, key)
    cfg, result = restore_into(tmp_path / "b", url, s3_server.url, key)
    assert result.records == 5
    with PositionStateManager(cfg, key=key) as m:
        assert len(held(m)) == 6
        m.set_position(pos("AFTER/USDT"))
        m.delete_position("A/USDT", "long")
        assert m.flush_replica(30)
    cfg2, _ = restore_into(tmp_path / "c", url, s3_server.url, key)
    with PositionStateManager(StateConfig.in_dir(cfg2.state_dir), key=key) as r:
        assert "AFTER/USDT" in held(r) and "A/USDT" not in held(r)


def test_restore_refuses_a_directory_that_holds_state(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: restore writes only into an empty directory (nothing is overwritten)."""
    url = s3_server.bucket()
    _ship_some(tmp_path, url, s3_server.url, key)
    with pytest.raises(CorruptStateError, match="not empty"):
        restore_into(tmp_path / "a", url, s3_server.url, key)


def test_restore_at_a_generation(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3: --at GENERATION restores the state as of that generation (snapshot + journal cut there)."""
    url = s3_server.bucket()
    with PositionStateManager(rcfg(tmp_path / "a", url, s3_server.url), key=key) as m:
        m.set_position(pos("A/USDT"))
        m.save()
        m.set_position(pos("B/USDT"))
        at = m.generation
        m.set_position(pos("C/USDT"))
        assert m.flush_replica(30)
    cfg, result = restore_into(tmp_path / "b", url, s3_server.url, key, at_generation=at)
    assert result.generation == at
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT", "B/USDT"}


def test_bucket_emptied_under_a_running_bot_is_reported_and_reseeded(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.2: objects that vanish from the replica are reported (replicaReseeded) and shipped again."""
    url = s3_server.bucket()
    m = PositionStateManager(rcfg(tmp_path / "a", url, s3_server.url), key=key)
    ev = Events(m, "replicaReseeded")
    try:
        m.set_position(pos("A/USDT"))
        m.save()
        m.set_position(pos("B/USDT"))
        assert m.flush_replica(30)
        c = client(url, s3_server.url)
        c.delete([o.key for o in c.list()])
        m.set_position(pos("C/USDT"))
        assert m.flush_replica(30)
        assert ev.wait("replicaReseeded")["missing"]
    finally:
        m.close()
    cfg, _ = restore_into(tmp_path / "b", url, s3_server.url, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT", "B/USDT", "C/USDT"}


@pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
def test_file_replica_round_trip(tmp_path: Path, key: bytes, durability: str) -> None:
    """issue 16.1: file:// shares the ReplicaClient interface: ship, restore, continue, in every durability mode."""
    url = f"file://{tmp_path}/mnt/prefix"
    with PositionStateManager(rcfg(tmp_path / "a", url, durability=durability), key=key) as m:
        for i in range(6):
            m.set_position(pos(f"B{i}/USDT", i + 1))
        if durability == "snapshot":
            m.save()
        assert m.flush_replica(30)
        want = held(m)
    cfg, result = restore_into(tmp_path / "b", url, None, key)
    assert result.generation > 0
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert held(r) == want


# ------------------------------------------------------------------ 16.5 retention, 16.6 flush and close
def test_replica_retention_keeps_max_backups_snapshots_and_their_journals(tmp_path: Path, key: bytes) -> None:
    """issue 16.5: the shipper prunes the replica with the local keep rules (max_backups) after a new snapshot."""
    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url, max_backups=2), key=key) as m:
        for i in range(5):
            m.set_position(pos(f"A{i}/USDT"))
            m.save()
            assert m.flush_replica(30)
        m.set_position(pos("LAST/USDT"))
        assert m.flush_replica(30)
    snaps, ranges, _ = _names.split(o.key for o in client(url).list())
    assert len(snaps) == 2
    assert {r.base_generation for r in ranges} <= {s.generation for s in snaps}
    cfg, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=key) as r:
        assert "LAST/USDT" in held(r)


def test_close_says_what_it_left_behind(own_s3: Any, tmp_path: Path, key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """issue 16.6: close() flushes with a bounded wait and says (log, replicaClosed event) what it left behind."""
    url = own_s3.bucket()
    m = PositionStateManager(rcfg(tmp_path / "a", url, own_s3.url, replica_close_timeout=0.5), key=key)
    ev = Events(m, "replicaClosed")
    m.set_position(pos("A/USDT"))
    assert m.flush_replica(30)
    own_s3.stop()
    m.set_position(pos("B/USDT"))
    m.close()
    left = ev.wait("replicaClosed")["left_behind"]
    assert left and "1 journal records" in left
    assert any("replication behind" in r.getMessage() for r in caplog.records)


def test_flush_replica_without_a_replica_returns_at_once(tmp_path: Path, key: bytes) -> None:
    """issue 16.6: flush_replica() on a manager without replica_url is True at once; replica_status() is None."""
    with PositionStateManager(StateConfig.in_dir(tmp_path), key=key) as m:
        assert m.flush_replica() is True
        assert m.replica_status() is None


def test_restore_with_the_wrong_key_writes_nothing(tmp_path: Path, key: bytes) -> None:
    """issue 16.3: a restore with another key fails (WrongKeyError) before anything is written."""
    url = f"file://{tmp_path}/rep"
    _ship_some(tmp_path, url, None, key)
    with pytest.raises(WrongKeyError):
        restore_into(tmp_path / "b", url, None, generate_key())
    assert not (tmp_path / "b" / "positions.json").exists()


def test_a_record_the_local_disk_lost_is_superseded_by_the_restarted_writer(tmp_path: Path, key: bytes) -> None:
    """issue 16.2: a power loss takes the last record from the local journal while the replica already holds it;
    the restarted writer ships its own bytes from there under a new session, and a restore follows it."""
    from posstate.journal import format as jf

    url = f"file://{tmp_path}/rep"
    cfg = rcfg(tmp_path / "a", url)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        data = cfg.journal_path.read_bytes()
        cut = jf.scan(data, jf.parse_header(data)).good_end
        m.set_position(pos("LOST/USDT"))
        assert m.flush_replica(30)
    with cfg.journal_path.open("r+b") as fh:  # the power loss: the last record never reached the disk
        fh.truncate(cut)
    with PositionStateManager(cfg, key=key) as m:
        assert "LOST/USDT" not in held(m)
        m.set_position(pos("AFTER/USDT"))
        assert m.flush_replica(30)
    _, ranges, _ = _names.split(o.key for o in client(url).list())
    assert len({r.session for r in ranges}) == 2
    restored, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(restored.state_dir), key=key) as r:
        assert set(held(r)) == {"A/USDT", "AFTER/USDT"}


def test_an_upload_whose_etag_differs_from_what_was_sent_is_an_error(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 16.2: each S3 upload is checked after the PUT: an ETag that is not the MD5 sent (it may be an SSE-KMS
    one) sends a HEAD, and an object whose SHA-256 there differs is a ReplicaError, so the shipper retries it."""
    from posstate import ReplicaError
    from posstate.replica.s3 import S3Client

    c = client(s3_server.bucket(), s3_server.url)
    assert isinstance(c, S3Client)
    c.put("snapshots/ok", b"payload")  # a real PUT passes its check
    real, head = c._s3.put_object, c._s3.head_object
    monkeypatch.setattr(c._s3, "put_object", lambda **kw: {**real(**kw), "ETag": '"' + "0" * 32 + '"'})
    monkeypatch.setattr(c._s3, "head_object", lambda **kw: {**head(**kw), "Metadata": {"sha256": "0" * 64}})
    with pytest.raises(ReplicaError, match="arrived damaged"):
        c.put("snapshots/bad", b"payload")


def test_boto3_is_imported_only_for_an_s3_replica(tmp_path: Path) -> None:
    """issue 16.1: boto3 is optional and loaded lazily: a manager with a file:// replica never imports it."""
    import subprocess
    import sys

    code = (
        "import sys; from posstate import PositionStateManager, StateConfig, generate_key; "
        f"cfg = StateConfig.in_dir({str(tmp_path)!r}, replica_url='file://{tmp_path}/rep'); "
        "m = PositionStateManager(cfg, key=generate_key()); m.save(); assert m.flush_replica(30); m.close(); "
        "print([n for n in sys.modules if n.split('.')[0] in ('boto3', 'botocore')])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_a_state_file_damaged_on_disk_is_never_shipped(tmp_path: Path, key: bytes) -> None:
    """issue 16.2: a state file whose keyless checksum fails (bit rot) is not uploaded over a good replica: the
    replica keeps the last good snapshot, and a restore still succeeds."""
    from posstate.replica.local import read_local

    url = f"file://{tmp_path}/rep"
    _ship_some(tmp_path, url, None, key)
    state = tmp_path / "a" / "positions.json"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    assert read_local(state, state.with_name("positions.json.journal")).snapshot is None
    restored, _ = restore_into(tmp_path / "b", url, None, key)
    with PositionStateManager(StateConfig.in_dir(restored.state_dir), key=key) as r:
        assert len(held(r)) == 6
