"""Issue 17, points 4, 5 and 8: position lifecycle epochs, balances per asset, REST snapshots and stream updates
(ccxt-shaped binance and bybit payloads)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posstate import (
    Balance,
    ExchangeAccountStateStore,
    Fill,
    OrderTransitionError,
    PersistenceError,
    Position,
    PositionStateManager,
    SchemaValidationError,
    StateConfig,
    UnknownOrderError,
)
from posstate.selftest.harness import MUTATING, Fault, HarnessOps
from posstate.storage import fileops as fs

DATA = json.loads((Path(__file__).parent / "data" / "ccxt_ledger.json").read_text())
BN, BY = DATA["binance"], DATA["bybit"]
BTC, ETH = BN["symbol"], BY["symbol"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_763_700_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def config(path: Path) -> StateConfig:
    return StateConfig.in_dir(path, encryption=False, backup_interval=1e9, durability="sync")


@pytest.fixture
def cfg(tmp_path: Path) -> StateConfig:
    return config(tmp_path / "state")


@pytest.fixture
def store(cfg: StateConfig) -> Iterator[ExchangeAccountStateStore]:
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        yield s
        s.close()


def with_cid(payload: Any, cid: str) -> Any:
    """A recorded payload with the test's client order id in place of ``CID``."""
    return json.loads(json.dumps(payload).replace('"CID"', json.dumps(cid)))


def binance_entry(s: ExchangeAccountStateStore, signal: str = "e1") -> str:
    o = s.record_order_intent(strategy="grid", signal=signal, symbol=BTC, side="buy", type="limit", amount="0.010", price="91000")
    s.record_order_sent(o.key)
    s.record_order_accepted(o.key, order=with_cid(BN["create_order"], o.key))
    return o.key


# ------------------------------------------------------------------------------------------------ failure paths first


def test_malformed_snapshots_change_nothing(store: ExchangeAccountStateStore) -> None:
    """issue 17.8: a malformed payload or a per-symbol response without coverage is refused before anything changes."""
    store.set_positions(BN["positions_open"])
    bad = copy.deepcopy(BN["positions_open"])
    bad[0]["entryPrice"] = "nan"
    with pytest.raises(SchemaValidationError):
        store.set_positions(bad)
    with pytest.raises(SchemaValidationError, match="coverage"):
        store.set_open_orders(BN["open_orders_other"], mode="replace-symbols")
    with pytest.raises(SchemaValidationError):
        store.set_balances("not a balance")
    p = store.get_active_position(BTC, "long")
    assert p is not None and p.entry_price == Decimal("90994.06")
    assert store.get_ledger_orders() == [] and store.get_balances() == {}


def test_stale_tagged_update_refused(store: ExchangeAccountStateStore) -> None:
    """issue 17.4: a position update tagged with an older epoch, or the epoch that closed, is refused and reported."""
    events: list[dict[str, Any]] = []
    store.on("staleUpdate", events.append)
    store.set_positions(BN["positions_open"])
    assert store.position_lifecycle(BTC, "long")["epoch"] == 1
    store.set_positions(BN["positions_flat"])
    stale = store.apply_position_update(BN["positions_open"][0], epoch=1)
    assert stale.refused and "closed" in stale.refused[0][1]
    assert store.get_active_position(BTC, "long") is None
    store.apply_position_update(BN["positions_open"][0])  # untagged: the exchange's word opens epoch 2
    assert store.position_lifecycle(BTC, "long")["epoch"] == 2
    assert store.apply_position_update({**BN["positions_open"][0], "contracts": 0.02}, epoch=1).refused
    assert len(events) == 2


def test_failed_open_orders_write_changes_nothing(store: ExchangeAccountStateStore) -> None:
    """issue 17.8: a reconciliation whose write fails leaves every order (and the adoption) as it was."""
    cid = binance_entry(store)
    with fs.use(HarnessOps(fault=Fault(at=1, action="raise", ops=MUTATING))), pytest.raises(PersistenceError):
        store.set_open_orders(with_cid(BN["open_orders_partial"], cid) + BN["open_orders_other"])
    assert [o.key for o in store.get_ledger_orders()] == [cid]
    o = store.get_ledger_order(cid)
    assert o is not None and o.exchange_filled is None
    assert store.readiness()["open_orders"] == "startup"


# ------------------------------------------------------------------------------------------------ epochs


def test_late_fill_for_closed_position(cfg: StateConfig) -> None:
    """issue 17.4: the exchange closed the position while the bot was down; the entry order's late fill, applied
    after the restart, counts on the order but does not reopen the position (reported)."""
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid = binance_entry(s)
        s.apply_fill(BN["my_trades"][0])
        assert s.position_lifecycle(BTC, "long")["state"] == "open"
        s.close()
    with PositionStateManager(cfg) as m:  # restarted; meanwhile the position was closed by hand on the exchange
        s = ExchangeAccountStateStore(m, clock=Clock())
        events: list[dict[str, Any]] = []
        s.on("staleUpdate", events.append)
        report = s.set_positions(BN["positions_flat"])
        assert report.closed == (f"{BTC}|long",) and s.get_active_position(BTC, "long") is None
        late = s.apply_fill(BN["my_trades"][1])
        assert late.applied and late.position_refused is not None and "closed" in late.position_refused
        assert s.get_active_position(BTC, "long") is None and events and events[0]["order"] == cid
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled"
        life = s.position_lifecycle(BTC, "long")
        assert (life["epoch"], life["state"]) == (1, "closed")
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        assert s.get_active_position(BTC, "long") is None and not s.violations
        s.close()


def test_new_epoch_refuses_old_orders_fills(store: ExchangeAccountStateStore) -> None:
    """issue 17.4: after a position closes and a new one opens, a fill of an order of the old epoch is refused."""
    old = binance_entry(store, "old")
    store.apply_fill(BN["my_trades"][0])
    store.set_positions(BN["positions_flat"])
    new = store.record_order_intent(strategy="grid", signal="new", symbol=BTC, side="buy", type="market", amount="0.001")
    assert new.epoch == 2
    store.record_order_sent(new.key)
    store.apply_fill({"id": "n1", "clientOrderId": new.key, "price": 92000, "amount": 0.001})
    assert store.position_lifecycle(BTC, "long")["epoch"] == 2
    r = store.apply_fill(BN["my_trades"][1])
    assert r.position_refused is not None and "epoch 1" in r.position_refused
    p = store.get_active_position(BTC, "long")
    assert p is not None and p.contracts == Decimal("0.001")
    assert store.get_ledger_order(old) is not None


def test_open_closing_closed(store: ExchangeAccountStateStore) -> None:
    """issue 17.4: a reduce-only order that covers the position moves it to closing (back to open if it is
    cancelled); its fill closes the epoch."""
    binance_entry(store)
    for t in BN["my_trades"]:
        store.apply_fill(t)
    close = store.record_order_intent(
        strategy="grid", signal="tp", symbol=BTC, side="sell", type="limit", amount="0.010", price="95000", reduce_only=True
    )
    assert close.position_side == "long" and close.epoch == 1
    first = store.record_order_intent(
        strategy="grid", signal="sl", symbol=BTC, side="sell", type="market", amount="0.010", reduce_only=True
    )
    store.record_order_sent(first.key)
    assert store.position_lifecycle(BTC, "long")["state"] == "closing"
    store.record_order_cancelled(first.key)  # the stop was cancelled: the position is open again
    assert store.position_lifecycle(BTC, "long")["state"] == "open"
    store.record_order_sent(close.key)
    assert store.position_lifecycle(BTC, "long")["state"] == "closing"
    store.apply_fill({"id": "c1", "clientOrderId": close.key, "price": 95000, "amount": 0.01})
    life = store.position_lifecycle(BTC, "long")
    assert (life["epoch"], life["state"]) == (1, "closed")
    kinds = [e["type"] for e in store.position_events()]
    assert kinds == ["position_opened"] + ["position_modified"] * 4 + ["position_closed"]
    assert store.get_active_position(BTC, "long") is None


# ------------------------------------------------------------------------------------------------ balances


def test_balances_per_asset(cfg: StateConfig) -> None:
    """issue 17.5: set_balances (ccxt fetch_balance) and apply_balance_update keep total, available, hold,
    source and time per asset, durably; the wallet balance API is unchanged."""
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        s.set_balances(BN["balance"])
        usdt = s.get_balance("usdt")
        assert usdt is not None and (usdt.total, usdt.available, usdt.hold) == (
            Decimal("1000.0"),
            Decimal("908.9"),
            Decimal("91.1"),
        )
        assert usdt.source == "trading" and usdt.updated_at is not None
        s.apply_balance_update("USDT", available="900")
        s.set_balances([Balance("USDT", "25", "25", "funding")], source="funding")
        s.set_wallet_balance("1000")
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        assert sorted(s.get_balances()) == ["BNB", "USDT", "USDT.FUNDING"]
        usdt = s.get_balance("USDT")
        assert usdt is not None and usdt.hold == Decimal("100.0")
        funding = s.get_balance("USDT", source="funding")
        assert funding is not None and funding.total == Decimal("25")
        s.set_balances(BY["balance"], coverage={"assets": ["USDT"]})  # covers USDT only: BNB stays
        assert sorted(s.get_balances()) == ["BNB", "USDT", "USDT.FUNDING"]
        assert s.get_wallet_balance() == 0  # in memory only, as before
        s.close()


# ------------------------------------------------------------------------------------------------ snapshots and streams


def test_per_symbol_open_orders_keep_other_symbols(store: ExchangeAccountStateStore) -> None:
    """issue 17.8: a per-symbol fetch_open_orders response never touches another symbol's orders."""
    btc = binance_entry(store)
    eth = store.record_order_intent(
        strategy="grid", signal="s1", symbol=ETH, side="sell", type="limit", amount="0.5", price="3200.5"
    )
    store.record_order_sent(eth.key)
    store.record_order_accepted(eth.key, order=with_cid(BY["create_order"], eth.key))
    report = store.set_open_orders(with_cid(BY["open_orders_new"], eth.key), mode="replace-symbols", coverage={"symbols": [ETH]})
    assert report.unresolved == () and report.adopted == ()
    o = store.get_ledger_order(btc)
    assert o is not None and o.status == "accepted"
    report = store.set_open_orders([], mode="replace-symbols", coverage={"symbols": [BTC]})
    assert report.unresolved == (btc,)
    o = store.get_ledger_order(btc)
    assert o is not None and o.status == "unknown"
    e = store.get_ledger_order(eth.key)
    assert e is not None and e.status == "accepted"


def test_open_orders_one_record_and_dry_run(cfg: StateConfig, store: ExchangeAccountStateStore) -> None:
    """issue 17.6: reconcile_open_orders reports and writes nothing; set_open_orders applies it as one journal record."""
    from posstate.journal import format as jf

    def records() -> int:
        data = cfg.journal_path.read_bytes()
        return len(jf.scan(data, jf.parse_header(data)).records)

    cid = binance_entry(store)
    other = store.record_order_intent(strategy="g", signal="x", symbol=BTC, side="buy", type="limit", amount="1", price="1")
    store.record_order_sent(other.key)
    store.record_order_status_unknown(other.key, reason="timeout")
    before = records()
    payload = with_cid(BN["open_orders_partial"], cid) + BN["open_orders_other"]
    plan = store.reconcile_open_orders(payload, closed_orders=[])
    assert (plan.adopted, plan.found, plan.not_found) == (("web_Xy12Zq",), (), (other.key,))
    assert records() == before and len(store.get_ledger_orders()) == 2
    assert store.set_open_orders(payload, closed_orders=[]) == plan
    assert records() == before + 1 and len(store.get_ledger_orders()) == 3


def test_adopt_and_stream_updates(store: ExchangeAccountStateStore) -> None:
    """issue 17.8: an order only the exchange knows is adopted (reported); stream updates move status and filled."""
    adopted: list[dict[str, Any]] = []
    store.on("orderAdopted", adopted.append)
    cid = binance_entry(store)
    report = store.set_open_orders(with_cid(BN["open_orders_partial"], cid) + BN["open_orders_other"])
    assert report.adopted == ("web_Xy12Zq",) and adopted[0]["order"] == "web_Xy12Zq"
    o = store.get_ledger_order(cid)
    assert o is not None and o.exchange_filled == Decimal("0.004") and o.filled == 0
    other = store.get_ledger_order("4101559999")
    assert other is not None and other.origin == "exchange" and other.position_side == "short"
    store.apply_order_update({**BN["open_orders_other"][0], "status": "canceled"})
    other = store.get_ledger_order("web_Xy12Zq")
    assert other is not None and other.status == "cancelled"
    store.apply_order_update(with_cid(BN["closed_orders_filled"][0], cid))
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "filled" and o.exchange_filled == Decimal("0.01")


def test_bybit_short_lifecycle(store: ExchangeAccountStateStore) -> None:
    """issue 17.8: bybit shapes: a short opened by a fill matches fetch_positions; set_positions changes nothing more."""
    o = store.record_order_intent(strategy="s", signal="1", symbol=ETH, side="sell", type="limit", amount="0.5", price="3200.5")
    store.record_order_sent(o.key)
    store.record_order_accepted(o.key, order=with_cid(BY["create_order"], o.key))
    r = store.apply_fill(with_cid(BY["my_trades"][0], o.key))
    assert r.position == Position(
        symbol=ETH, side="short", contracts=Decimal("0.5"), entry_price=Decimal("3200.5"), timestamp=1763700101000
    )
    report = store.set_positions(BY["positions_open"], coverage={"symbols": [ETH]})
    assert report.opened == () and report.closed == ()
    p = store.get_active_position(ETH, "short")
    assert p is not None and p.leverage == Decimal("5.0") and p.entry_price == Decimal("3200.5")


_OPS = st.sampled_from(["entry", "send", "fill", "late", "reduce", "reduce_fill", "flat", "open", "tagged", "cancel"])


@settings(max_examples=40)
@given(ops=st.lists(_OPS, max_size=30), sizes=st.lists(st.integers(1, 4), min_size=30, max_size=30))
def test_no_sequence_breaks_an_invariant(ops: list[str], sizes: list[int]) -> None:
    """issue 17.4/17.7: whatever the order of fills, snapshots, tagged updates and cancels, a reload finds no broken
    invariant, and a position is never open while its lifecycle says closed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp) / "state")
        with PositionStateManager(cfg) as m:
            s = ExchangeAccountStateStore(m, clock=Clock())
            orders: list[str] = []
            trade = 0
            for op, size in zip(ops, sizes, strict=False):
                try:
                    if op == "entry":
                        orders.append(
                            s.record_order_intent(
                                strategy="p",
                                signal=str(len(orders)),
                                symbol=BTC,
                                side="buy",
                                type="limit",
                                amount=size * 2,
                                price=100,
                            ).key
                        )
                    elif op == "reduce":
                        orders.append(
                            s.record_order_intent(
                                strategy="p",
                                signal=str(len(orders)),
                                symbol=BTC,
                                side="sell",
                                type="market",
                                amount=size,
                                reduce_only=True,
                            ).key
                        )
                    elif op == "send" and orders:
                        s.record_order_sent(orders[-1])
                    elif op in ("fill", "late", "reduce_fill") and orders:
                        trade += 1
                        key = orders[0] if op == "late" else orders[-1]
                        s.apply_fill(Fill(trade_id=str(trade), client_order_id=key, price=100 + size, amount=1))
                    elif op == "flat":
                        s.set_positions(BN["positions_flat"])
                    elif op == "open":
                        s.set_positions(BN["positions_open"])
                    elif op == "tagged":
                        s.apply_position_update({**BN["positions_open"][0], "contracts": size}, epoch=1)
                    elif op == "cancel" and orders:
                        s.record_order_cancelled(orders[-1])
                except (OrderTransitionError, UnknownOrderError):
                    pass
                life = s.position_lifecycle(BTC, "long")
                held = s.get_active_position(BTC, "long")
                assert not (held is not None and held.contracts != 0 and life["state"] == "closed"), (op, life)
            s.close()
        with PositionStateManager(cfg) as m:
            s = ExchangeAccountStateStore(m, clock=Clock())
            assert s.violations == ()
            s.close()
