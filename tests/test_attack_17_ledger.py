"""Issue 17 attack: the order ledger's promises that lose money (a second send, a forgotten or overwritten order,
a fill counted twice or lost, readiness claimed before reconciliation)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner

from posstate import (
    ExchangeAccountStateStore,
    Fill,
    LedgerOwnershipError,
    OrderTransitionError,
    Position,
    PositionStateManager,
    PosStateError,
    SchemaValidationError,
    StateConfig,
    generate_key,
)
from posstate.account import ledgerformat as lf
from posstate.cli.main import cli
from posstate.journal.current import read_current
from posstate.model.schema import schema
from posstate.storage.statefile import ReadOptions
from tests.conftest import write_key

BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"


def config(path: Path, **kw: Any) -> StateConfig:
    kw.setdefault("encryption", False)
    kw.setdefault("backup_interval", 1e9)
    kw.setdefault("durability", "sync")
    return StateConfig.in_dir(path, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ExchangeAccountStateStore]:
    with PositionStateManager(config(tmp_path / "state")) as m:
        s = ExchangeAccountStateStore(m)
        yield s
        s.close()


def intent(store: ExchangeAccountStateStore, signal: str = "c1", **kw: Any) -> str:
    args: dict[str, Any] = {
        "strategy": "grid",
        "signal": signal,
        "symbol": BTC,
        "side": "buy",
        "type": "limit",
        "amount": "1",
        "price": "100",
    }
    args.update(kw)
    return store.record_order_intent(**args).key


def filled_order(store: ExchangeAccountStateStore, signal: str = "c1", xid: str = "9001") -> str:
    cid = intent(store, signal)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id=xid)
    store.apply_fill(Fill(trade_id=f"t-{xid}", order_id=xid, price=100, amount=1))
    return cid


# ------------------------------------------------------------------------------------------------ malformed entries


def test_malformed_order_entry_is_not_overwritten_by_a_new_intent(tmp_path: Path) -> None:
    """issue 17.7: an order entry left out of memory as malformed is never overwritten by the same decision recorded
    again (that would forget a filled order and let it be sent a second time)."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        cid = filled_order(s)
        name = lf.order_entry_name(cid)
        entry = m.get_symbol_metadata(name)
        assert entry is not None
        entry["order"]["amount"] = "not a number"  # damaged by hand, or by a newer posstate
        m.set_symbol_metadata(name, entry)
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        assert [v.code for v in s.violations] == ["malformed"]
        with pytest.raises(OrderTransitionError, match="malformed"):
            intent(s)
        kept = m.get_symbol_metadata(name)
        assert kept is not None and kept["order"]["status"] == "filled" and kept["order"]["amount"] == "not a number"
        s.close()


def test_malformed_lifecycle_kept_at_the_next_lifecycle_write(tmp_path: Path) -> None:
    """issue 17.7: a malformed position lifecycle left out of memory is still in the state after another
    position's lifecycle is written (never silently dropped), and a change to it is refused."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        filled_order(s)
        life = m.get_symbol_metadata(lf.LIFECYCLES)
        assert life is not None
        bad = {"epoch": "7", "state": "closed", "version": 3, "events": []}
        life["positions"][f"{ETH}|long"] = bad
        m.set_symbol_metadata(lf.LIFECYCLES, life)
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        s.set_positions([{"symbol": "SOL/USDT:USDT", "side": "long", "contracts": 1, "entryPrice": 10}], mode="upsert")
        stored = m.get_symbol_metadata(lf.LIFECYCLES)
        assert stored is not None and stored["positions"][f"{ETH}|long"] == bad
        assert "SOL/USDT:USDT|long" in stored["positions"]
        with pytest.raises(OrderTransitionError, match="malformed"):
            s.set_positions([{"symbol": ETH, "side": "long", "contracts": 1, "entryPrice": 10}], mode="upsert")
        stored = m.get_symbol_metadata(lf.LIFECYCLES)
        assert stored is not None and stored["positions"][f"{ETH}|long"] == bad
        s.close()


@pytest.mark.parametrize("entry", [lf.LIFECYCLES, lf.BALANCES])
def test_unreadable_lifecycles_or_balances_entry_not_replaced(tmp_path: Path, entry: str) -> None:
    """issue 17.7: a lifecycles or balances entry that is not what posstate writes is refused a rewrite (which would
    drop every epoch or balance it holds), not silently replaced."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        filled_order(s)
        s.set_balances({"USDT": {"total": 100, "free": 90}})
        m.set_symbol_metadata(entry, {"format": 99, "data": "from a newer posstate"})
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        with pytest.raises(OrderTransitionError, match="malformed"):
            if entry == lf.LIFECYCLES:
                s.set_positions([{"symbol": ETH, "side": "long", "contracts": 1, "entryPrice": 10}], mode="upsert")
            else:
                s.set_balances({"USDT": {"total": 50, "free": 50}})
        assert m.get_symbol_metadata(entry) == {"format": 99, "data": "from a newer posstate"}
        s.close()


def test_malformed_balance_kept_at_the_next_balance_write(tmp_path: Path) -> None:
    """issue 17.7: a malformed balance left out of memory stays in the state when another asset is written."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        s.set_balances({"USDT": {"total": 100, "free": 90}, "BNB": {"total": 2, "free": 2}})
        bal = m.get_symbol_metadata(lf.BALANCES)
        assert bal is not None
        bal["assets"]["BNB"]["total"] = "two"
        m.set_symbol_metadata(lf.BALANCES, bal)
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        s.apply_balance_update("USDT", total=80, available=80)
        stored = m.get_symbol_metadata(lf.BALANCES)
        assert stored is not None and stored["assets"]["BNB"]["total"] == "two"
        s.close()


# ------------------------------------------------------------------------------------------------ one writer


def test_second_ledger_store_on_one_manager_refused(tmp_path: Path) -> None:
    """issue 17.1: a second ExchangeAccountStateStore on the same manager is refused: with its own memory it would
    send an order the first one already sent."""
    with PositionStateManager(config(tmp_path / "state")) as m:
        a = ExchangeAccountStateStore(m)
        cid = intent(a)
        with pytest.raises(LedgerOwnershipError):
            ExchangeAccountStateStore(m)
        a.record_order_sent(cid)
        a.close()
        with pytest.raises(LedgerOwnershipError):
            a.record_order_accepted(cid, exchange_order_id="1")  # a closed store writes nothing
        b = ExchangeAccountStateStore(m)  # once the first is closed
        with pytest.raises(OrderTransitionError):
            b.record_order_sent(cid)
        b.close()


# ------------------------------------------------------------------------------------------------ readiness


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.set_positions([], coverage={"symbols": [ETH]}), id="positions"),
        pytest.param(lambda s: s.set_open_orders([], mode="replace-symbols", coverage={"symbols": [ETH]}), id="open_orders"),
        pytest.param(lambda s: s.set_balances({"total": {}, "free": {}}, coverage={"assets": ["ETH"]}), id="balances"),
    ],
)
def test_partial_snapshot_does_not_make_ready(store: ExchangeAccountStateStore, call: Any) -> None:
    """issue 17.6: a snapshot covering some symbols or assets only does not trust the whole subject."""
    subject = {"positions": "positions", "open_orders": "open_orders", "balances": "balances"}
    before = store.readiness()
    call(store)
    after = store.readiness()
    assert after == before and set(subject) <= set(after)


# ------------------------------------------------------------------------------------------------ fills


def test_fill_after_not_found_rejection_is_counted(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: an unknown order resolved "not found" (absent from the closed orders the bot passed) that then
    fills is counted on its order and its position, not refused: the exchange's trade proves it arrived."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_status_unknown(cid, reason="timeout")
    report = store.set_open_orders([], closed_orders=[])
    assert report.not_found == (cid,)
    result = store.apply_fill({"id": "late-1", "order": "42", "clientOrderId": cid, "symbol": BTC, "price": 100, "amount": 1})
    assert result.applied and result.order.status == "filled"
    p = store.get_active_position(BTC, "long")
    assert p is not None and p.contracts == Decimal(1)
    assert store.violations == ()


@pytest.mark.parametrize("variant", [" t-1", "t-1 ", "\tt-1\n"])
def test_trade_id_whitespace_is_the_same_fill(store: ExchangeAccountStateStore, variant: str) -> None:
    """issue 17.2: a trade id with surrounding whitespace is the same trade: the replay changes nothing."""
    cid = intent(store, amount="3")
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="7")
    assert store.apply_fill(Fill(trade_id="t-1", order_id="7", price=100, amount=1)).applied
    again = store.apply_fill(Fill(trade_id=variant, order_id=" 7", price=100, amount=1))
    assert again.duplicate and not again.applied
    o = store.get_ledger_order(cid)
    assert o is not None and o.filled == Decimal(1) and o.trade_ids == ("t-1",)


@pytest.mark.parametrize(
    "trade",
    [
        pytest.param({"id": "t", "clientOrderId": 12345, "price": 1, "amount": 1}, id="int-client-id"),
        pytest.param({"id": "t", "clientOrderId": {"a": 1}, "price": 1, "amount": 1}, id="dict-client-id"),
        pytest.param({"id": "t", "order": ["1"], "price": 1, "amount": 1}, id="list-order-id"),
    ],
)
def test_hostile_fill_ids_are_typed_errors(store: ExchangeAccountStateStore, trade: Any) -> None:
    """issue 17.2: a ccxt trade whose client or order id is not text is a typed error (PosStateError), not a TypeError."""
    with pytest.raises(PosStateError):
        store.apply_fill(trade)


# ------------------------------------------------------------------------------------------------ intents


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"amount": "-1"}, id="negative-amount"),
        pytest.param({"amount": 0}, id="zero-amount"),
        pytest.param({"price": "-5"}, id="negative-price"),
        pytest.param({"client_order_id": 123}, id="int-client-id"),
        pytest.param({"client_order_id": " a "}, id="padded-client-id"),
        pytest.param({"client_order_id": "x:1"}, id="adopted-key-prefix"),
    ],
)
def test_hostile_intents_refused(store: ExchangeAccountStateStore, kw: dict[str, Any]) -> None:
    """issue 17.1: an intent with a non-positive amount, a negative price or a client id that is not plain text
    (or looks like an adopted order's key) is a SchemaValidationError and records nothing."""
    with pytest.raises(SchemaValidationError):
        intent(store, **kw)
    assert store.get_ledger_orders() == []


# ------------------------------------------------------------------------------------------------ restore


def _order_after_backup(s: ExchangeAccountStateStore, m: PositionStateManager) -> tuple[str, str]:
    """A backup, then an order sent and filled after it: (backup id, client id)."""
    m.save()
    backup = m.create_backup()
    cid = filled_order(s)
    return backup.id, cid


def test_restore_keeps_orders_newer_than_the_backup(tmp_path: Path) -> None:
    """issue 17.6: restoring an older backup under a live store keeps the orders sent since (the exchange does not
    roll back): the same decision recorded again finds the filled order and cannot be sent a second time."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        backup_id, cid = _order_after_backup(s, m)
        m.restore_from_backup(backup_id, accept_older=True)
        assert s.readiness()["positions"] == "restored_from_backup"
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled" and o.trade_ids == ("t-9001",)
        with pytest.raises(OrderTransitionError, match="never send it again"):
            s.record_order_sent(intent(s))
        s.close()
    with PositionStateManager(cfg) as m:  # durable: a restart finds it too
        s = ExchangeAccountStateStore(m)
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled"
        s.close()


def test_cli_restore_keeps_orders_newer_than_the_backup(tmp_path: Path) -> None:
    """issue 17.6: `posstate backups restore` of an older backup keeps the ledger orders written since, and says so."""
    key = generate_key()
    cfg = config(tmp_path / "state", encryption=True)
    with PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m)
        backup_id, cid = _order_after_backup(s, m)
        s.close()
    kf = write_key(tmp_path / "k.key", key)
    env = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}
    args = ["--state-dir", str(cfg.state_dir), "--key-file", str(kf), "backups", "restore", backup_id]
    r = CliRunner().invoke(cli, [*args, "--yes", "--accept-older"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "kept 1 ledger orders newer than the backup" in r.stderr and cid in r.stderr
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_positions() == {}  # the backup's positions (reconcile them with the exchange)
        s = ExchangeAccountStateStore(m)
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled"
        s.close()


@pytest.mark.parametrize("how", ["watch_orders", "closed_orders"])
def test_fills_after_the_exchange_said_filled_are_counted(store: ExchangeAccountStateStore, how: str) -> None:
    """issue 17.2: the order stream (or fetch_closed_orders) reporting an order closed before its trades arrive is the
    usual order of two ccxt streams: the trades still count on the order and open the position."""
    cid = intent(store, amount="2")
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="5")
    closed = {"id": "5", "clientOrderId": cid, "symbol": BTC, "side": "buy", "type": "limit", "status": "closed"}
    closed.update(amount=2, filled=2, price=100)
    if how == "watch_orders":
        store.apply_order_update(closed)
    else:
        store.set_open_orders([], closed_orders=[closed])
    assert store.get_ledger_order(cid).status == "filled"  # type: ignore[union-attr]
    for n in (1, 2):
        assert store.apply_fill({"id": f"t{n}", "order": "5", "symbol": BTC, "price": 100, "amount": 1}).applied
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "filled" and o.filled == Decimal(2)
    p = store.get_active_position(BTC, "long")
    assert p is not None and p.contracts == Decimal(2)
    with pytest.raises(OrderTransitionError, match="exceed"):
        store.apply_fill({"id": "t3", "order": "5", "symbol": BTC, "price": 100, "amount": 1})
    assert store.violations == ()


def test_fill_refused_for_its_position_untrusts_positions(store: ExchangeAccountStateStore) -> None:
    """issue 17.4/17.6: a new trade of an older epoch's order is refused for the position but is real on the
    exchange (a resting entry that filled after the close): positions are untrusted until the next snapshot."""
    old = intent(store, "old", amount="2")
    store.record_order_sent(old)
    store.record_order_accepted(old, exchange_order_id="11")
    store.apply_fill(Fill(trade_id="o1", order_id="11", price=100, amount=1))
    store.set_positions([])  # closed on the exchange: epoch 1 closed
    store.set_open_orders([])  # the old order is not open any more: it becomes unknown (unresolved)
    store.set_balances({"USDT": {"total": 100, "free": 100}})
    assert "positions" not in store.readiness()
    late = store.apply_fill(Fill(trade_id="o2", order_id="11", price=100, amount=1))
    assert late.position_refused is not None
    assert store.readiness()["positions"] == "stale_fill"
    store.set_positions([{"symbol": BTC, "side": "long", "contracts": 1, "entryPrice": 100}])
    assert "positions" not in store.readiness()


def test_cli_import_of_an_older_export_keeps_newer_orders(tmp_path: Path) -> None:
    """issue 17.1: `posstate import` of a document written before an order was sent keeps that order (and says so):
    the same decision recorded again finds it instead of sending it a second time."""
    key = generate_key()
    cfg = config(tmp_path / "state", encryption=True)
    kf = write_key(tmp_path / "k.key", key)
    env = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}
    base = ["--state-dir", str(cfg.state_dir), "--key-file", str(kf)]
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(Position(symbol=ETH, side="long", contracts=Decimal(1), entry_price=Decimal(10)))
        m.save()
    old = tmp_path / "old.json"
    r = CliRunner().invoke(cli, [*base, "export", "--out", str(old)], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m)
        cid = filled_order(s)
        s.close()
    r = CliRunner().invoke(cli, [*base, "import", str(old), "--yes"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "keeping 1 ledger orders" in r.stderr and cid in r.stderr
    with PositionStateManager(cfg, key=key) as m:
        s = ExchangeAccountStateStore(m)
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled"
        with pytest.raises(OrderTransitionError, match="never send it again"):
            s.record_order_sent(intent(s))
        s.close()


class _Clock:
    def __init__(self) -> None:
        self.t = 1_763_700_000.0

    def __call__(self) -> float:
        return self.t


def test_forgotten_order_is_not_sent_again(tmp_path: Path) -> None:
    """issue 17.1: after forget_order() of a sent order, the same decision recorded again (a restarted bot replaying
    its last candle) is refused, also after a restart; an intent never sent may be recorded again; the memory is
    kept 7 days."""
    cfg = config(tmp_path / "state")
    clock = _Clock()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=clock)
        cid = filled_order(s)
        never = intent(s, "never-sent")
        s.record_order_cancelled(never)
        s.forget_order(cid)
        s.forget_order(never)
        with pytest.raises(OrderTransitionError, match="forget_order"):
            intent(s)
        entries = {n: d for n, d in m.get_all_symbol_metadata().items() if lf.is_ledger_entry(n)}
        assert list(entries[lf.FORGOTTEN]["orders"]) == [cid]
        jsonschema.Draft202012Validator(schema("ledger.schema.json")).validate(entries)
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m, clock=clock)
        with pytest.raises(OrderTransitionError, match="forget_order"):
            intent(s)
        assert intent(s, "never-sent") == never  # never sent: recording it again is safe
        assert s.violations == ()
        clock.t += 8 * 24 * 3600
        other = filled_order(s, "other", xid="9002")
        s.forget_order(other)  # prunes client ids forgotten more than 7 days ago
        assert intent(s) == cid
        s.close()


@pytest.mark.parametrize("how", ["set_open_orders", "apply_order_update", "apply_fill"])
def test_recorded_order_found_on_the_exchange_is_sent(store: ExchangeAccountStateStore, how: str) -> None:
    """issue 17.1: an order the ledger holds as recorded (a lost write of record_order_sent, a bot that skipped it)
    that the exchange reports by client id was sent: it cannot be sent again and its fills count."""
    cid = intent(store, amount="2")
    live = {"id": "3", "clientOrderId": cid, "symbol": BTC, "side": "buy", "type": "limit", "status": "open"}
    live.update(amount=2, filled=0, price=100)
    if how == "set_open_orders":
        assert store.set_open_orders([live]).found == (cid,)
    elif how == "apply_order_update":
        store.apply_order_update(live)
    result = store.apply_fill({"id": "t1", "order": "3", "clientOrderId": cid, "symbol": BTC, "price": 100, "amount": 1})
    assert result.applied and result.order.filled == Decimal(1)
    with pytest.raises(OrderTransitionError, match="never send it again"):
        store.record_order_sent(cid)
    assert store.violations == ()


def test_ledger_arithmetic_ignores_the_bots_decimal_context(tmp_path: Path) -> None:
    """issue 17.2/17.7: a bot that lowers decimal.getcontext().prec (common) changes no total, average or position,
    and the stored orders still equal their events when loaded under the default context."""
    import decimal

    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        with decimal.localcontext() as ctx:
            ctx.prec = 6
            cid = intent(s, amount="1.0000001", price="91234.5")
            s.record_order_sent(cid)
            s.apply_fill(Fill(trade_id="1", client_order_id=cid, price="91234.5", amount="0.5000001"))
            s.apply_fill(Fill(trade_id="2", client_order_id=cid, price="91234.7", amount="0.5"))
        o = s.get_ledger_order(cid)
        assert o is not None and o.status == "filled" and o.filled == Decimal("1.0000001")
        p = s.get_active_position(BTC, "long")
        assert p is not None and p.contracts == Decimal("1.0000001")
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        assert s.violations == ()
        s.close()


@pytest.mark.parametrize(
    "info",
    [
        pytest.param({"c": "CID", "t": 77}, id="binance-user-data-stream"),
        pytest.param({"orderLinkId": "CID", "execId": "e77"}, id="bybit"),
    ],
)
def test_trade_of_an_unknown_submission_finds_its_order(store: ExchangeAccountStateStore, info: dict[str, Any]) -> None:
    """issue 17.1/17.2: create_order timed out (the order's exchange id never reached the ledger) and the order
    filled: its trade names the client id only in the raw payload; it still finds the order and counts."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_status_unknown(cid, reason="timeout")
    raw = {k: (cid if v == "CID" else v) for k, v in info.items()}
    trade = {"id": "77", "order": "8888", "symbol": BTC, "side": "buy", "price": 100, "amount": 1, "info": raw}
    result = store.apply_fill(trade)
    assert result.applied and result.order.status == "filled"


def test_fill_with_a_foreign_client_id_falls_back_to_the_order_id(store: ExchangeAccountStateStore) -> None:
    """issue 17.2: a trade whose client id the ledger does not know (set by the exchange's UI) but whose order id it
    does still finds its order."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="31")
    trade = {"id": "t31", "order": "31", "clientOrderId": "web_x1", "symbol": BTC, "price": 100, "amount": 1}
    assert store.apply_fill(trade).applied


def test_same_decision_written_differently_returns_the_stored_order(store: ExchangeAccountStateStore) -> None:
    """issue 17.1: the same decision recorded after a restart with its amount or price written differently ("0.01"
    for "0.010", a float) has the same client id and returns the stored order, not an error."""
    cid = intent(store, amount="0.010", price="91000")
    store.record_order_sent(cid)
    again = store.record_order_intent(
        strategy="grid", signal="c1", symbol=BTC, side="buy", type="limit", amount="0.01", price=91000.0
    )
    assert again.key == cid and again.status == "sent"
    with pytest.raises(OrderTransitionError, match="already names another order"):
        intent(store, amount="0.010", price="91000", side="sell", client_order_id=cid)


def test_adopted_orders_client_id_cannot_take_another_orders_key(store: ExchangeAccountStateStore) -> None:
    """issue 17.6/17.8: an order on the exchange whose client id looks like an adopted order's key ("x:1") stays a
    separate order from the exchange's order 1, whose fills stay its own; a client id past 256 characters is refused."""
    base = {"symbol": BTC, "side": "buy", "type": "limit", "status": "open", "amount": 2, "filled": 0, "price": 100}
    store.apply_order_update({**base, "id": "5", "clientOrderId": "x:1"})
    store.apply_order_update({**base, "id": "1"})
    assert sorted(o.exchange_order_id or "" for o in store.get_ledger_orders()) == ["1", "5"]
    result = store.apply_fill({"id": "f1", "order": "1", "symbol": BTC, "price": 100, "amount": 1})
    assert result.order.exchange_order_id == "1"
    o5 = store.get_ledger_order("5")
    assert o5 is not None and o5.filled == 0 and o5.client_order_id == "x:1"
    with pytest.raises(SchemaValidationError):
        store.apply_order_update({**base, "id": "6", "clientOrderId": "a" * 300})
    assert store.get_ledger_order("6") is None


@pytest.mark.parametrize("durability", ["sync", "snapshot"])
def test_restore_keeps_newer_orders_before_the_next_ledger_call(tmp_path: Path, durability: str) -> None:
    """issue 17.6: the orders a live store keeps across a restore of an older backup are on disk when
    restore_from_backup returns (a kill before the bot's next ledger call loses none)."""
    cfg = config(tmp_path / "state", durability=durability)
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        backup_id, cid = _order_after_backup(s, m)
        m.restore_from_backup(backup_id, accept_older=True)
        on_disk = read_current(cfg, ReadOptions(keyring=None)).state.metadata  # what a restart after a kill now would load
        entry = on_disk.get(lf.order_entry_name(cid))
        assert entry is not None and entry["order"]["status"] == "filled"
        s.close()


@pytest.mark.parametrize("how", ["set_open_orders", "apply_order_update"])
def test_not_found_order_that_appears_later_is_live_again(store: ExchangeAccountStateStore, how: str) -> None:
    """issue 17.6: an unknown submission resolved "not found" (binance answers -2013 for a moment after a timeout)
    that the exchange then lists as open is live again (accepted), not left rejected while it rests there."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_status_unknown(cid, reason="timeout")
    assert store.set_open_orders([], closed_orders=[]).not_found == (cid,)
    live = {"id": "21", "clientOrderId": cid, "symbol": BTC, "side": "buy", "type": "limit", "status": "open"}
    live.update(amount=1, filled=0, price=100)
    if how == "set_open_orders":
        assert cid in store.set_open_orders([live]).found
    else:
        store.apply_order_update(live)
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "accepted" and o.is_live and o.exchange_order_id == "21"
    assert store.violations == ()


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("timeout\ud800", id="lone-surrogate"),
        pytest.param("\x1b[2J\x1b[31mfake\x00", id="terminal-escapes"),
        pytest.param(TimeoutError("read timed out"), id="exception-object"),
    ],
)
def test_unknown_outcome_recorded_whatever_its_reason_text(store: ExchangeAccountStateStore, reason: Any) -> None:
    """issue 17.1: record_order_status_unknown(reason=str(exc)) records the unknown outcome even when the exchange's
    message holds text the state cannot store (a lone surrogate) or a terminal escape (kept out of `history`), or
    when the bot passes the exception itself: refusing it would leave the order counted as in flight."""
    cid = intent(store)
    store.record_order_sent(cid)
    o = store.record_order_status_unknown(cid, reason=reason)
    assert o.status == "unknown" and o.reason
    assert not any(ch in o.reason for ch in ("\ud800", "\x1b", "\x00"))
    assert [u.key for u in store.unknown_orders()] == [cid]


def test_binary_float_arithmetic_refused_at_the_call_not_reported_after_restart(tmp_path: Path) -> None:
    """issue 17.7: an amount, price, fill or balance computed with float arithmetic (0.1 + 0.2) is refused when
    given (SchemaValidationError, nothing stored) instead of being stored and blocking trading at every later
    start as a binary_float violation; ordinary floats (0.1, a ccxt price) are taken."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        with pytest.raises(SchemaValidationError, match="binary float"):
            intent(s, amount=0.1 + 0.2)
        with pytest.raises(SchemaValidationError, match="binary float"):
            intent(s, price=91000.1 * 3)
        cid = intent(s, amount=0.5, price=91000.1)
        s.record_order_sent(cid)
        with pytest.raises(SchemaValidationError, match="binary float"):
            s.apply_fill({"id": "f", "clientOrderId": cid, "price": 91000.1, "amount": 0.1 + 0.2})
        s.apply_fill({"id": "g", "clientOrderId": cid, "price": 91000.1, "amount": 0.3})
        with pytest.raises(SchemaValidationError, match="binary float"):
            s.apply_balance_update("USDT", total=0.1 + 0.2)
        assert [o.key for o in s.get_ledger_orders()] == [cid]
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        assert s.violations == ()
        s.close()


def test_sent_order_whose_answer_never_came_blocks_readiness(tmp_path: Path) -> None:
    """issue 17.6: an order this process sent whose answer it never recorded (the request raised something the bot
    did not catch) counts as unknown after a minute: it blocks ready_to_trade() and set_open_orders resolves it."""
    clock = _Clock()
    with PositionStateManager(config(tmp_path / "state")) as m:
        s = ExchangeAccountStateStore(m, clock=clock)
        s.set_positions([])
        s.set_open_orders([])
        s.set_balances({"USDT": {"total": 100, "free": 100}})
        cid = intent(s)
        s.record_order_sent(cid)
        assert s.ready_to_trade() and s.unknown_orders() == []  # waiting for the answer
        clock.t += 61
        assert [o.key for o in s.unknown_orders()] == [cid]
        assert s.readiness() == {"open_orders": "submission_unknown"}
        assert s.set_open_orders([], closed_orders=[]).not_found == (cid,)
        s.close()


def test_acceptance_after_a_not_found_resolution_wins(store: ExchangeAccountStateStore) -> None:
    """issue 17.1: the exchange's answer that arrives after the order was resolved "not found" (a slow request, a
    clock jump) makes it accepted again instead of raising, so the bot tracks the order that rests there."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_status_unknown(cid, reason="timeout")
    store.set_open_orders([], closed_orders=[])
    o = store.record_order_accepted(cid, exchange_order_id="44")
    assert o.status == "accepted" and o.exchange_order_id == "44" and o.is_live
    assert store.violations == ()


def test_accepted_order_missing_everywhere_is_never_taken_as_never_arrived(store: ExchangeAccountStateStore) -> None:
    """issue 17.6: an order the exchange acknowledged (it has an exchange id) that is neither open nor in the closed
    orders the bot passed stays unknown (unresolved): absence from a list never proves an acknowledged order did
    not exist, and taking it as rejected would invite a second order."""
    cid = intent(store)
    store.record_order_sent(cid)
    store.record_order_accepted(cid, exchange_order_id="51")
    first = store.set_open_orders([], closed_orders=[])
    second = store.set_open_orders([], closed_orders=[])
    assert first.unresolved == (cid,) and second.not_found == () and second.unresolved == (cid,)
    o = store.get_ledger_order(cid)
    assert o is not None and o.status == "unknown"


def test_account_md_startup_recipe_makes_the_store_ready(store: ExchangeAccountStateStore) -> None:
    """issue 17.6 (docs): the startup recipe of docs/ACCOUNT.md, followed literally with a fake exchange, resolves an
    unknown submission that never arrived and an accepted order that filled while the bot was down, and ends ready."""
    lost = intent(store, "lost")
    store.record_order_sent(lost)
    store.record_order_status_unknown(lost, reason="timeout")
    done = intent(store, "done")
    store.record_order_sent(done)
    store.record_order_accepted(done, exchange_order_id="61")
    filled = {"id": "61", "clientOrderId": done, "symbol": BTC, "side": "buy", "type": "limit", "status": "closed"}
    filled.update(amount=1, filled=1, price=100)

    class OrderNotFound(Exception):
        pass

    class Exchange:
        def fetch_positions(self) -> list[Any]:
            return []

        def fetch_open_orders(self) -> list[Any]:
            return []

        def fetch_balance(self) -> dict[str, Any]:
            return {"USDT": {"total": 100, "free": 100}}

        def fetch_order(self, order_id: str | None, symbol: str, params: Any = None) -> dict[str, Any]:
            if order_id == "61":
                return filled
            raise OrderNotFound(order_id)

    def find_order(exchange: Exchange, order: Any) -> Any:
        try:
            if order.exchange_order_id:
                return exchange.fetch_order(order.exchange_order_id, order.symbol)
            return exchange.fetch_order(None, order.symbol, {"clientOrderId": order.client_order_id})
        except OrderNotFound:
            return None

    exchange = Exchange()
    store.set_positions(exchange.fetch_positions())
    open_orders = exchange.fetch_open_orders()
    store.set_open_orders(open_orders)
    closed = [o for o in (find_order(exchange, u) for u in store.unknown_orders()) if o]
    store.set_open_orders(open_orders, closed_orders=closed)
    store.set_balances(exchange.fetch_balance())
    assert store.ready_to_trade(), store.readiness()
    assert store.get_ledger_order(lost).status == "rejected"  # type: ignore[union-attr]
    assert store.get_ledger_order(done).status == "filled"  # type: ignore[union-attr]


def test_restore_keeps_the_forgotten_client_ids(tmp_path: Path) -> None:
    """issue 17.1: a restore of a backup older than a forget_order() keeps the forgotten client id: the same decision
    recorded again is still refused."""
    cfg = config(tmp_path / "state")
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        m.save()
        backup = m.create_backup()
        cid = filled_order(s)
        s.forget_order(cid)
        m.restore_from_backup(backup.id, accept_older=True)
        with pytest.raises(OrderTransitionError, match="forget_order"):
            intent(s)
        s.close()
    with PositionStateManager(cfg) as m:
        s = ExchangeAccountStateStore(m)
        with pytest.raises(OrderTransitionError, match="forget_order"):
            intent(s)
        s.close()
