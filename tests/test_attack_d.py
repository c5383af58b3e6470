"""Outside review of the hostile-input work (issue 12.14-12.18): each test is a hole found by attacking an entry point."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from posstate import (
    ConfigError,
    CorruptStateError,
    MissingKeyError,
    Position,
    PositionStateManager,
    SchemaValidationError,
    StateConfig,
)
from posstate.account.reconcile_file import read_exchange_positions
from posstate.account.types import Order
from posstate.manager.orders import OrderIntents, make_client_order_id
from posstate.model import document as _document
from posstate.model import fastpath as _fastpath
from posstate.model import ops as jops
from posstate.model import schema as _schema
from posstate.storage import codec as _codec

NOW = 1_800_000_000.0


def _doc(mark_price: str | None = None) -> dict[str, Any]:
    """A valid state document (as posstate writes it) with one position, optionally with *mark_price* as given."""
    position: dict[str, Any] = {"symbol": "BTC", "side": "long", "contracts": "1", "entry_price": "100"}
    if mark_price is not None:
        position["mark_price"] = mark_price
    return {
        "schema_version": 1,
        "generation": 2,
        "written_at": "2024-01-02T03:04:05.000Z",
        "writer": {"host": "h", "pid": 1, "version": "0.1.0"},
        "positions": {"BTC|long": {"rev": 1, "position": position}},
        "symbol_metadata": {"BTC": {"rev": 2, "data": {"n": 1}}},
        "tombstones": {"positions": {}, "symbol_metadata": {}},
    }


def _plain_state(d: Path, doc: dict[str, Any]) -> None:
    """Write *doc* as a plaintext state file (JSON text by the stdlib: what a hostile writer or another tool writes)."""
    d.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(doc).encode()
    encoded = _codec.encode(
        payload,
        generation=doc["generation"],
        written_at_ms=0,
        position_count=len(doc["positions"]),
        compression_level=3,
        keyring=None,
    )
    (d / "positions.json").write_bytes(encoded.data)


def _plain(d: Path, **kw: Any) -> StateConfig:
    return StateConfig.in_dir(d, encryption=False, backup_interval=1e9, durability="snapshot", **kw)


# ------------------------------------------------------------------------------------------ decimals (12.17)
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0.000001e-999", id="adjusted-exponent-below"),
        pytest.param("99999.9e999", id="adjusted-exponent-above"),
        pytest.param("1" * 60 + "e-65", id="text-grows-past-64"),
        pytest.param("1" * 62 + "e1", id="E+-form-grows-past-64"),
    ],
)
def test_decimal_the_schema_pattern_accepts_but_position_cannot_write_is_refused_at_load(text: str) -> None:
    """issue 12.17: a decimal text within the pattern whose value is out of range (0.000001e-999 is 1E-1005) or whose
    str() is over 64 characters is refused at load (typed), never loaded as a Position that writes an invalid file."""
    doc = _doc(mark_price=text)
    assert len(text) <= 64 and not _schema.schema_errors(doc)  # the pattern alone passes it
    with pytest.raises(SchemaValidationError, match="mark_price"):
        _document.decode_document(doc, path=None, now=NOW)


def test_fast_path_still_accepts_ordinary_exponents() -> None:
    """issue 12.17: the extra exponent check refuses only out-of-range values: 1.5E-7, 1E+999, 0E-999 still load fast."""
    for text in ["1.5E-7", "1E+999", "-9.99E-999", "0E-999", "1e5"]:
        state = _fastpath._fast_decode(_doc(mark_price=text))
        p = state.positions[("BTC", "long")]
        assert Position(**p.to_dict()) == p  # what a save writes is a valid Position again


# ------------------------------------------------------------------------------------------ plaintext numbers
@pytest.mark.parametrize("number", ["123456789012345678901234567890", "-9223372036854775809", "1e400", "-1e400"])
def test_plain_file_number_that_cannot_be_written_back_is_refused(tmp_path: Path, number: str) -> None:
    """issue 12.17: a plaintext file whose metadata holds an integer beyond 64 bits (or 1e400, infinity) is refused at
    load (CorruptStateError), never loaded so that every later save raises TypeError (or writes null)."""
    text = json.dumps(_doc()).replace('"n": 1', f'"n": {number}')
    _plain_state(tmp_path, json.loads(text.replace(number, "1")))  # a valid file first, so the directory is set up
    payload = text.encode()
    encoded = _codec.encode(payload, generation=2, written_at_ms=0, position_count=1, compression_level=3, keyring=None)
    (tmp_path / "positions.json").write_bytes(encoded.data)
    with pytest.raises(CorruptStateError, match=r"64 bits|infinity"):
        _document.loads(payload, path=None, strict=True)
    with PositionStateManager(_plain(tmp_path)) as m, pytest.raises((CorruptStateError, ConfigError)) as info:
        m.load_positions()
    assert not isinstance(info.value, TypeError)


def test_plain_file_numbers_at_the_64_bit_edges_still_load() -> None:
    """issue 12.17: the strict parser keeps every integer orjson can write back (-2**63 .. 2**64-1) and finite floats."""
    for number in [str(-(2**63)), str(2**64 - 1), "1.5e300", "-0.0"]:
        doc = _document.loads(json.dumps(_doc()).replace('"n": 1', f'"n": {number}').encode(), path=None, strict=True)
        orjson.dumps(doc)


# ------------------------------------------------------------------------------------------ journal replay
@pytest.mark.parametrize(
    "record",
    [
        {"op": "delete_position", "rev": 3, "symbol": "\ud800", "side": "long"},
        {"op": "delete_position", "rev": 3, "symbol": "A\x00", "side": "long"},
        {"op": "delete_position", "rev": 3, "symbol": "A" * 200, "side": "short"},
        {"op": "delete_symbol_metadata", "rev": 3, "symbol": "\u202eA"},
        {"op": "delete_symbol_metadata", "rev": 3, "symbol": ""},
    ],
)
def test_replayed_delete_whose_tombstone_the_snapshot_refuses_is_corrupt(record: dict[str, Any]) -> None:
    """issue 12.17: a journal delete record naming a symbol the text rule refuses is an invalid record at replay, never a
    tombstone that makes the next snapshot unloadable (or, with a lone surrogate, every save raise TypeError)."""
    with pytest.raises(CorruptStateError, match="invalid operation"):
        jops.from_json(record, path=Path("positions.json.journal"), seq=1)


# ------------------------------------------------------------------------------------------ config (account, types)
@pytest.mark.parametrize("exchange", ["a\x00b", "", "e" * 65, "a\u202eb", "a\ud800"])
def test_config_account_name_the_schema_refuses_is_a_config_error(tmp_path: Path, exchange: str) -> None:
    """issue 12.17: an exchange name the schema's account rule refuses is ConfigError at once, never a save that
    succeeds and leaves a file no later load accepts (or a TypeError at save for a lone surrogate)."""
    with pytest.raises(ConfigError):
        _plain(tmp_path, exchange=exchange, account_id="main")
    with pytest.raises(ConfigError):
        _plain(tmp_path, exchange="binance", account_id=exchange.replace("e" * 65, "x" * 129))


@pytest.mark.parametrize(
    "setting",
    [
        'max_document_bytes = "big"',
        "max_document_bytes = 0",
        "max_backups = 1.5",
        "compression_level = 3.5",
        "clock_skew = nan",
        'encryption = "no"',
    ],
)
def test_config_file_value_of_the_wrong_type_is_a_config_error(tmp_path: Path, setting: str) -> None:
    """--config: a TOML value of the wrong type (or NaN seconds) is ConfigError (CLI exit 2), never a TypeError at the
    first save or a check silently turned off."""
    cfg = tmp_path / "posstate.toml"
    cfg.write_text(f'state_file = "{tmp_path}/s/positions.json"\nbackup_dir = "{tmp_path}/s/backups"\n{setting}\n')
    with pytest.raises(ConfigError):
        StateConfig.from_file(cfg)


# ------------------------------------------------------------------------------------------ order ids (12.18)
def test_client_order_id_prefix_with_trailing_newline_is_refused() -> None:
    """issue 12.17/12.18: the prefix pattern is anchored, so 'ab\\n' is refused (ids are [A-Za-z0-9] only)."""
    with pytest.raises(SchemaValidationError):
        make_client_order_id(strategy="s", signal="x", symbol="A", side="buy", type="limit", amount=1, prefix="ab\n")


@pytest.mark.parametrize("field", ["strategy", "signal", "symbol", "side", "type", "prefix"])
def test_client_order_id_hostile_text_is_a_typed_error(field: str) -> None:
    """issue 12.18: a lone surrogate in any text field, or a prefix that is not a string, is SchemaValidationError,
    never a UnicodeEncodeError or TypeError."""
    kw: dict[str, Any] = {"strategy": "s", "signal": "x", "symbol": "A", "side": "buy", "type": "limit", "amount": 1}
    kw[field] = 5 if field == "prefix" else "a\udcff"
    with pytest.raises(SchemaValidationError):
        make_client_order_id(**kw)


def test_stored_order_intent_that_is_not_an_intent_is_a_typed_error(tmp_path: Path) -> None:
    """A state file whose order-intent metadata was edited (amount not a number, an entry not an object, a missing
    field) gives SchemaValidationError from get/all/mark_sent, never KeyError, TypeError or decimal.InvalidOperation."""
    with PositionStateManager(_plain(tmp_path)) as m:
        intents = OrderIntents(m)
        cid = intents.record(strategy="s", signal="x", symbol="A", side="buy", type="limit", amount=1)
        stored = copy.deepcopy(m.get_symbol_metadata("__posstate_orders__"))
        assert stored is not None
        for bad in [
            {**stored["intents"][cid], "amount": "abc"},
            [1, 2],
            {"amount": "1"},
            {**stored["intents"][cid], "recorded_at": "x"},
        ]:
            m.set_symbol_metadata("__posstate_orders__", {"version": 1, "intents": {cid: bad, "ps2": stored["intents"][cid]}})
            for call in (lambda: intents.get(cid), intents.all, lambda: intents.mark_sent(cid)):
                with pytest.raises(SchemaValidationError):
                    call()


# ------------------------------------------------------------------------------------------ public constructors
@pytest.mark.parametrize(
    "data", [5, None, "symbol", {1: 1, "zz": 2, "symbol": "A", "side": "long", "contracts": 1, "entry_price": 1}]
)
def test_position_from_dict_of_a_non_mapping_or_odd_keys_is_typed(data: Any) -> None:
    """Position.from_dict of a non-mapping, or of a mapping with non-string keys, is SchemaValidationError, not TypeError."""
    with pytest.raises(SchemaValidationError):
        Position.from_dict(data)


def test_decimal_subclass_cannot_choose_its_written_text(tmp_path: Path) -> None:
    """issue 12.17: a Decimal subclass given as a field is stored as a plain Decimal, so its own __str__ never decides
    the text a save writes (a text the schema refuses would make the file unloadable)."""

    class Odd(Decimal):
        def __str__(self) -> str:
            return "not a number"

    p = Position(symbol="A", side="long", contracts=Odd(1), entry_price=1)
    assert type(p.contracts) is Decimal and p.to_dict()["contracts"] == "1"
    with PositionStateManager(_plain(tmp_path)) as m:
        m.set_position(p)
        m.save()
    with PositionStateManager(_plain(tmp_path)) as m:
        assert m.get_position("A", "long") == p


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), float("-inf")])
def test_order_from_ccxt_with_non_finite_timestamp_is_typed(ts: float) -> None:
    """Order.from_ccxt with a NaN or infinite timestamp is SchemaValidationError, not ValueError/OverflowError."""
    with pytest.raises(SchemaValidationError):
        Order.from_ccxt({"id": "1", "symbol": "A", "side": "buy", "amount": 1, "timestamp": ts})


def test_order_from_ccxt_of_a_non_mapping_is_typed() -> None:
    """Order.from_ccxt of a list is SchemaValidationError, not AttributeError."""
    with pytest.raises(SchemaValidationError):
        Order.from_ccxt([1])  # type: ignore[arg-type]


def test_passphrase_that_is_not_unicode_text_is_a_key_error(tmp_path: Path) -> None:
    """A passphrase holding a lone surrogate (POSSTATE_PASSPHRASE with bytes that are not UTF-8) is MissingKeyError,
    never a UnicodeEncodeError at the first save."""
    with pytest.raises(MissingKeyError), PositionStateManager(StateConfig.in_dir(tmp_path), passphrase="\udcff") as m:
        m.save()


# ------------------------------------------------------------------------------------------ reconcile --positions
@pytest.mark.parametrize(
    "content",
    [
        pytest.param("[" * 100_000 + "]" * 100_000, id="deep"),
        pytest.param('[{"symbol": "A", "side": "long", "contracts": ' + "1" * 5000 + ', "entryPrice": 1}]', id="huge-int"),
    ],
)
def test_exchange_positions_file_hostile_json_is_typed(tmp_path: Path, content: str) -> None:
    """reconcile --positions: deeply nested JSON or a 5000-digit integer is SchemaValidationError, never RecursionError
    or a ValueError from int()."""
    f = tmp_path / "exchange.json"
    f.write_text(content)
    with pytest.raises(SchemaValidationError):
        read_exchange_positions(f)
