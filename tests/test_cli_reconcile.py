"""``posstate reconcile --positions FILE [--apply]`` with recorded ccxt payloads (tests/data/ccxt_*.json):
the report as a table and JSON, exit 0 in sync or applied, 1 out of sync, confirmation for --apply."""

from __future__ import annotations

import json
import os
import socket
from decimal import Decimal
from pathlib import Path

import pytest
from test_cli import err_line, run

from posstate.cli import base as _cli_base
from posstate.core.config import StateConfig
from posstate.manager.manager import PositionStateManager
from posstate.model.document import StateData
from posstate.model.position import Position
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring
from posstate.storage.lock import WriterLock

DATA = Path(__file__).parent / "data"
BTC, ETH, DOGE = "BTC/USDT:USDT", "ETH/USDT:USDT", "DOGE/USDT:USDT"


@pytest.fixture
def state(tmp_path: Path, key: bytes) -> Path:
    """The bot's saved book matching ccxt_binance_hedge.json: BTC long + short, ETH long (local stop loss), ETH metadata."""
    d = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9), key=key) as m:
        m.load_positions()
        m.set_position(Position(symbol=BTC, side="long", contracts=Decimal("0.01"), entry_price=Decimal("91250.5")))
        m.set_position(Position(symbol=BTC, side="short", contracts=Decimal("0.005"), entry_price=Decimal("92010.0")))
        m.set_position(
            Position(
                symbol=ETH, side="long", contracts=Decimal("0.5"), entry_price=Decimal("3010.25"), stop_loss_price=Decimal("2900")
            )
        )
        m.set_symbol_metadata(ETH, {"entries_long": 2})
        m.save()
    return d


def keyed(state: Path, key_file: Path) -> list[str]:
    return ["--state-dir", str(state), "--key-file", str(key_file)]


def saved(state: Path, key: bytes) -> StateData:
    return _statefile.read(state / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key))).state


def reopened(state: Path, key: bytes) -> tuple[set[tuple[str, str]], dict[str, dict[str, object]]]:
    """The positions and metadata a restarted bot loads (the state file plus its journal)."""
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=key) as m:
        return set(m.get_positions()), m.get_all_symbol_metadata()


def state_files(state: Path) -> dict[str, bytes]:
    """The bytes of the state file and the journal (those that exist)."""
    return {n: (state / n).read_bytes() for n in ("positions.json", "positions.json.journal") if (state / n).exists()}


def reconcile(state: Path, key_file: Path, fixture: str, *extra: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return run([*keyed(state, key_file), "reconcile", "--positions", str(DATA / fixture), *extra], input=input)


def test_in_sync_exit_0(state: Path, key_file: Path) -> None:
    """The hedge-mode payload matches the saved book: IN SYNC, no table, exit 0; --json says in_sync."""
    r = reconcile(state, key_file, "ccxt_binance_hedge.json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{state}/positions.json vs {DATA}/ccxt_binance_hedge.json: 3 open exchange positions (2 flat skipped); "
        "tolerance 0 contracts, price tolerance 0",
        "",
        "IN SYNC",
    ]
    out = json.loads(reconcile(state, key_file, "ccxt_binance_hedge.json", "--json").stdout)
    assert out["in_sync"] is True and out["applied"] is None and out["generation"] is None


def test_closed_while_down_without_apply_exit_1_writes_nothing(state: Path, key_file: Path) -> None:
    """ETH closed on the exchange while the bot was down: a 'stale locally' row, exit 1 with the next command,
    and the state file byte for byte unchanged."""
    before = (state / "positions.json").read_bytes()
    r = reconcile(state, key_file, "ccxt_closed_while_down.json")
    assert r.exit_code == 1
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["stale", "locally", ETH, "long", "0.5", "-", "3010.25", "-"] in rows
    assert r.stdout.splitlines()[-1] == "OUT OF SYNC"
    assert err_line(r) == (
        f"Error: {state}/positions.json: the saved positions differ from the exchange's in "
        f"{DATA}/ccxt_closed_while_down.json (see the report); make them match with "
        f"`posstate reconcile --positions {DATA}/ccxt_closed_while_down.json --apply`"
    )
    out = json.loads(reconcile(state, key_file, "ccxt_closed_while_down.json", "--json").stdout)
    assert [p["symbol"] for p in out["stale_locally"]] == [ETH] and out["in_sync"] is False
    assert (state / "positions.json").read_bytes() == before


def test_apply_with_yes_saves_and_keeps_metadata(state: Path, key: bytes, key_file: Path) -> None:
    """--apply --yes: the DOGE short opened by hand is added, exit 0, metadata kept; a restarted bot loads it,
    and the state file holds it as the next generation, the one the output names."""
    before = saved(state, key).generation
    r = reconcile(state, key_file, "ccxt_opened_by_hand.json", "--apply", "--yes")
    assert r.exit_code == 0, r.stderr
    assert ["missing", "locally", DOGE, "short", "-", "1200.0", "-", "0.16234"] in [
        line.split() for line in r.stdout.splitlines()
    ]
    assert r.stdout.splitlines()[-5:-1] == [
        "applied:",
        f"  added:   {DOGE} short",
        "  removed: none",
        f"  updated: {BTC} long, {BTC} short, {ETH} long",  # the exchange's mark price, PnL, leverage ...
    ]
    book = {(BTC, "long"), (BTC, "short"), (ETH, "long"), (DOGE, "short")}
    positions, metadata = reopened(state, key)
    assert positions == book and metadata[ETH] == {"entries_long": 2}
    st = saved(state, key)  # "saved as generation N": that generation of the state file holds the applied book
    # Past the applied record's generation (a journaled change moves it, issue 12.10), then one save.
    assert r.stdout.splitlines()[-1] == f"saved as generation {st.generation}" and st.generation > before
    assert set(st.positions) == book and st.metadata[ETH] == {"entries_long": 2}
    r = reconcile(state, key_file, "ccxt_opened_by_hand.json", "--apply", "--yes")
    assert r.exit_code == 0 and r.stdout.splitlines()[-2:] == ["IN SYNC", "nothing to apply"]


def test_apply_confirmation(state: Path, key: bytes, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--apply without a terminal needs --yes (exit 2); on a terminal 'n' is exit 1 and 'y' applies (exit 0)."""
    before = state_files(state)
    r = reconcile(state, key_file, "ccxt_closed_while_down.json", "--apply")
    assert r.exit_code == 2
    assert err_line(r) == ("Error: reconcile --apply needs confirmation and there is no terminal to ask on; rerun with --yes")
    monkeypatch.setattr(_cli_base, "is_terminal", lambda: True)
    r = reconcile(state, key_file, "ccxt_closed_while_down.json", "--apply", input="n\n")
    assert r.exit_code == 1 and r.stderr.splitlines()[-1] == "Error: reconcile --apply not confirmed; nothing was changed"
    assert state_files(state) == before
    r = reconcile(state, key_file, "ccxt_closed_while_down.json", "--apply", input="y\n")
    assert r.exit_code == 0, r.stderr
    assert f"  removed: {ETH} long" in r.stdout.splitlines()
    positions, _ = reopened(state, key)
    assert (ETH, "long") not in positions and (BTC, "long") in positions


def test_tolerances(state: Path, key_file: Path) -> None:
    """BTC long differs by 0.0002 contracts and ETH's entry by 0.75: out of sync at tolerance 0, in sync at
    --tolerance 0.001 (row 'size (within tolerance)'); --price-tolerance 1 hides the entry price row."""
    r = reconcile(state, key_file, "ccxt_size_mismatch.json")
    assert r.exit_code == 1
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["size", "mismatch", BTC, "long", "0.01", "0.0102"] in rows
    assert ["entry", "price", ETH, "long", "3010.25", "3011.0"] in rows
    r = reconcile(state, key_file, "ccxt_size_mismatch.json", "--tolerance", "0.001", "--price-tolerance", "1")
    assert r.exit_code == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["size", "(within", "tolerance)", BTC, "long", "0.01", "0.0102"] in rows
    assert not any(row[:2] == ["entry", "price"] for row in rows) and r.stdout.splitlines()[-1] == "IN SYNC"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--tolerance", "-1"],
            "Error: Invalid value for '--tolerance': '-1' is not a number >= 0; see `posstate reconcile --help`",
            id="negative",
        ),
        pytest.param(
            ["--price-tolerance", "abc"],
            "Error: Invalid value for '--price-tolerance': 'abc' is not a number; see `posstate reconcile --help`",
            id="not-a-number",
        ),
    ],
)
def test_bad_tolerance_is_a_usage_error(state: Path, key_file: Path, args: list[str], message: str) -> None:
    """A negative or non-numeric tolerance: exit 2 and one Error line."""
    r = reconcile(state, key_file, "ccxt_binance_hedge.json", *args)
    assert r.exit_code == 2
    assert err_line(r) == message


def test_bad_exchange_files(state: Path, key_file: Path, tmp_path: Path) -> None:
    """A missing exchange file is exit 6; a file that is not a JSON list is exit 1; the state is untouched."""
    before = (state / "positions.json").read_bytes()
    r = run([*keyed(state, key_file), "reconcile", "--positions", str(tmp_path / "none.json")])
    assert r.exit_code == 6
    assert err_line(r) == (
        f"Error: {tmp_path}/none.json: no such exchange positions file; save ccxt fetch_positions() output as JSON there"
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    r = run([*keyed(state, key_file), "reconcile", "--positions", str(bad), "--apply", "--yes"])
    assert r.exit_code == 1
    assert err_line(r).startswith(f"Error: {bad}: ")
    assert (state / "positions.json").read_bytes() == before


def test_reconcile_refused_while_locked(state: Path, key_file: Path) -> None:
    """reconcile takes the writer lock: while a bot holds it, exit 5 naming pid and host."""
    cfg = StateConfig.in_dir(state)
    lock = WriterLock(cfg.lock_path, state_path=cfg.state_path)
    try:
        r = reconcile(state, key_file, "ccxt_binance_hedge.json")
        assert r.exit_code == 5
        assert err_line(r) == (
            f"Error: {state}/positions.json: locked by pid {os.getpid()} on host {socket.gethostname()}; stop that "
            "process first, or use a read-only command such as `posstate validate` or `posstate show`"
        )
    finally:
        lock.release()
