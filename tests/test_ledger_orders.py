"""Issue 17, points 1-3: the durable order lifecycle, fills de-duplicated by trade id, and the event history."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from posstate import (
    ExchangeAccountStateStore,
    Fill,
    OrderTransitionError,
    PersistenceError,
    PositionStateManager,
    SchemaValidationError,
    StateConfig,
    UnknownOrderError,
)
from posstate.account import lifecycle as lc
from posstate.journal import format as jf
from posstate.selftest.harness import MUTATING, Fault, HarnessOps
from posstate.storage import fileops as fs

DATA = json.loads((Path(__file__).parent / "data" / "ccxt_ledger.json").read_text())
DURABILITIES = pytest.mark.parametrize("durability", ["sync", "group", "snapshot"])
BTC = "BTC/USDT:USDT"


def config(path: Path, **kw: Any) -> StateConfig:
    kw.setdefault("encryption", False)
    kw.setdefault("backup_interval", 1e9)
    return StateConfig.in_dir(path, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = 1_763_700_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ExchangeAccountStateStore]:
    with PositionStateManager(config(tmp_path / "state", durability="sync")) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        yield s
        s.close()


def reopened(cfg: StateConfig) -> ExchangeAccountStateStore:
    """A fresh manager and store on a copy of the state directory (what a restart would load now)."""
    scratch = Path(tempfile.mkdtemp(dir=cfg.state_dir.parent, prefix="reopened-"))
    with fs.use(fs.FileOps()):
        for src in (cfg.state_path, cfg.journal_path):
            if src.exists():
                shutil.copyfile(src, scratch / src.name)
    m = PositionStateManager(config(scratch, durability=cfg.durability))
    return ExchangeAccountStateStore(m, clock=Clock())


def records(cfg: StateConfig) -> int | None:
    """How many records the journal holds (None under durability "snapshot")."""
    if cfg.durability == "snapshot" or not cfg.journal_path.exists():
        return None
    data = cfg.journal_path.read_bytes()
    return len(jf.scan(data, jf.parse_header(data)).records)


def intent(store: ExchangeAccountStateStore, signal: str = "c1", **kw: Any) -> str:
    args: dict[str, Any] = {
        "strategy": "grid",
        "signal": signal,
        "symbol": BTC,
        "side": "buy",
        "type": "limit",
        "amount": "0.010",
        "price": "91000",
    }
    args.update(kw)
    return store.record_order_intent(**args).key


# ------------------------------------------------------------------------------------------------ failure paths first


@DURABILITIES
def test_failed_write_changes_nothing(tmp_path: Path, durability: str) -> None:
    """issue 17.1: a transition whose write fails raises; the ledger, the manager and a restart all keep the old status."""
    cfg = config(tmp_path / "state", durability=durability)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid = intent(s)
        m.wait_for_backups(30)
        ops = HarnessOps(fault=Fault(at=1, action="raise", ops=MUTATING))
        with fs.use(ops), pytest.raises(PersistenceError):
            s.record_order_sent(cid)
        order = s.get_ledger_order(cid)
        assert order is not None and order.status == "recorded"
        if durability == "snapshot":  # the manager's memory was put back: the next save cannot write it
            entry = m.get_symbol_metadata(f"__posstate_order__{cid}")
            assert entry is not None and entry["order"]["status"] == "recorded"
        again = reopened(cfg)
        try:
            o = again.get_ledger_order(cid)
            assert o is not None and o.status == "recorded"
        finally:
            again.close()
            again.manager.close()
        s.close()


def test_refused_transitions_write_nothing(store: ExchangeAccountStateStore) -> None:
    """issue 17.1: a second send, an acceptance of a rejected order and a client id reused for another order are
    refused (a fill naming a recorded order's client id proves it was sent: tests/test_attack_17_ledger.py)."""
    cid = intent(store)
    store.record_order_sent(cid)
    with pytest.raises(OrderTransitionError, match="never send it again"):
        store.record_order_sent(cid)
    store.record_order_rejected(cid, reason="insufficient margin")
    with pytest.raises(OrderTransitionError, match="cannot go from rejected"):
        store.record_order_cancelled(cid)
    with pytest.raises(UnknownOrderError):
        store.record_order_accepted("nope")
    with pytest.raises(OrderTransitionError, match="already names another order"):
        store.record_order_intent(
            strategy="x", signal="y", symbol=BTC, side="sell", type="limit", amount=1, price=2, client_order_id=cid
        )
    assert [e["type"] for e in store.order_events(cid)] == ["order_placed", "order_sent", "order_rejected"]


def test_forget_only_finished_orders(tmp_path: Path) -> None:
    """issue 17.1: an unknown order is never forgotten; a finished one is removed durably with its events."""
    cfg = config(tmp_path / "state", durability="sync")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid, done = intent(s, "u"), intent(s, "d")
        s.record_order_sent(cid)
        s.record_order_status_unknown(cid, reason="timeout")
        with pytest.raises(OrderTransitionError, match="only a finished order"):
            s.forget_order(cid)
        s.record_order_sent(done)
        s.record_order_rejected(done, reason="post only would cross")
        assert s.forget_order(done) and s.get_ledger_order(done) is None
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        assert [o.key for o in s.get_ledger_orders()] == [cid]
        s.close()


def test_fill_for_an_intent_cancelled_before_sending_refused(store: ExchangeAccountStateStore) -> None:
    """issue 17.7: an intent abandoned before it was sent takes no fill (found by the invariant property test)."""
    cid = intent(store)
    store.record_order_cancelled(cid, reason="signal gone")
    with pytest.raises(OrderTransitionError, match="never sent"):
        store.apply_fill(Fill(trade_id="x", client_order_id=cid, price=1, amount="0.001"))
    o = store.get_ledger_order(cid)
    assert o is not None and o.sent_at is None and o.fill_count == 0 and store.violations == ()


def test_fill_past_amount_refused(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: fills summing past the order's amount are refused and leave the order as it was."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.apply_fill(Fill(trade_id="a", client_order_id=cid, price=91000, amount="0.006"))
    with pytest.raises(OrderTransitionError, match="exceed the order amount"):
        store.apply_fill(Fill(trade_id="b", client_order_id=cid, price=91000, amount="0.005"))
    o = store.get_ledger_order(cid)
    assert o is not None and o.filled == Decimal("0.006") and o.trade_ids == ("a",)


@pytest.mark.parametrize(
    "trade",
    [
        pytest.param({"order": "1", "price": 1, "amount": 1}, id="no-trade-id"),
        pytest.param({"id": "t", "order": "1", "price": "nan", "amount": 1}, id="nan-price"),
        pytest.param({"id": "t", "order": "1", "price": 1, "amount": -1}, id="negative-amount"),
        pytest.param({"id": "t", "order": "1", "price": 1, "amount": 1, "timestamp": float("inf")}, id="infinite-time"),
        pytest.param({"id": "t" * 257, "order": "1", "price": 1, "amount": 1}, id="huge-id"),
        pytest.param({"id": "t\ud800", "order": "1", "price": 1, "amount": 1}, id="lone-surrogate"),
        pytest.param({"id": "t", "order": "1", "price": 1, "amount": 1, "fee": {"cost": "x"}}, id="bad-fee"),
        pytest.param(["not", "a", "trade"], id="not-a-dict"),
    ],
)
def test_hostile_fill_payloads_are_typed_errors(store: ExchangeAccountStateStore, trade: Any) -> None:
    """issue 17.2: a malformed ccxt trade is a SchemaValidationError (a PosStateError), and changes nothing."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="1")
    with pytest.raises(SchemaValidationError):
        store.apply_fill(trade)
    o = store.get_ledger_order(cid)
    assert o is not None and o.fill_count == 0 and o.status == "accepted"


def test_fill_for_unknown_order_refused(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: a fill naming no order of the ledger is UnknownOrderError (adopt the order first)."""
    with pytest.raises(UnknownOrderError):
        store.apply_fill(DATA["binance"]["my_trades"][0])


# ------------------------------------------------------------------------------------------------ lifecycle


@DURABILITIES
def test_each_transition_durable_on_return(tmp_path: Path, durability: str) -> None:
    """issue 17.1: every transition is one journal record (journal modes) and durable when the call returns (a
    restart right after ``sent`` finds the order ``unknown``: nobody knows whether it reached the exchange)."""
    cfg = config(tmp_path / "state", durability=durability)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid = intent(s)
        steps = [
            ("unknown", lambda: s.record_order_sent(cid)),
            ("accepted", lambda: s.record_order_accepted(cid, order=DATA["binance"]["create_order"])),
            ("partially_filled", lambda: s.apply_fill(DATA["binance"]["my_trades"][0] | {"clientOrderId": cid})),
            ("filled", lambda: s.apply_fill(DATA["binance"]["my_trades"][1])),
        ]
        for want, step in steps:
            before = records(cfg)
            step()
            if before is not None:
                assert records(cfg) == before + 1
            again = reopened(cfg)
            try:
                o = again.get_ledger_order(cid)
                assert o is not None and o.status == want
            finally:
                again.close()
                again.manager.close()
        o = s.get_ledger_order(cid)
        assert o is not None and o.exchange_order_id == "4101559840"
        s.close()


def test_unknown_order_survives_restarts_and_is_never_resent(tmp_path: Path) -> None:
    """issue 17.1: an unknown order stays unknown across restarts, blocks trading, and cannot be sent again."""
    cfg = config(tmp_path / "state", durability="sync")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid = intent(s)
        s.record_order_sent(cid)
        s.record_order_status_unknown(cid, reason="request timed out")
        s.close()
    for _ in range(3):
        with PositionStateManager(cfg) as m:
            s = ExchangeAccountStateStore(m, clock=Clock())
            assert [o.key for o in s.unknown_orders()] == [cid]
            assert s.readiness()["open_orders"] == "submission_unknown"
            assert (
                s.record_order_intent(
                    strategy="grid", signal="c1", symbol=BTC, side="buy", type="limit", amount="0.010", price="91000"
                ).status
                == "unknown"
            )
            with pytest.raises(OrderTransitionError):
                s.record_order_sent(cid)
            s.close()


def test_answers_are_idempotent(store: ExchangeAccountStateStore) -> None:
    """issue 17.1: the same answer twice records one event; an acceptance after a fill only records the exchange id."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.apply_fill(Fill(trade_id="f", client_order_id=cid, price=91000, amount="0.001"))
    store.record_order_accepted(cid, exchange_order_id="77")
    store.record_order_accepted(cid, exchange_order_id="77")
    store.record_order_cancelled(cid, reason="by bot")
    store.record_order_cancelled(cid, reason="by bot")
    kinds = [e["type"] for e in store.order_events(cid)]
    assert kinds == ["order_placed", "order_sent", "order_partially_filled", "order_updated", "order_cancelled"]
    o = store.get_ledger_order("77")
    assert o is not None and o.status == "cancelled" and o.exchange_order_id == "77"


# ------------------------------------------------------------------------------------------------ fills


def test_fill_replayed_twice_changes_nothing(tmp_path: Path) -> None:
    """issue 17.2: the same ccxt trade applied twice (a reconnect replay), also after a restart, changes nothing."""
    cfg = config(tmp_path / "state", durability="sync")
    trade = DATA["binance"]["my_trades"][0]
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        cid = intent(s)
        s.record_order_sent(cid)
        s.record_order_accepted(cid, exchange_order_id="4101559840")
        assert s.apply_fill(trade).applied
        count = records(cfg)
        again = s.apply_fill(trade)
        assert again.duplicate and not again.applied and records(cfg) == count
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=Clock())
        assert s.apply_fill(trade).duplicate
        o = s.get_ledger_order(cid)
        assert o is not None and o.filled == Decimal("0.004") and o.fill_count == 1
        p = s.get_active_position(BTC, "long")
        assert p is not None and p.contracts == Decimal("0.004")
        s.close()


def test_order_totals_from_executions(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: an order keeps its executions (price, quantity, fee, time), filled quantity and average price."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, order=DATA["binance"]["create_order"])
    for t in DATA["binance"]["my_trades"]:
        store.apply_fill(t)
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "filled"
    assert o.filled == Decimal("0.010") and o.average_price == Decimal("90994.06")
    assert o.fees == {"USDT": Decimal("0.36397624")}
    assert [(e.trade_id, e.price, e.amount, e.timestamp) for e in o.executions] == [
        ("698759", Decimal("91000.0"), Decimal("0.004"), 1763700001000),
        ("698760", Decimal("90990.1"), Decimal("0.006"), 1763700002000),
    ]


def test_fill_buffer_bounded_and_folded(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: 40 fills keep the 32 newest in detail; older ones fold into totals; every trade id still dedups."""
    cid = intent(store, amount="40", price="10")
    store.record_order_sent(cid)
    for i in range(40):
        store.apply_fill(Fill(trade_id=f"t{i}", client_order_id=cid, price=10 + i, amount=1, fee="0.01", fee_currency="USDT"))
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "filled" and o.fill_count == 40
    assert len(o.executions) == lc.EXECUTION_BUFFER and o.executions[0].trade_id == "t8"
    assert o.average_price == Decimal("29.5") and o.fees["USDT"] == Decimal("0.40")
    events = store.order_events(cid)
    assert sum(e["type"] == "order_fills_folded" for e in events) == 1
    assert sum(e["type"] in ("order_filled", "order_partially_filled") for e in events) == lc.EXECUTION_BUFFER
    assert [e["v"] for e in events] == sorted(e["v"] for e in events)
    assert store.apply_fill(Fill(trade_id="t0", client_order_id=cid, price=10, amount=1)).duplicate
    assert store.reconstruct_order(cid) == o


# ------------------------------------------------------------------------------------------------ history


def test_history_events_and_versions(store: ExchangeAccountStateStore) -> None:
    """issue 17.3: order and position events carry per-aggregate versions 1, 2, 3, ..."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="4101559840")
    store.apply_fill(DATA["binance"]["my_trades"][0])
    store.apply_fill(DATA["binance"]["my_trades"][1])
    events = store.order_events(cid)
    assert [(e["v"], e["type"]) for e in events] == [
        (1, "order_placed"),
        (2, "order_sent"),
        (3, "order_accepted"),
        (4, "order_partially_filled"),
        (5, "order_filled"),
    ]
    assert [(e["v"], e["type"]) for e in store.position_events()] == [(1, "position_opened"), (2, "position_modified")]
    assert store.reconstruct_order(cid) == store.get_ledger_order(cid)


_STEP = st.sampled_from(["sent", "accepted", "unknown", "fill", "fill", "fill", "replay", "cancel", "expire", "reject", "update"])


@given(steps=st.lists(_STEP, max_size=60), amounts=st.lists(st.integers(1, 5), min_size=60, max_size=60))
def test_reconstruct_equals_stored(steps: list[str], amounts: list[int]) -> None:
    """issue 17.3: for any sequence of calls, the order rebuilt from its stored events equals the stored order,
    in memory and after a reload."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp) / "state", durability="group")
        with PositionStateManager(cfg) as m:
            s = ExchangeAccountStateStore(m, clock=Clock())
            cid = intent(s, amount="100", price="5")
            n = 0
            for step, amount in zip(steps, amounts, strict=False):
                try:
                    if step == "sent":
                        s.record_order_sent(cid)
                    elif step == "accepted":
                        s.record_order_accepted(cid, exchange_order_id=f"x{n}")
                    elif step == "unknown":
                        s.record_order_status_unknown(cid, reason="timeout")
                    elif step in ("fill", "replay"):
                        n += step == "fill"
                        s.apply_fill(Fill(trade_id=f"t{n}", client_order_id=cid, price=5 + amount, amount=amount))
                    elif step == "cancel":
                        s.record_order_cancelled(cid)
                    elif step == "expire":
                        s.record_order_expired(cid)
                    elif step == "reject":
                        s.record_order_rejected(cid, reason="no")
                    else:
                        s.apply_order_update(
                            {
                                "id": f"x{n}",
                                "clientOrderId": cid,
                                "symbol": BTC,
                                "side": "buy",
                                "amount": 100,
                                "filled": n,
                                "status": "open",
                            }
                        )
                except OrderTransitionError:
                    pass
                assert s.reconstruct_order(cid) == s.get_ledger_order(cid)
            stored = s.get_ledger_order(cid)
            s.close()
        with PositionStateManager(cfg) as m:
            s = ExchangeAccountStateStore(m, clock=Clock())
            loaded = s.get_ledger_order(cid)
            assert loaded == s.reconstruct_order(cid)
            assert stored is not None and loaded is not None
            if stored.status == "sent":  # a restart turns an unanswered send into an unknown outcome
                assert loaded.status == "unknown" and loaded.version == stored.version + 1
            else:
                assert loaded == stored
            assert s.violations == ()
            s.close()
