"""Helpers of the replica tests (issue 16): configs, positions, restores, event waits."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate import Position, PositionStateManager, StateConfig
from posstate.replica.client import ReplicaClient
from posstate.replica.clients import open_client
from posstate.replica.restore import RestoreResult, restore
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def rcfg(state_dir: Path, url: str, endpoint: str | None = None, **kw: Any) -> StateConfig:
    kw.setdefault("replica_interval", 0.2)
    return StateConfig.in_dir(state_dir, replica_url=url, replica_endpoint_url=endpoint, **kw)


def client(url: str, endpoint: str | None = None) -> ReplicaClient:
    return open_client(url, endpoint_url=endpoint)


def options(key: bytes) -> ReadOptions:
    return ReadOptions(keyring=Keyring(key=key), require_encryption=True)


def restore_into(state_dir: Path, url: str, endpoint: str | None, key: bytes, **kw: Any) -> tuple[StateConfig, RestoreResult]:
    cfg = rcfg(state_dir, url, endpoint)
    return cfg, restore(client(url, endpoint), cfg, options=options(key), **kw)


def held(m: PositionStateManager) -> dict[str, int]:
    return {sym: int(p.contracts) for (sym, _), p in m.get_positions().items()}


class Events:
    """Collects a manager's events; :meth:`wait` blocks on a condition, never on a sleep."""

    def __init__(self, m: PositionStateManager, *names: str) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        for name in names:
            m.on(name, lambda e, name=name: self._add(name, e))

    def _add(self, name: str, e: dict[str, Any]) -> None:
        with self._cond:
            self.seen.append((name, e))
            self._cond.notify_all()

    def wait(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: any(n == name for n, _ in self.seen), timeout), f"no {name} event"
            return next(e for n, e in self.seen if n == name)

    def names(self) -> list[str]:
        with self._cond:
            return [n for n, _ in self.seen]


def two_histories(cfg: StateConfig, key: bytes, lost: list[str], new: list[str]) -> tuple[int, int]:
    """Two histories of one journal from one offset: A/USDT, then *lost*, shipped one range per record; the local
    journal cut back before *lost* (those records never reached the disk after shipping, or a restore --at came
    before them); a second session writes *new* from there, one range per record. Returns the offset cut at and
    the generation of *new*'s first record (that of *lost*'s first too)."""
    from posstate.journal import format as jf

    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A/USDT"))
        assert m.flush_replica(30)
        data = cfg.journal_path.read_bytes()
        cut = jf.scan(data, jf.parse_header(data)).good_end
        for symbol in lost:
            m.set_position(pos(symbol))
            assert m.flush_replica(30)
    with cfg.journal_path.open("r+b") as fh:
        fh.truncate(cut)
    generations = []
    with PositionStateManager(cfg, key=key) as m:
        for symbol in new:
            m.set_position(pos(symbol))
            generations.append(m.generation)
            assert m.flush_replica(30)
    return cut, generations[0]
