"""Reconciliation against ccxt fetch_positions payloads (tests/data/ccxt_*.json, Binance USDM hedge mode)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import (
    AccountStateStore,
    PersistedAccountStateStore,
    Position,
    PositionStateManager,
    SchemaValidationError,
    StaleReportError,
    StateConfig,
    StateLockedError,
    StateNotFoundError,
    generate_key,
    reconcile_file,
)

DATA = Path(__file__).parent / "data"
BTC, ETH, DOGE = "BTC/USDT:USDT", "ETH/USDT:USDT", "DOGE/USDT:USDT"


def payload(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((DATA / name).read_text())
    return data


def local_store() -> AccountStateStore:
    """The bot's memory: the baseline hedge-mode book, a local stop loss on ETH, and metadata."""
    s = AccountStateStore()
    s.set_active_position(Position(symbol=BTC, side="long", contracts=Decimal("0.01"), entry_price=Decimal("91250.5")))
    s.set_active_position(Position(symbol=BTC, side="short", contracts=Decimal("0.005"), entry_price=Decimal("92010.0")))
    s.set_active_position(
        Position(
            symbol=ETH, side="long", contracts=Decimal("0.5"), entry_price=Decimal("3010.25"), stop_loss_price=Decimal("2900")
        )
    )
    s.set_symbol_metadata(ETH, {"entries_long": 2, "strategy": "grid"})
    s.set_symbol_metadata(BTC, {"entries_long": 1, "entries_short": 1})
    return s


def test_hedge_mode_in_sync() -> None:
    """The baseline payload (a long and a short on BTC, flat SOL entries) matches local state: in sync,
    flat entries skipped, nothing to apply."""
    s = local_store()
    report = s.reconcile(payload("ccxt_binance_hedge.json"))
    assert report.in_sync
    assert report.skipped_flat == 2
    assert set(report.exchange_positions) == {(BTC, "long"), (BTC, "short"), (ETH, "long")}
    assert report.entry_price_differences == ()


def test_position_closed_while_bot_was_down() -> None:
    """ETH long closed on the exchange while the bot was down: reported stale; apply removes it and keeps
    ETH's metadata; the hedge on BTC is untouched."""
    s = local_store()
    report = s.reconcile(payload("ccxt_closed_while_down.json"))
    assert not report.in_sync
    assert [p.key for p in report.stale_locally] == [(ETH, "long")]
    assert report.missing_locally == () and report.size_mismatches == ()
    assert s.get_active_position(ETH, "long") is not None  # the report changed nothing
    applied = report.apply(s)
    assert applied.removed == ((ETH, "long"),)
    assert s.get_active_position(ETH, "long") is None
    assert s.get_symbol_metadata(ETH) == {"entries_long": 2, "strategy": "grid"}
    assert s.is_symbol_side_in_position(BTC, "short")


def test_position_opened_by_hand() -> None:
    """A DOGE short opened by hand on the exchange is missing locally; apply adds it with the exchange's values."""
    s = local_store()
    report = s.reconcile(payload("ccxt_opened_by_hand.json"))
    assert [p.key for p in report.missing_locally] == [(DOGE, "short")]
    assert report.stale_locally == ()
    report.apply(s)
    doge = s.get_active_position(DOGE, "short")
    assert doge is not None
    assert (doge.contracts, doge.entry_price, doge.margin_mode) == (Decimal("1200.0"), Decimal("0.16234"), "isolated")


@pytest.mark.parametrize(
    ("tolerance", "over"),
    [
        pytest.param("0.001", [], id="within-tolerance"),
        pytest.param("0.0001", [(BTC, "long")], id="over-tolerance"),
        pytest.param("0", [(BTC, "long")], id="exact"),
    ],
)
def test_size_mismatch_tolerance(tolerance: str, over: list[tuple[str, str]]) -> None:
    """BTC long is 0.0102 on the exchange vs 0.01 here: within a 0.001 tolerance it is listed as within
    tolerance and the report is in sync; beyond it, a size mismatch."""
    s = local_store()
    report = s.reconcile(payload("ccxt_size_mismatch.json"), tolerance=Decimal(tolerance))
    assert [(m.symbol, m.side) for m in report.size_mismatches] == over
    assert report.in_sync is (not over)
    mismatch = (report.size_mismatches + report.size_within_tolerance)[0]
    assert (mismatch.local_contracts, mismatch.exchange_contracts, mismatch.difference) == (
        Decimal("0.01"),
        Decimal("0.0102"),
        Decimal("0.0002"),
    )
    assert [(d.symbol, d.difference) for d in report.entry_price_differences] == [(ETH, Decimal("0.75"))]


def test_entry_price_tolerance() -> None:
    """An entry price difference within price_tolerance is not reported."""
    report = local_store().reconcile(payload("ccxt_size_mismatch.json"), price_tolerance="1")
    assert report.entry_price_differences == ()


def test_side_mismatch_reported_once() -> None:
    """ETH is long here and short on the exchange: one side mismatch, not also a stale and a missing entry;
    apply replaces the long by the short."""
    s = local_store()
    report = s.reconcile(payload("ccxt_side_flip.json"))
    assert [(m.symbol, [p.side for p in m.local], [p.side for p in m.exchange]) for m in report.side_mismatches] == [
        (ETH, ["long"], ["short"])
    ]
    assert report.stale_locally == () and report.missing_locally == ()
    applied = s.apply_reconciliation(report)
    assert (applied.added, applied.removed) == (((ETH, "short"),), ((ETH, "long"),))
    assert s.get_active_position(ETH, "long") is None
    assert s.get_symbol_metadata(ETH) == {"entries_long": 2, "strategy": "grid"}


def test_apply_keeps_metadata_and_local_stop_loss_and_emits() -> None:
    """Apply keeps every symbol's metadata and local fields the exchange does not report (ETH's stop loss),
    queues position updates with source 'reconcile', and emits reconciliationApplied."""
    s = local_store()
    events: list[dict[str, Any]] = []
    s.on("reconciliationApplied", events.append)
    q = s.subscribe(maxsize=64)
    metadata = s.get_all_symbol_metadata()
    report = s.reconcile(payload("ccxt_size_mismatch.json"))
    applied = report.apply(s)
    eth = s.get_active_position(ETH, "long")
    assert eth is not None and eth.stop_loss_price == Decimal("2900") and eth.entry_price == Decimal("3011.0")
    assert s.get_all_symbol_metadata() == metadata
    updates = [q.get_nowait() for _ in range(q.qsize())]
    assert {u.source for u in updates} == {"reconcile"}
    # Every kept position takes the exchange's fuller record (mark price, leverage...), so all three update.
    assert {u.key for u in updates} == set(applied.updated) == {(BTC, "long"), (BTC, "short"), (ETH, "long")}
    assert len(events) == 1 and events[0]["version"] == s.version
    assert s.reconcile(payload("ccxt_size_mismatch.json")).in_sync


def test_stale_report_is_refused() -> None:
    """A report whose local positions changed since it was made is refused (StaleReportError), store unchanged."""
    s = local_store()
    report = s.reconcile(payload("ccxt_closed_while_down.json"))
    s.set_active_position(Position(symbol="XRP/USDT:USDT", side="long", contracts=1, entry_price=1))  # type: ignore[arg-type]
    before = s.snapshot()
    with pytest.raises(StaleReportError):
        report.apply(s)
    assert s.snapshot() is before


def test_report_to_dict_is_json() -> None:
    """to_dict() is plain JSON with decimals as strings."""
    report = local_store().reconcile(payload("ccxt_opened_by_hand.json"))
    text = json.dumps(report.to_dict())
    data = json.loads(text)
    assert data["in_sync"] is False
    assert data["missing_locally"][0]["contracts"] == "1200.0"


@pytest.mark.parametrize(
    ("items", "path"),
    [
        pytest.param([{"symbol": BTC, "side": "long", "contracts": 1}], "$[0].entry_price", id="no-entry-price"),
        pytest.param([{"symbol": BTC, "side": None, "contracts": 1, "entryPrice": 1}], "$[0].side", id="no-side"),
        pytest.param([{"symbol": BTC, "side": "long", "contracts": -1, "entryPrice": 1}], "$[0].contracts", id="negative"),
        pytest.param(["x"], "$[0]", id="not-a-dict"),
        pytest.param(
            [{"symbol": BTC, "side": "long", "contracts": 1, "entryPrice": 1}] * 2,
            "$[1]",
            id="duplicate",
        ),
    ],
)
def test_bad_exchange_payload(items: list[Any], path: str) -> None:
    """A malformed ccxt payload raises SchemaValidationError naming the entry, and changes nothing."""
    s = local_store()
    before = s.snapshot()
    with pytest.raises(SchemaValidationError) as info:
        s.reconcile(items)
    assert info.value.json_path == path
    assert s.snapshot() is before


def test_negative_tolerance_refused() -> None:
    """A negative tolerance is a SchemaValidationError."""
    with pytest.raises(SchemaValidationError):
        local_store().reconcile([], tolerance=-1)


# ------------------------------------------------------------------------------------------ reconcile_file
KEY = generate_key()


def saved_state(tmp_path: Path) -> StateConfig:
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=KEY) as m:
        store = PersistedAccountStateStore(m)
        for p in local_store().get_positions().values():
            store.set_active_position(p)
        store.set_symbol_metadata(ETH, {"entries_long": 2})
        m.set_symbol_metadata("__posstate_orders__", {"version": 1, "intents": {}})
        m.save()
    return cfg


def test_reconcile_file_dry_run_writes_nothing(tmp_path: Path) -> None:
    """Without apply, reconcile_file reports and leaves the state file byte for byte as it was."""
    cfg = saved_state(tmp_path)
    before = cfg.state_path.read_bytes()
    result = reconcile_file(cfg.state_dir, DATA / "ccxt_closed_while_down.json", key=KEY)
    assert [p.key for p in result.report.stale_locally] == [(ETH, "long")]
    assert result.applied is None and result.generation is None
    assert cfg.state_path.read_bytes() == before
    assert json.loads(json.dumps(result.to_dict()))["applied"] is None


def test_reconcile_file_apply_saves_and_keeps_metadata(tmp_path: Path) -> None:
    """With apply, the saved positions match the exchange; metadata and order intents are kept."""
    cfg = saved_state(tmp_path)
    result = reconcile_file(cfg, DATA / "ccxt_opened_by_hand.json", apply=True, key=KEY)
    assert result.applied is not None and result.applied.added == ((DOGE, "short"),)
    with PositionStateManager(cfg, key=KEY) as m:
        positions = m.load_positions()
        assert m.generation == result.generation
        assert set(positions) == {(BTC, "long"), (BTC, "short"), (ETH, "long"), (DOGE, "short")}
        assert m.get_symbol_metadata(ETH) == {"entries_long": 2}
        assert m.get_symbol_metadata("__posstate_orders__") == {"version": 1, "intents": {}}
    again = reconcile_file(cfg, DATA / "ccxt_opened_by_hand.json", apply=True, key=KEY)
    assert again.report.in_sync and again.generation is None


@pytest.mark.parametrize(
    ("content", "error"),
    [
        pytest.param(None, StateNotFoundError, id="missing"),
        pytest.param(b"{not json", SchemaValidationError, id="not-json"),
        pytest.param(b'{"a": 1}', SchemaValidationError, id="not-a-list"),
    ],
)
def test_reconcile_file_bad_input(tmp_path: Path, content: bytes | None, error: type[Exception]) -> None:
    """A missing or malformed exchange file is a typed error naming the file; the state is untouched."""
    cfg = saved_state(tmp_path)
    before = cfg.state_path.read_bytes()
    exchange = tmp_path / "exchange.json"
    if content is not None:
        exchange.write_bytes(content)
    with pytest.raises(error) as info:
        reconcile_file(cfg, exchange, apply=True, key=KEY)
    assert "exchange.json" in str(info.value)
    assert cfg.state_path.read_bytes() == before


def test_reconcile_file_while_bot_runs_is_locked(tmp_path: Path) -> None:
    """reconcile_file takes the writer lock: with the bot's manager open it raises StateLockedError."""
    cfg = saved_state(tmp_path)
    with PositionStateManager(cfg, key=KEY), pytest.raises(StateLockedError):
        reconcile_file(cfg, DATA / "ccxt_binance_hedge.json", key=KEY)
