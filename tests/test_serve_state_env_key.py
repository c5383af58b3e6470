"""``posstate.serve_state(StateConfig)`` reads an encrypted directory with the key the environment names
(POSSTATE_KEY, POSSTATE_KEY_FILE, POSSTATE_PASSPHRASE), as a manager built from the same config would; found
following docs/SERVE.md as a newcomer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from posstate import PositionStateManager, StateConfig
from tests.conftest import write_key
from tests.serve_support import pos, require, serving

require("starlette", "uvicorn", "prometheus_client", "httpx")

import httpx  # noqa: E402


def _health_once(server: Any, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """/api/health once *done* holds for it (a hang guard of 20 s, not a timing assertion)."""
    deadline = time.monotonic() + 20
    while True:
        body: dict[str, Any] = httpx.get(server.url + "/api/health").json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def _read(body: dict[str, Any]) -> bool:
    return "the state has not been read yet" not in body["reasons"]


def _no_key(body: dict[str, Any]) -> bool:
    return any("no key was supplied" in r for r in body["reasons"])


def test_serve_state_of_a_config_uses_the_environment_key(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/SERVE.md serve_state: a StateConfig target reads its encrypted state with POSSTATE_KEY_FILE."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        m.set_position(pos("BTC/USDT"))
        m.save()
    monkeypatch.delenv("POSSTATE_KEY", raising=False)
    monkeypatch.delenv("POSSTATE_PASSPHRASE", raising=False)
    monkeypatch.setenv("POSSTATE_KEY_FILE", str(write_key(tmp_path / "bot.key", key)))
    with serving(cfg) as server:
        health = _health_once(server, _read)
        assert health["ready"] is True, health["reasons"]
        assert list(httpx.get(server.url + "/api/positions").json()["positions"]) == ["BTC/USDT|long"]


def test_serve_state_of_a_config_without_any_key_says_so(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/SERVE.md serve_state: with no key anywhere the health names the missing key (503), as before."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        m.save()
    for name in ("POSSTATE_KEY", "POSSTATE_KEY_FILE", "POSSTATE_PASSPHRASE"):
        monkeypatch.delenv(name, raising=False)
    with serving(cfg) as server:
        health = _health_once(server, _no_key)
        assert health["ready"] is False
        assert _no_key(health), health["reasons"]
