"""The library's `serve()` refuses the state's key as the bearer token, as `posstate serve --token-file` does:
every client would send the key in clear in each request (docs/SERVE.md, SECURITY.md T10)."""

from __future__ import annotations

from pathlib import Path

import pytest

import posstate
from posstate import PersistedAccountStateStore, PositionStateManager, ServeError, StateConfig
from posstate.storage.crypto import encode_key_text
from tests.serve_support import require

require("starlette", "uvicorn", "prometheus_client", "httpx")


def _token_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_manager_serve_refuses_its_key_as_the_token(tmp_path: Path, key: bytes) -> None:
    """`manager.serve(token_file=...)` with the key file's text as the token: ServeError, nothing served."""
    token = _token_file(tmp_path / "api.token", encode_key_text(key))
    with (
        PositionStateManager(StateConfig.in_dir(tmp_path / "s"), key=key) as m,
        pytest.raises(ServeError, match="holds the state's key"),
    ):
        m.serve(port=0, token_file=token)


def test_store_serve_refuses_its_managers_key_as_the_token(tmp_path: Path, key: bytes) -> None:
    """A persisted account store's `serve(token=...)` refuses its manager's key too."""
    with PositionStateManager(StateConfig.in_dir(tmp_path / "s"), key=key) as m:
        store = PersistedAccountStateStore(m)
        try:
            with pytest.raises(ServeError, match="holds the state's key"):
                store.serve(port=0, token=encode_key_text(key))
        finally:
            store.close()


def test_serve_state_refuses_the_environments_key_as_the_token(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve_state(StateConfig)` reads with the environment's key; that key is refused as the token."""
    key_file = _token_file(tmp_path / "k.key", encode_key_text(key))
    monkeypatch.setenv("POSSTATE_KEY_FILE", str(key_file))
    with pytest.raises(ServeError, match="holds the state's key"):
        posstate.serve_state(StateConfig.in_dir(tmp_path / "s"), port=0, token_file=key_file)


def test_a_separate_token_is_accepted(tmp_path: Path, key: bytes) -> None:
    """A token that is not the key serves as before (the check refuses only the key)."""
    token = _token_file(tmp_path / "api.token", "a-separate-token-of-enough-characters-0123456789")
    with PositionStateManager(StateConfig.in_dir(tmp_path / "s"), key=key) as m:
        server = m.serve(port=0, token_file=token)
        server.stop()
