"""The state document: fast-path validation agrees with jsonschema; relationship rules; error paths."""

from __future__ import annotations

import copy
import re
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posstate import CorruptStateError, Position, SchemaValidationError
from posstate.model import document as _document
from posstate.model import fastpath as _fastpath
from posstate.model import rules as _rules
from posstate.model import schema as _schema
from posstate.model.document import StateData
from posstate.model.fastpath import _Reject
from posstate.model.position import BAD_TEXT

DECIMAL_RE = re.compile(_schema.schema()["$defs"]["decimal"]["pattern"])
NOW = 1_800_000_000.0

NASTY_DECIMALS = [
    "01",
    "+1",
    ".5",
    "5.",
    "1_0",
    " 1",
    "1 ",
    "1\n",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "sNaN",
    "1e5",
    "1E+5",
    "1e-05",
    "-0",
    "0",
    "-0.0",
    "00",
    "-01",
    "1.e5",
    "1e",
    "-",
    "",
    "0x10",
    "\u0661\u0662",  # Arabic-Indic digits
    "\u0663.\u0665",  # Arabic-Indic digits
    "\uff11",  # fullwidth one
    "1,0",
    "1.5.5",
    "--1",
    "1" * 65,
    "0." + "0" * 62,
    "1E+999999",
    "-.5",
    "1.0",
    "0e0",
]
NASTY = st.one_of(
    st.sampled_from(NASTY_DECIMALS),
    st.integers(min_value=-3, max_value=2**64),
    st.floats(),
    st.sampled_from([1.0, 0.0, 2.0, 1e3]),  # ints written as floats
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.just({}),
    st.just([]),
    st.sampled_from(["long", "short", "cross", "isolated", "live", "paper", "flat", "LONG"]),
)

decimal_text = st.decimals(allow_nan=False, allow_infinity=False).map(str).filter(lambda s: len(s) <= 64)
symbols = st.text(alphabet="ABCXYZ/:|-_", min_size=1, max_size=12)


def safe_text(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[str]:
    """Text the schema's ``text`` rule accepts: no controls, lone surrogates or bidi overrides (issue 12.17)."""
    return st.text(min_size=min_size, max_size=max_size).filter(lambda s: BAD_TEXT.search(s) is None)


@st.composite
def positions(draw: st.DrawFn, generation: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 3))):
        sym, side = draw(symbols), draw(st.sampled_from(["long", "short"]))
        p: dict[str, Any] = {
            "symbol": sym,
            "side": side,
            "contracts": draw(decimal_text.filter(lambda s: not s.startswith("-"))),
            "entry_price": draw(decimal_text),
        }
        for name in (
            "contract_size",
            "mark_price",
            "notional",
            "leverage",
            "unrealized_pnl",
            "realized_pnl",
            "liquidation_price",
            "stop_loss_price",
            "take_profit_price",
        ):
            if draw(st.booleans()):
                p[name] = draw(decimal_text)
        if draw(st.booleans()):
            p["margin_mode"] = draw(st.sampled_from(["cross", "isolated"]))
        if draw(st.booleans()):
            p["timestamp"] = draw(st.integers(0, 2**53 - 1))
        out[f"{sym}|{side}"] = {"rev": draw(st.integers(0, generation)), "position": p}
    return out


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    g = draw(st.integers(0, 2**53 - 1))
    pos = draw(positions(g))
    meta_syms = draw(st.lists(symbols, max_size=3, unique=True))
    doc: dict[str, Any] = {
        "schema_version": 1,
        "generation": g,
        "written_at": draw(st.sampled_from(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.123Z", "1999-12-31T23:59:59.999999Z"])),
        "writer": {"host": draw(safe_text(max_size=8)), "pid": draw(st.integers(0, 2**31)), "version": "0.1.0"},
        "positions": pos,
        "symbol_metadata": {
            s: {"rev": draw(st.integers(0, g)), "data": {"entries": draw(st.integers(0, 9)), "note": draw(safe_text(max_size=5))}}
            for s in meta_syms
        },
        "tombstones": {
            "positions": {
                f"{s}|short": draw(st.integers(0, g))
                for s in draw(st.lists(symbols, max_size=2, unique=True))
                if f"{s}|short" not in pos
            },
            "symbol_metadata": {
                s + "-gone": draw(st.integers(0, g))
                for s in draw(st.lists(symbols, max_size=2, unique=True))
                if s + "-gone" not in meta_syms
            },
        },
    }
    if draw(st.booleans()):
        doc["account"] = {
            "exchange": "binance",
            "account_id": draw(safe_text(min_size=1, max_size=8)),
            "mode": draw(st.sampled_from(["live", "paper"])),
        }
    if draw(st.booleans()):
        doc["journal"] = {"id": "0123456789abcdef0123456789abcdef", "seq": draw(st.integers(0, 99))}
    return doc


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            _slots(v, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            _slots(v, out)
    return out


def _fast(doc: Any) -> StateData | None:
    try:
        return _fastpath._fast_decode(doc)
    except _Reject:
        return None


def _schema_ok(doc: Any) -> bool:
    return not _schema.schema_errors(doc)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_valid_documents_take_the_fast_path(doc: dict[str, Any]) -> None:
    """Every valid generated document passes jsonschema AND the fast path, with the same result as the slow path."""
    assert _schema_ok(doc)
    fast = _fast(doc)
    assert fast is not None, "fast path refused a valid document"
    slow = _rules._slow_decode(doc, path=None)
    assert fast.positions == slow.positions and fast.position_revs == slow.position_revs
    assert fast.metadata == slow.metadata and fast.position_tombstones == slow.position_tombstones
    assert _document.decode_document(doc, path=None, now=NOW).positions == slow.positions


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.data())
def test_fast_path_never_accepts_what_the_schema_refuses(doc: dict[str, Any], data: st.DataObject) -> None:
    """Mutate a valid document (replace, delete or add one value): if the fast path accepts it, jsonschema does too."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 2))):
        slots = _slots(doc, [])
        container, key = data.draw(st.sampled_from(slots))
        action = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if action == "replace":
            container[key] = data.draw(NASTY)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[
                data.draw(st.sampled_from(["extra", "rev", "position", "data", "symbol", "side", "contracts", "timestamp"]))
            ] = data.draw(NASTY)
    fast = _fast(doc)
    if fast is not None:
        assert _schema_ok(doc), f"fast path accepted a document jsonschema refuses: {_schema.schema_errors(doc)[0].message}"


@pytest.mark.parametrize("text", NASTY_DECIMALS)
def test_nasty_decimal_in_a_position(text: str) -> None:
    """Each nasty decimal string, put in a position, gets the same verdict from the fast path and jsonschema."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"]["mark_price"] = text
    schema_ok = _schema_ok(doc)
    if _fast(doc) is not None:
        assert schema_ok
    if schema_ok and DECIMAL_RE.fullmatch(text) and len(text) <= 64 and not _is_negative_zero(text):
        assert _fast(doc) is not None, "fast path should accept a schema-valid decimal"


def _is_negative_zero(text: str) -> bool:
    """A negative zero is valid but takes the slow path, where Position writes it as 0 (issue 12.17)."""
    return text.startswith("-") and Decimal(text).is_zero()


def _decimal_parses(s: str) -> bool:
    try:
        Decimal(s)
    except (InvalidOperation, ValueError):
        return False
    return True


@settings(max_examples=800, deadline=None)
@given(
    st.one_of(
        st.text(max_size=12), st.text(alphabet="0123456789.-+eE_ ,", max_size=12), st.sampled_from(NASTY_DECIMALS), decimal_text
    )
)
def test_decimal_strings_ok_matches_schema_pattern(s: str) -> None:
    """For any string Decimal() parses: decimal_strings_ok says yes exactly when the schema's pattern does."""
    if not _decimal_parses(s):
        return
    schema_says = bool(DECIMAL_RE.search(s)) and len(s) <= 64
    ok = _fastpath.decimal_strings_ok([s])
    if ok:
        assert schema_says
    if schema_says and DECIMAL_RE.fullmatch(s):
        assert ok
    # Joined with valid neighbours, the verdict must not change.
    assert _fastpath.decimal_strings_ok(["1", s, "-2.5"]) == ok


def test_decimal_strings_ok_refuses_non_strings() -> None:
    """Numbers (ints, floats) are never decimal strings."""
    assert not _fastpath.decimal_strings_ok(["1", 2])  # type: ignore[list-item]
    assert not _fastpath.decimal_strings_ok([1.5])  # type: ignore[list-item]
    assert _fastpath.decimal_strings_ok([])


# ------------------------------------------------------------------------------------------- relationships


def _valid_doc() -> dict[str, Any]:
    p = Position(symbol="BTC/USDT", side="long", contracts=Decimal("0.5"), entry_price=Decimal("42000.1"))
    st_ = StateData(generation=5, written_at="2024-01-02T03:04:05.000Z", writer={"host": "h", "pid": 1, "version": "0.1.0"})
    st_.positions[p.key] = p
    st_.position_revs[p.key] = 5
    st_.metadata["BTC/USDT"] = {"entries": 1}
    st_.metadata_revs["BTC/USDT"] = 4
    doc = orjson.loads(_document.dumps(_document.build_document(st_)))
    assert isinstance(doc, dict)
    return doc


def _error(doc: dict[str, Any], now: float = NOW) -> SchemaValidationError:
    with pytest.raises(SchemaValidationError) as info:
        _document.decode_document(doc, path="state/positions.json", now=now)
    return info.value


def test_valid_document_decodes() -> None:
    """The reference document decodes (sanity for the tests below)."""
    state = _document.decode_document(_valid_doc(), path=None, now=NOW)
    assert state.positions[("BTC/USDT", "long")].entry_price == Decimal("42000.1")


def test_key_mismatch() -> None:
    """A key that disagrees with its position's symbol/side is named with rule key-matches-position."""
    doc = _valid_doc()
    doc["positions"]["ETH/USDT|long"] = doc["positions"].pop("BTC/USDT|long")
    e = _error(doc)
    assert (e.json_path, e.rule) == ("$.positions['ETH/USDT|long']", "key-matches-position")


def test_duplicate_position_under_two_keys() -> None:
    """Two entries holding the same (symbol, side) are refused (unique)."""
    doc = _valid_doc()
    doc["positions"]["OTHER|long"] = copy.deepcopy(doc["positions"]["BTC/USDT|long"])
    e = _error(doc)
    assert {"key-matches-position"} <= {e.rule} and any("same (symbol, side)" in m for _, m in e.errors)


def test_negative_contracts() -> None:
    """contracts < 0 passes the schema pattern but is refused by the relationship rules."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"]["contracts"] = "-1"
    assert _schema_ok(doc)
    e = _error(doc)
    assert (e.json_path, e.rule) == ("$.positions['BTC/USDT|long'].position.contracts", "minimum")


def test_written_at_in_future() -> None:
    """written_at beyond now + clock skew is refused; within the skew it is accepted."""
    doc = _valid_doc()
    t = _document.parse_utc_text(doc["written_at"])
    e = _error(doc, now=t - 301)
    assert (e.json_path, e.rule) == ("$.written_at", "not-in-future")
    _document.decode_document(doc, path=None, now=t - 299)


def test_tombstone_conflicts() -> None:
    """A live position or metadata entry that also has a tombstone is refused."""
    doc = _valid_doc()
    doc["tombstones"]["positions"]["BTC/USDT|long"] = 3
    e = _error(doc)
    assert (e.json_path, e.rule) == ("$.tombstones.positions['BTC/USDT|long']", "tombstone-conflict")
    doc = _valid_doc()
    doc["tombstones"]["symbol_metadata"]["BTC/USDT"] = 3
    assert _error(doc).rule == "tombstone-conflict"


def test_rev_after_generation() -> None:
    """A revision later than the document's generation is refused."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["rev"] = 6
    e = _error(doc)
    assert (e.json_path, e.rule) == ("$.positions['BTC/USDT|long'].rev", "rev-not-after-generation")
    doc = _valid_doc()
    doc["symbol_metadata"]["BTC/USDT"]["rev"] = 99
    assert _error(doc).json_path == "$.symbol_metadata['BTC/USDT'].rev"


@pytest.mark.parametrize(
    ("mutate", "json_path", "rule"),
    [
        pytest.param(
            lambda d: d["positions"]["BTC/USDT|long"]["position"].update(contracts=1.5),
            "$.positions['BTC/USDT|long'].position.contracts",
            "type",
            id="float",
        ),
        pytest.param(
            lambda d: d["positions"]["BTC/USDT|long"]["position"].update(mark_price="01"),
            "$.positions['BTC/USDT|long'].position.mark_price",
            "pattern",
            id="pattern",
        ),
        pytest.param(
            lambda d: d["positions"]["BTC/USDT|long"]["position"].update(side="flat"),
            "$.positions['BTC/USDT|long'].position.side",
            "enum",
            id="enum",
        ),
        pytest.param(
            lambda d: d["positions"]["BTC/USDT|long"]["position"].pop("entry_price"),
            "$.positions['BTC/USDT|long'].position",
            "required",
            id="required",
        ),
        pytest.param(lambda d: d.update(extra=1), "$", "additionalProperties", id="extra"),
        pytest.param(lambda d: d.update(generation=-1), "$.generation", "minimum", id="generation"),
        pytest.param(lambda d: d.update(written_at="yesterday"), "$.written_at", "pattern", id="written_at"),
    ],
)
def test_schema_error_names_path_and_rule(mutate: Any, json_path: str, rule: str) -> None:
    """jsonschema's verdict is raised as SchemaValidationError with the JSON path and the failing keyword."""
    doc = _valid_doc()
    mutate(doc)
    e = _error(doc)
    assert (e.json_path, e.rule) == (json_path, rule)
    assert str(e).startswith("state/positions.json: " + json_path) and f"(rule: {rule})" in str(e)


def test_ints_written_as_floats_are_accepted_by_schema_and_slow_path() -> None:
    """Counters written as 5.0 are valid JSON Schema integers: the slow path takes them, as ints."""
    doc = _valid_doc()
    doc["generation"] = 5.0
    doc["positions"]["BTC/USDT|long"]["rev"] = 5.0
    assert _fast(doc) is None and _schema_ok(doc)
    state = _document.decode_document(doc, path=None, now=NOW)
    assert state.generation == 5 and type(state.generation) is int and type(state.position_revs[("BTC/USDT", "long")]) is int


def test_strict_loads_refuses_duplicates_and_constants() -> None:
    """Unauthenticated payloads are parsed strictly: duplicate keys and NaN are refused."""
    with pytest.raises(SchemaValidationError, match="duplicate key"):
        _document.loads(b'{"a": 1, "a": 2}', path=None, strict=True)
    with pytest.raises(CorruptStateError):
        _document.loads(b'{"a": NaN}', path=None, strict=True)
    with pytest.raises(CorruptStateError):
        _document.loads(b"{not json", path=None, strict=False)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"x": float("nan")}, id="nan"),
        pytest.param({"x": Decimal(1)}, id="decimal"),
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({"x": 2**70}, id="huge-int"),
        pytest.param({"x": object()}, id="object"),
    ],
)
def test_metadata_refuses_non_json(value: dict[Any, Any]) -> None:
    """Metadata must be plain JSON; the error names where the bad value is."""
    with pytest.raises(SchemaValidationError) as info:
        _document.clean_metadata("BTC/USDT", value)
    assert info.value.json_path.startswith("$.symbol_metadata['BTC/USDT'].data")


def test_metadata_too_deep() -> None:
    """Nesting beyond the depth cap is refused."""
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(SchemaValidationError, match="deeper"):
        _document.clean_metadata("S", deep)


@pytest.mark.parametrize("field", ["contracts", "mark_price", "timestamp", "margin_mode", "symbol", "side"])
def test_null_values_are_not_absent_values(field: str) -> None:
    """A field present as null is a schema error, not a missing optional field: the fast path refuses it."""
    doc = _valid_doc()
    doc["positions"]["BTC/USDT|long"]["position"][field] = None
    assert _fast(doc) is None
    assert not _schema_ok(doc)


def test_fast_path_builds_positions_and_keeps_nothing_of_the_document() -> None:
    """issue 14.4/14.5: the fast path builds each Position straight into its slots, equal to the constructor's,
    and keeps no reference to the parsed document's dicts (which a per-position cache used to keep alive)."""
    doc = _valid_doc()
    eth = {"symbol": "ETH/USDT", "side": "short", "contracts": "2", "entry_price": "3000", "timestamp": 5, "margin_mode": "cross"}
    doc["positions"]["ETH/USDT|short"] = {"rev": 5, "position": eth}
    held = [doc["positions"][k] for k in doc["positions"]] + [e["position"] for e in doc["positions"].values()]
    before = [sys.getrefcount(d) for d in held]
    state = _fastpath._fast_decode(doc)
    assert [sys.getrefcount(d) for d in held] == before
    built = state.positions[("ETH/USDT", "short")]
    assert built == Position(**eth)  # type: ignore[arg-type]
    assert built.to_dict() == eth
    assert not hasattr(built, "__dict__")


_A = {"symbol": "A", "side": "long", "contracts": "1", "entry_price": "1"}


@pytest.mark.parametrize(
    "position",
    [
        pytest.param({**_A, "notional": None}, id="null-and-absent"),
        pytest.param({**_A, "timestamp": None}, id="null-timestamp"),
        pytest.param({**_A, "entry_price": None}, id="null-required"),
        pytest.param({**_A, "leverage": 5}, id="int-decimal"),
        pytest.param({**_A, "leverage": True}, id="bool-decimal"),
        pytest.param({**_A, "margin_mode": ""}, id="empty-margin"),
        pytest.param({**_A, "timestamp": True}, id="bool-timestamp"),
    ],
)
def test_fast_path_refuses_what_the_schema_refuses_in_a_position(position: dict[str, Any]) -> None:
    """issue 14.5: the slot-building fast path tells a null from an absent field and checks each value's type
    before it builds a Position; each of these is refused by jsonschema and by the fast path."""
    doc = _valid_doc()
    doc["positions"] = {"A|long": {"rev": 1, "position": position}}
    assert _fast(doc) is None
    assert not _schema_ok(doc)


def test_pause_gc_restores_the_collector() -> None:
    """pause_gc turns the collector off inside and restores the caller's setting, also on an exception."""
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), _document.pause_gc():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with _document.pause_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
