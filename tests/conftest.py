"""Shared fixtures: a key, a config in a temp state directory, and a manager factory (closed at teardown)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from posstate import PositionStateManager, StateConfig, generate_key

_KEY_ENV = ("POSSTATE_KEY", "POSSTATE_KEY_FILE", "POSSTATE_PASSPHRASE")


# No per-example deadline: a loaded CI machine must not turn a slow example into a failure. Examples stay
# random (a failure they find is a real bug, reported with its reproduction blob).
settings.register_profile("posstate", deadline=None, print_blob=True)
settings.load_profile("posstate")


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a key or a state directory from the developer's environment."""
    for name in _KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("POSSTATE_DIR", raising=False)  # StateConfig() reads it (issue 15.1)


@pytest.fixture
def key() -> bytes:
    return generate_key()


def write_key(path: Path, key: bytes) -> Path:
    """Store *key* as base64 in a 0600 file, as `posstate keygen --out` does."""
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path, key: bytes) -> Path:
    return write_key(tmp_path / "k.key", key)


@pytest.fixture
def cfg(tmp_path: Path) -> StateConfig:
    return StateConfig.in_dir(tmp_path / "state")


@pytest.fixture
def manager(cfg: StateConfig, key: bytes) -> Iterator[Callable[..., PositionStateManager]]:
    """``manager(config=None, **kw)``: a PositionStateManager on ``cfg`` with ``key`` unless overridden."""
    made: list[PositionStateManager] = []

    def make(config: StateConfig | None = None, **kw: Any) -> PositionStateManager:
        if "passphrase" not in kw:
            kw.setdefault("key", key)
        m = PositionStateManager(config if config is not None else cfg, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _journal_records(path: Path) -> bytes:
    from posstate.journal import format as jf

    data = path.read_bytes()
    return data[: jf.scan(data, jf.parse_header(data)).good_end]


@pytest.fixture
def journal_records() -> Callable[[Path], bytes]:
    """A journal file's bytes up to the end of its last record, without the zeros written ahead of it
    (tests that cut or flip "the last bytes" mean the last record's, not the padding's)."""
    return _journal_records


# ------------------------------------------------------------------ issue 16: a real S3 API over HTTP (moto's server)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need_moto() -> None:
    """moto[server] and boto3 must be installed; under POSSTATE_CI=1 their absence fails rather than skips."""
    import importlib.util
    import os

    missing = [m for m in ("boto3", "moto") if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("POSSTATE_CI") == "1":
            pytest.fail(f"{', '.join(missing)} not installed; CI needs them (pip install -e .[test])")
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e .[test])")


class S3Server:
    """moto's S3 server on 127.0.0.1 (``ThreadedMotoServer``), stoppable and restartable on its port; its
    buckets live in this process, so a restart keeps them (a service that comes back)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.url)

    def bucket(self) -> str:
        """A fresh bucket; its s3:// URL (with a prefix)."""
        import secrets

        name = f"posstate-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}/bot"


_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server per session, over HTTP on a free port; fake credentials in the environment."""
    _need_moto()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _S3_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        server = S3Server()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    """A moto S3 server of this test alone, which the test may stop and start again (the replica down)."""
    _need_moto()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _S3_ENV.items():
            mp.setenv(k, v)
        server = S3Server()
        server.start()
        try:
            yield server
        finally:
            server.stop()
