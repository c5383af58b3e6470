"""Issue 16 attack: an S3 that lies or stops answering, credentials in URLs, hostile objects and names in the
replica (huge objects, floods of names, symlinks on a file:// replica)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _need_moto
from replica_util import Events, client, pos, rcfg

from posstate import ConfigError, PositionStateManager, ReplicaError, StateConfig
from posstate.replica import client as _client
from posstate.replica.file import FileClient


# ------------------------------------------------------------------ credentials
@pytest.mark.parametrize(
    "field,url",
    [
        pytest.param("replica_endpoint_url", "http://KEYID:SECRET@127.0.0.1:9", id="endpoint"),
        pytest.param("replica_url", "https://KEYID:SECRET@bucket.s3.amazonaws.com/p", id="https-url"),
        pytest.param("replica_url", "file://KEYID:SECRET@host/p", id="file-url"),
    ],
)
def test_credentials_in_a_replica_or_endpoint_url_are_refused_and_never_echoed(tmp_path: Path, field: str, url: str) -> None:
    """issue 16.1 attack: user:password in the endpoint URL (or any replica URL) is a ConfigError without them."""
    kw: dict[str, Any] = {"replica_url": "s3://bucket/p", field: url}
    with pytest.raises(ConfigError) as info:
        StateConfig.in_dir(tmp_path, **kw)
    assert "SECRET" not in str(info.value)


def test_credentials_in_an_endpoint_from_the_environment_never_reach_errors_logs_or_events(
    s3_server: Any, tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 16.1 attack: boto3's AWS_ENDPOINT_URL with user:password (not checked by posstate) that cannot be
    reached: the replicaLagging reason, the log and the ReplicaError mask the password."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://KEYID:SECRET@127.0.0.1:{port}")
    c = client(s3_server.bucket(), None)
    with pytest.raises(ReplicaError) as info:
        c.put("snapshots/x", b"x")
    assert "SECRET" not in str(info.value) and "127.0.0.1" in str(info.value)
    caplog.set_level(logging.DEBUG, logger="posstate")
    m = PositionStateManager(rcfg(tmp_path / "a", "s3://bucket/p", None), key=key)
    ev = Events(m, "replicaLagging")
    try:
        m.set_position(pos("A/USDT"))
        lag = ev.wait("replicaLagging")
        assert "SECRET" not in str(lag) and "SECRET" not in str(m.replica_status())
    finally:
        m.close()
    assert not [r for r in caplog.records if "SECRET" in r.getMessage()]
    assert logging.getLogger("botocore").level in (logging.NOTSET, logging.WARNING)  # posstate never turns it on


# ------------------------------------------------------------------ an S3 that lies
def test_an_sse_kms_style_etag_that_is_not_an_md5_does_not_fail_every_upload(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.2 attack: SSE-KMS/SSE-C buckets answer a PUT with a 32-hex ETag that is not the MD5: the upload is
    checked another way (Content-MD5 sent, then size and SHA-256 by HEAD), not refused for ever."""
    c = client(s3_server.bucket(), s3_server.url)
    real = c._s3.put_object  # type: ignore[attr-defined]
    sent: list[dict[str, Any]] = []

    def kms_put(**kw: Any) -> Any:
        sent.append(kw)
        return {**real(**kw), "ETag": '"' + "ab" * 16 + '"'}

    monkeypatch.setattr(c._s3, "put_object", kms_put)  # type: ignore[attr-defined]
    c.put("snapshots/kms", b"payload")
    assert c.get("snapshots/kms") == b"payload"
    assert sent[0].get("ContentMD5")


def test_an_upload_listed_with_another_size_is_an_error(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 16.2 attack: a 200 answer whose object is not what was sent (HEAD shows another size) is an error."""
    c = client(s3_server.bucket(), s3_server.url)
    real_put, real_head = c._s3.put_object, c._s3.head_object  # type: ignore[attr-defined]
    monkeypatch.setattr(c._s3, "put_object", lambda **kw: {**real_put(**kw), "ETag": '"x-2"'})  # type: ignore[attr-defined]
    monkeypatch.setattr(c._s3, "head_object", lambda **kw: {**real_head(**kw), "ContentLength": 1})  # type: ignore[attr-defined]
    with pytest.raises(ReplicaError, match="arrived damaged"):
        c.put("snapshots/bad", b"payload")


# ------------------------------------------------------------------ hostile objects and names
def test_a_huge_object_is_refused_before_it_is_read(s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 16.3 attack: an object larger than posstate ever writes is refused without reading it (S3, file)."""
    monkeypatch.setattr(_client, "MAX_OBJECT_BYTES", 1000)
    c = client(s3_server.bucket(), s3_server.url)
    c.put("snapshots/huge", b"x" * 5000)
    with pytest.raises(ReplicaError, match="more"):
        c.get("snapshots/huge")
    f = FileClient(f"file://{tmp_path}/rep")
    f.put("snapshots/huge", b"x" * 5000)
    with pytest.raises(ReplicaError):
        f.get("snapshots/huge")


def test_a_flood_of_names_is_refused_not_listed_into_memory(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.2 attack: a bucket flooded with objects: the listing stops with a ReplicaError past the bound."""
    monkeypatch.setattr(_client, "MAX_LISTED", 5)
    for c in (client(s3_server.bucket(), s3_server.url), FileClient(f"file://{tmp_path}/rep")):
        for i in range(7):
            c.put(f"junk/{i}", b"x")
        with pytest.raises(ReplicaError, match="more than 5 objects"):
            c.list()


def test_a_symlinked_folder_on_a_file_replica_is_never_written_through(tmp_path: Path) -> None:
    """issue 16.1 attack: journal/ replaced by a symlink to another directory: no object is written or deleted
    there (ReplicaError instead)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "journal").symlink_to(outside)
    (outside / "x").mkdir()
    (outside / "x" / "victim").write_bytes(b"keep")
    f = FileClient(f"file://{tmp_path}/rep")
    with pytest.raises(ReplicaError, match="symbolic link"):
        f.put("journal/x/planted", b"x")
    with pytest.raises(ReplicaError, match="symbolic link"):
        f.delete(["journal/x/victim"])
    assert sorted(p.name for p in (outside / "x").iterdir()) == ["victim"]


# ------------------------------------------------------------------ a replica that stops answering (SIGSTOP)
@pytest.fixture
def stoppable_s3() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """moto's S3 server in a process of its own, which the test may SIGSTOP (a replica that stops answering)."""
    _need_moto()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                threading.Event().wait(0.1)  # polling the port until the server listens
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(30)


def test_close_is_bounded_when_the_replica_stops_answering(
    stoppable_s3: tuple[subprocess.Popen[bytes], str], tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.6 attack: the S3 server SIGSTOPped under a lease holder: set_position never waits on it (the lag
    grows) and close() returns after its bounded wait instead of boto3's timeouts and retries."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    proc, endpoint = stoppable_s3
    import boto3

    boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket="stopped")
    cfg = rcfg(tmp_path / "a", "s3://stopped/p", endpoint, replica_lease=True, replica_lease_ttl=60, replica_close_timeout=1)
    m = PositionStateManager(cfg, key=key)
    ev = Events(m, "replicaClosed")
    m.set_position(pos("A/USDT"))
    assert m.flush_replica(30)
    os.kill(proc.pid, signal.SIGSTOP)
    for i in range(20):
        m.set_position(pos(f"B{i}/USDT"))  # the lease is valid for 45 s more: local changes go on
    closer = threading.Thread(target=m.close, daemon=True)
    closer.start()
    closer.join(20)  # boto3 alone would wait 2 x 20 s read timeouts on the lease release
    assert not closer.is_alive(), "close() waited on a replica that does not answer"
    assert ev.wait("replicaClosed", 1)["left_behind"]


def test_a_file_replica_conditional_write_is_never_broken_by_a_clock_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16.4 attack (wrong clock, file://): writer A paused inside its conditional write of the lease; writer
    B, whose clock is a minute ahead, must not break in and write too (both would hold the lease)."""
    url = f"file://{tmp_path}/rep"
    a, b = FileClient(url), FileClient(url)
    etag = a.put_if("lease.json", b"v0", etag=None)
    inside, resume = threading.Event(), threading.Event()
    real = FileClient.get_versioned

    def paused(key: str) -> Any:
        found = real(a, key)
        inside.set()
        resume.wait(30)  # A is paused (SIGSTOP) between its read and its write
        return found

    monkeypatch.setattr(a, "get_versioned", paused)
    results: dict[str, Any] = {}

    def run_a() -> None:
        try:
            results["a"] = a.put_if("lease.json", b"from a", etag=etag)
        except ReplicaError as exc:
            results["a"] = exc

    t = threading.Thread(target=run_a)
    t.start()
    assert inside.wait(30)
    monkeypatch.setattr(FileClient, "LOCK_WAIT", 1.0, raising=False)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 60)
    try:
        results["b"] = b.put_if("lease.json", b"from b", etag=etag)
    except ReplicaError as exc:
        results["b"] = exc
    resume.set()
    t.join(30)
    won = [k for k, v in results.items() if isinstance(v, str)]
    assert len(won) <= 1, f"both conditional writes succeeded: {results}"


def test_names_and_lease_text_from_the_bucket_never_reach_a_terminal_raw(s3_server: Any, tmp_path: Path, key: bytes) -> None:
    """issue 16.3 attack: an object name or a lease host holding a newline or an escape sequence (the bucket
    chooses them) is shown escaped: `replica list`/`verify` cannot be made to print a forged "ok" line, and a
    StateLockedError never carries terminal control characters."""
    from test_cli import run

    from posstate import StateLockedError
    from posstate.core.text import BAD_TEXT
    from posstate.replica import names as _names
    from posstate.replica.lease import Lease, LeaseRecord

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "a", url), key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
    (tmp_path / "rep" / "junk\x1b[2J\nok  forged: all fine").write_bytes(b"x")
    result = run(["replica", "list", url])
    assert "\nok  forged" not in result.output and "\x1b" not in result.output
    c = client(s3_server.bucket(), s3_server.url)
    rec = LeaseRecord(1, "evil\x1b[2J\nhost", 1, "e" * 32, "t", 600.0, time.time(), time.time() + 600)
    c.put(_names.LEASE, rec.to_bytes())
    with pytest.raises(StateLockedError) as info:
        Lease(c, ttl=600.0, dir_id="b" * 32).acquire()
    assert not BAD_TEXT.search(str(info.value)) and not BAD_TEXT.search(str(info.value.host))


@pytest.mark.parametrize("key", ["../../etc/x", "snapshots/../../x", "/etc/x", "snapshots//x", "./x"])
def test_a_file_replica_refuses_names_that_leave_its_folder(tmp_path: Path, key: str) -> None:
    """issue 16.1 attack: object names with path traversal never reach a path outside the replica's folder."""
    f = FileClient(f"file://{tmp_path}/rep")
    for call in (lambda: f.put(key, b"x"), lambda: f.get(key), lambda: f.delete([key]), lambda: f.put_if(key, b"x", etag=None)):
        with pytest.raises(ReplicaError, match="invalid object name"):
            call()
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x").exists()
