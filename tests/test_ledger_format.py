"""Issue 17, point 9: the ledger's document parts (schemas/ledger.schema.json) and a state written by the current
main (tests/data/main_v1_state) loading unchanged, its order intents taken into the ledger by a pure migration."""

from __future__ import annotations

import copy
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from posstate import ExchangeAccountStateStore, Fill, PositionStateManager, StateConfig
from posstate.account import ledgerformat
from posstate.model.schema import schema

FIXTURE = Path(__file__).parent / "data" / "main_v1_state"
A, B, C = "psbf7aef8c6fabea5d7fdb93ca27a6e8", "ps1a947c63520f7606c0f9eecb0a697d", "psbd7273dfbb6775374004ad15b89c58"
BTC = "BTC/USDT:USDT"


def main_state(tmp_path: Path) -> StateConfig:
    """A copy of the state directory the current main wrote (see tests/data/main_v1_state/README.md)."""
    d = tmp_path / "state"
    d.mkdir()
    for f in ("positions.json", "positions.json.journal"):
        shutil.copyfile(FIXTURE / f, d / f)
        (d / f).chmod(0o600)
    return StateConfig.in_dir(d, encryption=False, backup_interval=1e9, durability="sync")


def ledger_of(m: PositionStateManager) -> dict[str, Any]:
    return {n: d for n, d in m.get_all_symbol_metadata().items() if ledgerformat.is_ledger_entry(n)}


def test_broken_entries_fail_the_schema_and_the_invariants(tmp_path: Path) -> None:
    """issue 17.9: an order entry missing its events, or holding a binary float, is refused by the schema and reported."""
    entries = {"__posstate_order__x": {"format": 1, "order": {"key": "x"}, "events": []}}
    assert list(jsonschema.Draft202012Validator(schema("ledger.schema.json")).iter_errors(entries))
    assert [v.code for v in ledgerformat.check(entries, {})] == ["malformed"]
    cfg = main_state(tmp_path)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        good = ledger_of(m)
        s.close()
    bad = copy.deepcopy(good)
    bad[f"__posstate_order__{B}"]["order"]["amount"] = 0.01
    assert list(jsonschema.Draft202012Validator(schema("ledger.schema.json")).iter_errors(bad))
    assert "binary_float" in {v.code for v in ledgerformat.check(bad, {})}


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param({"__posstate_lifecycles__": {"format": 1, "positions": ["x"]}}, id="lifecycles-list"),
        pytest.param({"__posstate_lifecycles__": {"format": 1, "positions": {"B|long": {"epoch": "1"}}}}, id="bad-lifecycle"),
        pytest.param({"__posstate_balances__": {"format": 1, "assets": {"USDT": {"total": "x"}}}}, id="bad-balance"),
        pytest.param({"__posstate_balances__": {"format": 2, "assets": {}}}, id="newer-format"),
        pytest.param({"__posstate_order__a": {"format": 1, "order": [], "events": {}}}, id="order-of-lists"),
    ],
)
def test_malformed_ledger_entries_are_reported_at_load(tmp_path: Path, entries: dict[str, Any]) -> None:
    """issue 17.7: a ledger entry of the wrong shape is reported (malformed) at load, never a builtin error."""
    cfg = StateConfig.in_dir(tmp_path / "s", encryption=False, backup_interval=1e9)
    with PositionStateManager(cfg) as m:
        for name, data in entries.items():
            m.set_symbol_metadata(name, data)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        assert [v.code for v in s.violations] == ["malformed"]
        assert s.readiness()["ledger"] == "invariant_violation"
        s.close()


def test_state_from_current_main_loads_unchanged(tmp_path: Path) -> None:
    """issue 17.9: positions and metadata written by the current main load unchanged; its order intents become
    ledger orders (recorded -> unknown, sent -> accepted, filled -> filled); the legacy entry stays as it was."""
    cfg = main_state(tmp_path)
    with PositionStateManager(cfg) as m:
        before = m.get_all_symbol_metadata()
        positions = m.get_positions()
    p = positions[(BTC, "long")]
    assert (p.contracts, p.entry_price, p.leverage) == (Decimal("0.010"), Decimal("90994.06"), Decimal("10"))
    assert before[BTC] == {"entries_long": 2, "trail": {"armed": True}}
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        assert {o.key: o.status for o in s.get_ledger_orders()} == {A: "unknown", B: "accepted", C: "filled"}
        assert s.readiness()["open_orders"] == "submission_unknown" and s.violations == ()
        assert m.get_symbol_metadata("__posstate_orders__") == before["__posstate_orders__"]
        assert m.get_positions() == positions and m.get_symbol_metadata(BTC) == before[BTC]
        life = s.position_lifecycle(BTC, "long")
        assert (life["epoch"], life["state"]) == (1, "open")
        s.apply_fill(Fill(trade_id="t1", order_id="4101560001", price=95000, amount="0.004"))  # the take-profit fills in part
        held = s.get_active_position(BTC, "long")
        assert held is not None and held.contracts == Decimal("0.006") and held.leverage == Decimal("10")
        entries = ledger_of(m)
        s.close()
    jsonschema.Draft202012Validator(schema("ledger.schema.json")).validate(entries)
    with PositionStateManager(cfg) as m:  # migrated once: a second start writes nothing more
        s = ExchangeAccountStateStore(m)
        assert ledger_of(m) == entries
        s.close()


def test_migration_is_pure(tmp_path: Path) -> None:
    """issue 17.9: migrate_intents changes nothing it is given, gives the same result twice, and skips migrated ones."""
    cfg = main_state(tmp_path)
    with PositionStateManager(cfg) as m:
        metadata = m.get_all_symbol_metadata()
    frozen = copy.deepcopy(metadata)
    first = ledgerformat.migrate_intents(metadata, now=1)
    assert metadata == frozen and ledgerformat.migrate_intents(metadata, now=1) == first
    assert sorted(first) == sorted(ledgerformat.order_entry_name(k) for k in (A, B, C))
    assert ledgerformat.migrate_intents({**metadata, **first}, now=1) == {}
    assert ledgerformat.check(first, {}) == []


@pytest.mark.parametrize("durability", ["sync", "snapshot"])
def test_full_ledger_matches_schema(tmp_path: Path, durability: str) -> None:
    """issue 17.9: every entry the store writes (orders with folded fills, lifecycles, balances) matches the schema."""
    cfg = StateConfig.in_dir(tmp_path / "s", encryption=False, backup_interval=1e9, durability=durability)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        o = s.record_order_intent(strategy="a", signal="1", symbol=BTC, side="buy", type="limit", amount="40", price="1")
        s.record_order_sent(o.key)
        s.record_order_accepted(o.key, exchange_order_id="9")
        for i in range(40):
            s.apply_fill(Fill(trade_id=str(i), order_id="9", price="1.5", amount=1, fee="0.001", fee_currency="USDT"))
        s.set_open_orders([{"id": "77", "symbol": BTC, "side": "sell", "amount": 1, "price": 2, "status": "open"}])
        s.set_balances({"USDT": {"free": 1, "used": 0, "total": 1}})
        s.set_positions([])
        entries = ledger_of(m)
        s.close()
    assert len(entries) == 4
    jsonschema.Draft202012Validator(schema("ledger.schema.json")).validate(entries)
    assert json.loads(json.dumps(entries)) == entries
