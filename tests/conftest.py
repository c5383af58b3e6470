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
