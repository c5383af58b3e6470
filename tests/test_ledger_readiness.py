"""Issue 17, points 6 and 7: readiness after a start, restore or recovery, open-order reconciliation, and the
ledger invariants checked at load and at restore (reported by events and by ``posstate validate``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from posstate import ExchangeAccountStateStore, Position, PositionStateManager, StateConfig, generate_key
from posstate.cli.main import cli
from tests.conftest import write_key

DATA = json.loads((Path(__file__).parent / "data" / "ccxt_ledger.json").read_text())
BN = DATA["binance"]
BTC = BN["symbol"]
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


class Clock:
    def __init__(self) -> None:
        self.t = 1_763_700_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@pytest.fixture
def key() -> bytes:
    return generate_key()


@pytest.fixture
def cfg(tmp_path: Path) -> StateConfig:
    return StateConfig.in_dir(tmp_path / "state", backup_interval=1e9, durability="sync")


def opened(cfg: StateConfig, key: bytes) -> Iterator[ExchangeAccountStateStore]:
    with PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        yield s
        s.close()


def with_cid(payload: Any, cid: str) -> Any:
    return json.loads(json.dumps(payload).replace('"CID"', json.dumps(cid)))


def entry(s: ExchangeAccountStateStore, signal: str = "e1") -> str:
    return s.record_order_intent(
        strategy="grid", signal=signal, symbol=BTC, side="buy", type="limit", amount="0.010", price="91000"
    ).key


def reconcile_all(s: ExchangeAccountStateStore, open_orders: list[Any], **kw: Any) -> Any:
    s.set_positions(BN["positions_flat"])
    s.set_balances(BN["balance"])
    return s.set_open_orders(open_orders, **kw)


def cli_run(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, env=CLEAN_ENV, catch_exceptions=False)


# ------------------------------------------------------------------------------------------------ failure paths first


def test_crash_between_sent_and_answer_reconciled_by_client_id(cfg: StateConfig, key: bytes) -> None:
    """issue 17.6: the process ended after record_order_sent; the restarted bot sees unknown, is not ready, finds the
    order by client id in fetch_open_orders, and may not send it again."""
    for s in opened(cfg, key):
        cid = entry(s)
        s.record_order_sent(cid)  # then the process dies before the exchange answers
    for s in opened(cfg, key):
        assert [o.key for o in s.unknown_orders()] == [cid]
        assert not s.ready_to_trade()
        assert s.readiness() == {"positions": "startup", "open_orders": "submission_unknown", "balances": "startup"}
        with pytest.raises(Exception, match="never send it again"):
            s.record_order_sent(cid)
        report = reconcile_all(s, with_cid(BN["open_orders_partial"], cid))
        assert report.found == (cid,) and report.adopted == ()
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "partially_filled" and o.exchange_order_id == "4101559840"
        assert s.ready_to_trade() and s.readiness() == {}


def test_unknown_submission_not_found_is_rejected(cfg: StateConfig, key: bytes) -> None:
    """issue 17.6: an unknown submission absent from open and closed orders (checked by client id) never arrived."""
    for s in opened(cfg, key):
        cid = entry(s)
        s.record_order_sent(cid)
        s.record_order_status_unknown(cid, reason="DNS failure")
        report = reconcile_all(s, [])
        assert report.unresolved == (cid,) and not s.ready_to_trade()  # nobody looked it up yet
        report = s.set_open_orders([], closed_orders=[])
        assert report.not_found == (cid,)
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "rejected" and s.ready_to_trade()


def test_order_closed_while_down(cfg: StateConfig, key: bytes) -> None:
    """issue 17.6: an order we think open that the exchange filled while the bot was down takes its final status."""
    for s in opened(cfg, key):
        cid = entry(s)
        s.record_order_sent(cid)
        s.record_order_accepted(cid, order=with_cid(BN["create_order"], cid))
    for s in opened(cfg, key):
        report = reconcile_all(s, [], closed_orders=with_cid(BN["closed_orders_filled"], cid))
        assert report.found == (cid,)
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled" and s.ready_to_trade()


def test_readiness_reasons(cfg: StateConfig, key: bytes) -> None:
    """issue 17.6: readiness stays False until each subject is reconciled; a stream gap or a restore blocks it again."""
    for s in opened(cfg, key):
        assert s.readiness() == dict.fromkeys(("positions", "open_orders", "balances"), "startup")
        s.set_positions([])
        s.set_open_orders([])
        assert s.readiness() == {"balances": "startup"} and not s.ready_to_trade()
        s.set_balances(BN["balance"])
        assert s.ready_to_trade()
        s.record_stream_gap(subjects=("open_orders",))
        assert s.readiness() == {"open_orders": "stream_gap"}
        s.set_open_orders([])
        info = s.manager.create_backup()
        s.manager.restore_from_backup(info.id, accept_older=True)
        assert s.readiness() == dict.fromkeys(("positions", "open_orders", "balances"), "restored_from_backup")


def test_recovered_state_is_not_trusted(cfg: StateConfig, key: bytes) -> None:
    """issue 17.6: after the manager recovered a damaged state file (at start or live), or read its state again,
    every subject is untrusted (recovered, startup)."""
    snap = cfg.replace(durability="snapshot")
    for s in opened(snap, key):
        s.set_active_position(Position(symbol=BTC, side="long", contracts=1, entry_price=1))
        s.set_symbol_metadata(BTC, {"n": 1})
    data = bytearray(snap.state_path.read_bytes())
    data[-5] ^= 0xFF
    snap.state_path.write_bytes(bytes(data))
    for s in opened(snap, key):
        assert s.manager.last_recovery is not None
        assert set(s.readiness().values()) == {"recovered"}
        s.set_positions([{"symbol": BTC, "side": "long", "contracts": 1, "entryPrice": 1}])
        s.set_open_orders([])
        s.set_balances(BN["balance"])
        assert s.ready_to_trade()
        s.manager.load_positions()  # the manager reads its state again: so does the store, trusting nothing
        assert set(s.readiness().values()) == {"startup"}
        s.set_positions([{"symbol": BTC, "side": "long", "contracts": 1, "entryPrice": 1}])
        s.set_open_orders([])
        s.set_balances(BN["balance"])
        data = bytearray(snap.state_path.read_bytes())
        data[-5] ^= 0xFF
        snap.state_path.write_bytes(bytes(data))
        assert s.manager.attempt_recovery() is not None  # a live recovery
        assert set(s.readiness().values()) == {"recovered"}


# ------------------------------------------------------------------------------------------------ invariants


def forge(cfg: StateConfig, key: bytes, change: Any) -> None:
    """Edit the stored ledger the way a bug or a hand edit would (through the manager, bypassing the store)."""
    with PositionStateManager(cfg, key=key) as m:
        change(m)


def test_invariant_violations_reported_not_repaired(cfg: StateConfig, key: bytes, tmp_path: Path) -> None:
    """issue 17.7: duplicate client ids, an order without intent, a fill for a never-sent order, a position in a
    closed epoch and binary-float strings are reported at load (events, readiness, validate), never repaired."""
    for s in opened(cfg, key):
        a = entry(s, "a")
        s.record_order_sent(a)
        s.record_order_accepted(a, exchange_order_id="1")
        b = entry(s, "b")
        s.set_positions(BN["positions_open"])
        s.set_positions(BN["positions_flat"])

    def edit(m: PositionStateManager) -> None:
        ea = m.get_symbol_metadata(f"__posstate_order__{a}")
        assert ea is not None
        twin = json.loads(json.dumps(ea).replace(f'"key": "{a}"', '"key": "x:1"'))
        m.set_symbol_metadata("__posstate_order__x:1", twin)  # a second live order with a's client id
        eb = m.get_symbol_metadata(f"__posstate_order__{b}")
        assert eb is not None
        eb["order"]["fill_count"] = 1  # a fill on an order never sent
        eb["order"]["amount"] = eb["events"][0]["order"]["amount"] = "0.30000000000000004"
        eb["events"] = eb["events"][1:]  # and its intent gone
        m.set_symbol_metadata(f"__posstate_order__{b}", eb)
        m.set_position(Position(symbol=BTC, side="long", contracts=1, entry_price=1))  # open in a closed epoch

    forge(cfg, key, edit)
    seen: list[dict[str, Any]] = []
    with PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        codes = {v.code for v in s.violations}
        assert {"duplicate_client_id", "no_intent", "position_in_closed_epoch", "binary_float"} <= codes
        assert s.readiness()["ledger"] == "invariant_violation"
        s.on("invariantViolation", seen.append)
        s.restore()
        assert {e["code"] for e in seen} == codes
        stored = m.get_symbol_metadata(f"__posstate_order__{b}")
        assert stored is not None and stored["order"]["amount"] == "0.30000000000000004"  # never repaired
        s.close()
    kf = write_key(tmp_path / "k.key", key)
    r = cli_run(["--state-dir", str(cfg.state_dir), "--key-file", str(kf), "validate", "--json"])
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert {v["code"] for v in out["ledger_violations"]} == codes
    assert any(c["name"] == "ledger" and c["ok"] is False for c in out["checks"])


def test_invariants_checked_at_restore(cfg: StateConfig, key: bytes) -> None:
    """issue 17.7: restoring a backup whose ledger breaks an invariant reports it on the live store."""
    for s in opened(cfg, key):
        entry(s)
        s.set_positions(BN["positions_open"])
        s.set_positions(BN["positions_flat"])
        s.manager.set_position(Position(symbol=BTC, side="long", contracts=1, entry_price=1))
        info = s.manager.create_backup()
        s.manager.delete_position(BTC, "long")
        s.restore()
        assert s.violations == ()
        s.manager.restore_from_backup(info.id, accept_older=True)
        assert [v.code for v in s.violations] == ["position_in_closed_epoch"]


def test_cli_history_orders(cfg: StateConfig, key: bytes, tmp_path: Path) -> None:
    """issue 17.3: `posstate history --orders [--id ID]` prints the ledger's events, oldest first per order; validate
    checks the ledger's invariants (issue 17.7)."""
    for s in opened(cfg, key):
        cid = entry(s)
        s.record_order_sent(cid)
        s.record_order_accepted(cid, order=with_cid(BN["create_order"], cid))
        s.apply_fill(BN["my_trades"][0])
        other = entry(s, "other")
    base = ["--state-dir", str(cfg.state_dir), "--key-file", str(write_key(tmp_path / "k.key", key))]
    r = cli_run([*base, "history", "--orders", "--id", "4101559840", "--json"])
    assert r.exit_code == 0, r.output
    assert [(e["order_key"], e["v"], e["type"]) for e in json.loads(r.stdout)] == [
        (cid, 1, "order_placed"),
        (cid, 2, "order_sent"),
        (cid, 3, "order_accepted"),
        (cid, 4, "order_partially_filled"),
    ]
    r = cli_run([*base, "history", "--orders"])
    assert r.exit_code == 0 and "trade 698759: 0.004 @ 91000.0" in r.stdout and other in r.stdout
    r = cli_run([*base, "history", "--orders", "--id", "nope"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "no order 'nope'" in r.stderr
    r = cli_run([*base, "validate", "--json"])
    assert r.exit_code == 0, r.output
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["ledger"]["ok"] is True and checks["ledger"]["detail"] == "2 orders, invariants hold"


def test_cli_reconcile_with_orders(cfg: StateConfig, key: bytes, tmp_path: Path) -> None:
    """issue 17.6: `posstate reconcile --orders` joins the order ledger to the position reconciliation: a plan that
    writes nothing (exit 1), then --apply resolves the unknown submission by client id and adopts the other order."""
    for s in opened(cfg, key):
        cid = entry(s)
        s.record_order_sent(cid)  # and the bot died before the answer
    positions = tmp_path / "positions.json"
    positions.write_text(json.dumps(BN["positions_flat"]))
    orders = tmp_path / "orders.json"
    orders.write_text(json.dumps(with_cid(BN["open_orders_partial"], cid) + BN["open_orders_other"]))
    base = ["--state-dir", str(cfg.state_dir), "--key-file", str(write_key(tmp_path / "k.key", key))]
    before = cfg.state_path.read_bytes(), cfg.journal_path.read_bytes()
    r = cli_run([*base, "reconcile", "--positions", str(positions), "--orders", str(orders)])
    assert r.exit_code == 1, r.output
    assert f"orders found on the exchange (unknown -> accepted): {cid}" in r.stdout
    assert "orders adopted (only the exchange had them): web_Xy12Zq" in r.stdout
    assert (cfg.state_path.read_bytes(), cfg.journal_path.read_bytes()) == before
    r = cli_run([*base, "--json", "reconcile", "--positions", str(positions), "--orders", str(orders), "--apply", "--yes"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["orders"]["found"] == [cid] and out["orders"]["adopted"] == ["web_Xy12Zq"]
    for s in opened(cfg, key):
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "partially_filled" and s.unknown_orders() == []
    r = cli_run([*base, "reconcile", "--positions", str(positions), "--orders", str(orders)])
    assert r.exit_code == 0 and "orders: IN SYNC" in r.stdout
    r = cli_run([*base, "reconcile", "--positions", str(positions), "--closed-orders", str(orders)])
    assert r.exit_code == 2 and "needs --orders" in r.stderr
