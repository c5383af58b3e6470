"""Hostile documents and values: typed errors, never RecursionError or a TypeError at the next save (issue 12.16, 12.17)."""

from __future__ import annotations

import copy
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posstate import CorruptStateError, Position, PositionStateManager, PosStateError, SchemaValidationError, StateConfig
from posstate.model import document as _document
from posstate.model import fastpath as _fastpath
from posstate.model import schema as _schema
from posstate.model.document import MAX_JSON_DEPTH, StateData
from posstate.model.fastpath import _Reject
from posstate.model.position import BAD_TEXT
from posstate.storage import codec as _codec
from posstate.storage import statefile as _statefile
from posstate.storage import validate as _validate
from posstate.storage.crypto import Keyring, generate_key

NOW = 1_800_000_000.0
KEYRING = Keyring(key=generate_key())
#: Characters no symbol or key may hold: controls, lone surrogates, bidi embeddings/overrides/isolates.
HOSTILE_CHARS = ["\x00", "\x01", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9f", "\ud800", "\udfff"]
HOSTILE_CHARS += [chr(c) for c in range(0x202A, 0x202F)] + [chr(c) for c in range(0x2066, 0x206A)]


def _valid_doc() -> dict[str, Any]:
    p = Position(symbol="BTC/USDT", side="long", contracts=Decimal("0.5"), entry_price=Decimal("42000.1"))
    st_ = StateData(generation=5, written_at="2024-01-02T03:04:05.000Z", writer={"host": "h", "pid": 1, "version": "0.1.0"})
    st_.positions[p.key] = p
    st_.position_revs[p.key] = 5
    st_.metadata["BTC/USDT"] = {"entries": 1, "note": "ok"}
    st_.metadata_revs["BTC/USDT"] = 4
    st_.metadata_tombstones["ETH/USDT"] = 3
    st_.position_tombstones[("ETH/USDT", "short")] = 2
    st_.account = {"exchange": "binance", "account_id": "main", "mode": "live"}
    st_.journal = {"id": "0123456789abcdef0123456789abcdef", "seq": 1}
    doc = orjson.loads(_document.dumps(_document.build_document(st_)))
    assert isinstance(doc, dict)
    return doc


def _nested(depth: int, leaf: Any = 1) -> Any:
    """A value whose containers nest *depth* levels (alternating objects and lists), built without recursion."""
    node: Any = leaf
    for i in range(depth):
        node = {"k": node} if i % 2 else [node]
    return node


def _container(doc: Any, *, encrypted: bool) -> bytes:
    """The file bytes of *doc* written as posstate writes a state file (JSON text by the stdlib, so anything goes)."""
    payload = _json_text(doc).encode("utf-8", "surrogatepass")
    return _codec.encode(
        payload,
        generation=doc.get("generation", 0) if isinstance(doc, dict) else 0,
        written_at_ms=0,
        position_count=len(doc.get("positions", {})) if isinstance(doc, dict) else 0,
        compression_level=3,
        keyring=KEYRING if encrypted else None,
    ).data


def _json_text(doc: Any) -> str:
    """JSON text with lone surrogates written as \\uXXXX escapes (what a hostile writer would put in a file);
    iterative, as json.dumps would recurse on a deep value."""
    out: list[str] = []
    stack: list[tuple[str, Any]] = [("v", doc)]
    while stack:
        kind, item = stack.pop()
        if kind == "raw":
            out.append(item)
            continue
        todo: list[tuple[str, Any]] = []
        if isinstance(item, dict):
            out.append("{")
            for i, (k, v) in enumerate(item.items()):
                todo += [("raw", ",")] if i else []
                todo += [("raw", json.dumps(k) + ":"), ("v", v)]
            todo.append(("raw", "}"))
        elif isinstance(item, list):
            out.append("[")
            for i, v in enumerate(item):
                todo += [("raw", ",")] if i else []
                todo.append(("v", v))
            todo.append(("raw", "]"))
        else:
            out.append(json.dumps(item))
        stack.extend(reversed(todo))
    return "".join(out)


def _parse(data: bytes, *, encrypted: bool) -> _statefile.Loaded:
    options = _statefile.ReadOptions(keyring=KEYRING if encrypted else None)
    return _statefile.parse(data, path=Path("state/positions.json"), options=options, now=NOW)


def _fast(doc: Any) -> StateData | None:
    try:
        return _fastpath._fast_decode(doc)
    except _Reject:
        return None


def _schema_ok(doc: Any) -> bool:
    return not _schema.schema_errors(doc)


def test_json_text_helper_round_trips() -> None:
    """The test's own JSON writer gives what json.loads reads back (sanity for the tests below)."""
    doc = _valid_doc()
    assert orjson.loads(_json_text(doc)) == doc
    assert orjson.loads(_json_text(_nested(5))) == _nested(5)


# ------------------------------------------------------------------------------------------ issue 12.16
@pytest.mark.parametrize("encrypted", [pytest.param(False, id="plain"), pytest.param(True, id="encrypted")])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1100, 20_000])
def test_deep_metadata_in_a_file_is_a_typed_error(encrypted: bool, depth: int) -> None:
    """issue 12.16: metadata nested past the limit is SchemaValidationError/CorruptStateError at load, never RecursionError."""
    doc = _valid_doc()
    doc["symbol_metadata"]["BTC/USDT"]["data"] = {"deep": _nested(depth - 1)}
    data = _container(doc, encrypted=encrypted)
    with pytest.raises((SchemaValidationError, CorruptStateError)) as info:
        _parse(data, encrypted=encrypted)
    assert "deep" in str(info.value) or "nest" in str(info.value)


@pytest.mark.parametrize("depth", [300, 20_000])
def test_deep_value_anywhere_validates_to_a_report(tmp_path: Path, depth: int) -> None:
    """issue 12.16: `validate` on a plain file with a deep value outside metadata reports it invalid, no RecursionError."""
    doc = _valid_doc()
    doc["writer"]["host"] = _nested(depth)
    path = tmp_path / "positions.json"
    path.write_bytes(_container(doc, encrypted=False))
    report = _validate.validate_file(path, options=_statefile.ReadOptions(keyring=None))
    assert not report.valid
    assert isinstance(report.error, PosStateError)


def test_metadata_depth_limit_is_exact_in_setter_fast_path_and_schema() -> None:
    """issue 12.16: data nested exactly MAX_JSON_DEPTH levels is accepted by all three, one more level by none."""
    for depth, ok in ((MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False)):
        data = _nested(depth - 1)
        data = {"x": data}
        doc = _valid_doc()
        doc["symbol_metadata"]["BTC/USDT"]["data"] = data
        assert _schema_ok(doc) is ok, depth
        assert (_fast(doc) is not None) is ok, depth
        if ok:
            _document.clean_metadata("S", data)
            _document.decode_document(doc, path=None, now=NOW)
        else:
            with pytest.raises(SchemaValidationError, match="deeper"):
                _document.clean_metadata("S", data)
            with pytest.raises(SchemaValidationError, match="deeper"):
                _document.decode_document(doc, path=None, now=NOW)


def test_schema_states_the_depth_limit() -> None:
    """issue 12.16: the schema file itself holds the nesting limit (a reader of the schema alone finds it)."""
    defs = _schema.schema()["$defs"]
    assert f"json{MAX_JSON_DEPTH - 1}" in defs and f"json{MAX_JSON_DEPTH}" not in defs
    assert str(MAX_JSON_DEPTH) in _schema.schema()["$defs"]["metadataEntry"]["properties"]["data"]["description"]


# ------------------------------------------------------------------------------------------ issue 12.17
@pytest.mark.parametrize("ch", HOSTILE_CHARS, ids=[f"U+{ord(c):04X}" for c in HOSTILE_CHARS])
def test_hostile_symbol_refused_by_api(ch: str) -> None:
    """issue 12.17: a symbol or metadata key with a control, lone surrogate or bidi character is a SchemaValidationError."""
    with pytest.raises(SchemaValidationError):
        Position(symbol=f"BTC{ch}USDT", side="long", contracts=1, entry_price=1)
    with pytest.raises(SchemaValidationError):
        _document.clean_metadata(f"BTC{ch}", {"a": 1})
    with pytest.raises(SchemaValidationError):
        _document.clean_metadata("BTC", {f"a{ch}": 1})
    with pytest.raises(SchemaValidationError):
        _document.clean_metadata("BTC", {"a": {f"b{ch}": 1}})


@pytest.mark.parametrize("ch", ["\ud800", "\udc00"])
def test_lone_surrogate_in_a_metadata_value_is_refused(ch: str) -> None:
    """issue 12.17: a lone surrogate in a metadata string value is a SchemaValidationError (orjson cannot save it)."""
    with pytest.raises(SchemaValidationError):
        _document.clean_metadata("BTC", {"note": f"x{ch}"})
    with pytest.raises(SchemaValidationError):
        _document.clean_metadata("BTC", {"notes": [f"x{ch}"]})


def test_lone_surrogate_symbol_in_a_plain_file_is_refused(tmp_path: Path) -> None:
    """issue 12.17: a plain file whose symbol holds a lone surrogate is refused at load (it loaded, then every save raised)."""
    doc = _valid_doc()
    entry = doc["positions"].pop("BTC/USDT|long")
    entry["position"]["symbol"] = "BTC\ud800"
    doc["positions"]["BTC\ud800|long"] = entry
    with pytest.raises(SchemaValidationError):
        _parse(_container(doc, encrypted=False), encrypted=False)


@pytest.mark.parametrize(
    "where",
    ["position", "metadata-name", "metadata-key", "metadata-value", "tombstone", "account", "host"],
)
def test_lone_surrogate_anywhere_in_a_plain_file_is_refused(where: str) -> None:
    """issue 12.17: no lone surrogate loads from a plain file, wherever it sits."""
    doc = _valid_doc()
    bad = "X\udc01"
    if where == "position":
        doc["positions"]["BTC/USDT|long"]["position"]["margin_mode"] = bad
    elif where == "metadata-name":
        doc["symbol_metadata"][bad] = doc["symbol_metadata"].pop("BTC/USDT")
    elif where == "metadata-key":
        doc["symbol_metadata"]["BTC/USDT"]["data"][bad] = 1
    elif where == "metadata-value":
        doc["symbol_metadata"]["BTC/USDT"]["data"]["note"] = bad
    elif where == "tombstone":
        doc["tombstones"]["symbol_metadata"][bad] = 1
    elif where == "account":
        doc["account"]["account_id"] = bad
    else:
        doc["writer"]["host"] = bad
    with pytest.raises((SchemaValidationError, CorruptStateError)):
        _parse(_container(doc, encrypted=False), encrypted=False)
    assert not _schema_ok(doc)
    assert _fast(doc) is None


def test_manager_refuses_hostile_symbols(tmp_path: Path) -> None:
    """issue 12.17: the manager refuses a lone-surrogate symbol at the call, and the next save still works."""
    with PositionStateManager(StateConfig.in_dir(tmp_path / "s", encryption=False)) as m:
        with pytest.raises(SchemaValidationError):
            m.set_position(Position(symbol="BTC\ud800", side="long", contracts=1, entry_price=1))
        with pytest.raises(SchemaValidationError):
            m.set_symbol_metadata("BTC", {"k\ud800": 1})
        with pytest.raises(SchemaValidationError):
            m.set_symbol_metadata("BTC\u202e", {"k": 1})
        m.set_position(Position(symbol="BTC", side="long", contracts=1, entry_price=1))
        m.save()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("written_at", "2024-01-02T03:04:05.000Z\n", id="written_at"),
        pytest.param("journal", "0123456789abcdef0123456789abcdef\n", id="journal-id"),
        pytest.param("mark_price", "1\n", id="decimal"),
        pytest.param("key", "BTC/USDT|long\n", id="position-key"),
    ],
)
def test_trailing_newline_never_passes_a_pattern(field: str, value: str) -> None:
    """issue 12.17: a pattern-checked string with a trailing newline is refused by the schema and the fast path alike."""
    doc = _valid_doc()
    if field == "written_at":
        doc["written_at"] = value
    elif field == "journal":
        doc["journal"]["id"] = value
    elif field == "key":
        doc["positions"][value] = doc["positions"].pop("BTC/USDT|long")
    else:
        doc["positions"]["BTC/USDT|long"]["position"][field] = value
    assert not _schema_ok(doc)
    assert _fast(doc) is None


def test_schema_patterns_have_no_python_only_end_anchor() -> None:
    """issue 12.17: every pattern in the schema refuses a trailing newline in Python's re as in ECMA-262."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "pattern":
                    found.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(_schema.schema())
    assert found
    any_text = "^[^\\ud800-\\udfff]*$"  # a bare $ is harmless only where any tail, newline included, passes
    for pattern in found:
        assert pattern.endswith("$(?!\\n)") or pattern == any_text, pattern
        assert re.search(pattern, "a\n") is None or pattern == any_text
    assert _fastpath._WRITTEN_AT.pattern == _schema.schema()["properties"]["written_at"]["pattern"]
    assert _fastpath._JOURNAL_ID.pattern == _schema.schema()["properties"]["journal"]["properties"]["id"]["pattern"]
    text = _schema.schema()["$defs"]["text"]["pattern"]
    for code in range(0x3000):
        ch = chr(code)
        assert (re.search(text, ch) is None) == (BAD_TEXT.search(ch) is not None), hex(code)


@pytest.mark.parametrize("text", ["1E+999999999", "1E-999999999", "1E+1000", "-1.5E-1000", "0E+1000", "1e+0001"])
def test_decimal_exponent_is_bounded(text: str) -> None:
    """issue 12.17: a decimal whose text has an exponent of more than 3 digits is refused by the schema, the fast path
    and Position (which refuses the value, and writes 1e+0001 as 1E+1)."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"]["mark_price"] = text
    assert not _schema_ok(doc)
    assert _fast(doc) is None
    if text == "1e+0001":
        assert str(Position(symbol="BTC", side="long", contracts=1, entry_price=1, mark_price=text).mark_price) == "1E+1"
        return
    with pytest.raises(SchemaValidationError):
        Position(symbol="BTC", side="long", contracts=1, entry_price=1, mark_price=text)


@pytest.mark.parametrize("text", ["1E+999", "-1.5E-999", "1E+5"])
def test_decimal_exponent_within_bound_is_accepted(text: str) -> None:
    """issue 12.17: a 3-digit exponent is a valid decimal for the schema, the fast path and Position."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"]["mark_price"] = text
    assert _schema_ok(doc)
    assert _fast(doc) is not None
    assert str(Position(symbol="BTC", side="long", contracts=1, entry_price=1, mark_price=text).mark_price) == text


@pytest.mark.parametrize("text", ["-0", "-0.00", "-0E+3", "-0E-8"])
def test_negative_zero_has_one_canonical_form(text: str) -> None:
    """issue 12.17: -0 is normalised to 0 (same exponent, no sign) on input and at load; posstate never writes '-0'."""
    p = Position(symbol="BTC", side="long", contracts=text, entry_price=1, unrealized_pnl=Decimal(text))
    assert not p.contracts.is_signed() and not p.unrealized_pnl.is_signed()  # type: ignore[union-attr]
    assert p.to_dict()["contracts"] == text[1:]
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"]["unrealized_pnl"] = text
    assert _schema_ok(doc)
    state = _document.decode_document(doc, path=None, now=NOW)
    value = state.positions[("BTC/USDT", "long")].unrealized_pnl
    assert value is not None and not value.is_signed() and str(value) == text[1:]


HOSTILE_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from([*HOSTILE_CHARS, "|", "/", "A", "0", " ", "é", "😀"]), st.characters()),
    max_size=6,
).map(lambda s: s + "\n" if s.endswith("A") else s)


SLOTS = [
    "symbol",
    "metadata-name",
    "metadata-key",
    "metadata-value",
    "tombstone-position",
    "tombstone-metadata",
    "account",
    "host",
    "version",
    "written_at",
    "journal",
]


def _inject(doc: dict[str, Any], slot: str, text: str) -> None:
    if slot == "symbol":
        entry = doc["positions"].pop("BTC/USDT|long")
        entry["position"]["symbol"] = text
        doc["positions"][f"{text}|long"] = entry
    elif slot == "metadata-name":
        doc["symbol_metadata"][text] = doc["symbol_metadata"].pop("BTC/USDT")
    elif slot == "metadata-key":
        doc["symbol_metadata"]["BTC/USDT"]["data"] = {text: [1, {text: "v"}]}
    elif slot == "metadata-value":
        doc["symbol_metadata"]["BTC/USDT"]["data"]["note"] = [text]
    elif slot == "tombstone-position":
        doc["tombstones"]["positions"] = {f"{text}|short": 2}
    elif slot == "tombstone-metadata":
        doc["tombstones"]["symbol_metadata"] = {text: 2}
    elif slot == "account":
        doc["account"]["exchange"] = text
    elif slot == "host":
        doc["writer"]["host"] = text
    elif slot == "version":
        doc["writer"]["version"] = text
    elif slot == "written_at":
        doc["written_at"] = "2024-01-02T03:04:05.000Z" + text
    else:
        doc["journal"]["id"] = "0123456789abcdef0123456789abcdef" + text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot=st.sampled_from(SLOTS), text=HOSTILE_TEXT)
def test_fast_path_and_schema_agree_on_hostile_strings(slot: str, text: str) -> None:
    """issue 12.17: for hostile strings in every string slot, the fast path accepts exactly what jsonschema accepts,
    and whatever is accepted can be saved again (orjson encodes it)."""
    doc = copy.deepcopy(_valid_doc())
    _inject(doc, slot, text)
    fast = _fast(doc) is not None
    schema = _schema_ok(doc)
    assert fast == schema, (slot, text, [e.message for e in _schema.schema_errors(doc)][:1])
    if schema:
        state = _document.decode_document(doc, path=None, now=NOW)
        orjson.dumps(_document.build_document(state))
