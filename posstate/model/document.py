"""The state document: in-memory form (:class:`StateData`), JSON bytes, and validation.

Encoding takes already-valid parts (every :class:`Position` validated itself when it was made, every
metadata dict when it was set), so a save never re-validates the whole document. Decoding validates all of
it: a fast path that accepts only what the JSON Schema accepts, jsonschema (the source of truth) when the
fast path is unsure, then the relationship rules a schema cannot express.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from posstate.core.errors import CorruptStateError, SchemaValidationError
from posstate.model.position import (
    _NONE_STATE,
    BAD_TEXT,
    DECIMAL_FIELDS,
    MAX_COUNTER,
    MAX_DECIMAL_EXPONENT,
    MAX_DECIMAL_LENGTH,
    MAX_SYMBOL_LENGTH,
    REQUIRED_FIELDS,
    SURROGATE,
    Position,
    PositionKey,
    check_text,
    parse_position_key,
    position_key_text,
)
from posstate.model.schema import MAX_JSON_DEPTH, raise_for_schema

SCHEMA_VERSION = 1
#: How far in the future ``written_at`` may be before the document is refused (clock skew between hosts).
DEFAULT_CLOCK_SKEW = 300.0

_TOP_REQUIRED = frozenset({"schema_version", "generation", "written_at", "writer", "positions", "symbol_metadata", "tombstones"})
_TOP_ALLOWED = _TOP_REQUIRED | {"account", "journal"}
_ENTRY_KEYS = frozenset({"rev", "position"})
_META_KEYS = frozenset({"rev", "data"})
_WRITER_KEYS = frozenset({"host", "pid", "version"})
_ACCOUNT_KEYS = frozenset({"exchange", "account_id", "mode"})
_JOURNAL_KEYS = frozenset({"id", "seq"})
_TOMB_KEYS = frozenset({"positions", "symbol_metadata"})
_POSITION_ALLOWED = frozenset(DECIMAL_FIELDS) | {"symbol", "side", "margin_mode", "timestamp"}
_DECIMALS = frozenset(DECIMAL_FIELDS)
# The schema's patterns, character for character (a test holds them equal): "$(?!\n)" is an end of text that a
# trailing newline does not pass, in Python's re as in ECMA-262.
_WRITTEN_AT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z$(?!\n)")
_JOURNAL_ID = re.compile(r"^[0-9a-f]{32}$(?!\n)")
_DECIMAL_CHARS = b"0123456789.,-+eE"
#: Substrings that Decimal() accepts but the schema's decimal pattern refuses, once values are joined
#: as ",v1,v2,...," with minus signs dropped, digits 1-9 written as "1" and "E" as "e": a leading "+",
#: a leading zero before a digit, a point without digits before or after it.
_DECIMAL_BAD = (b",.", b".,", b",00", b",01")
#: The same for characters that are rare in a document, so their scan is skipped when the character is absent.
_DECIMAL_BAD_RARE = ((b"+", b",+"), (b"e", b".e"))
_DECIMAL_CLASSES = bytes.maketrans(b"23456789E", b"11111111e")
#: In that form: an exponent of four digits or more (the schema allows three), and a negative zero.
_DECIMAL_LONG_EXPONENT = re.compile(rb"e[-+]?[01]{4}")
_DECIMAL_NEGATIVE_ZERO = re.compile(rb",-0[.0]*(?:e[-+]?[01]+)?,")


class _Reject(Exception):
    """The fast path is not sure; jsonschema decides."""


@dataclass(slots=True)
class StateData:
    """Everything a state file holds, in memory. The manager owns one and copies it before a change."""

    generation: int = 0
    written_at: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    account: dict[str, str] | None = None
    positions: dict[PositionKey, Position] = field(default_factory=dict)
    position_revs: dict[PositionKey, int] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata_revs: dict[str, int] = field(default_factory=dict)
    position_tombstones: dict[PositionKey, int] = field(default_factory=dict)
    metadata_tombstones: dict[str, int] = field(default_factory=dict)
    journal: dict[str, Any] | None = None
    #: The decoded document's own position entries (``{"rev": r, "position": {...}}``) with the Position
    #: built from each; set only by the fast path so a loader can reuse them instead of rebuilding 10,000
    #: dicts. Consume it with :func:`adopt_entries`, which ignores any entry whose position was replaced.
    entries: dict[PositionKey, tuple[Position, dict[str, Any]]] | None = None

    def copy(self) -> StateData:
        """A copy whose dicts can change without touching this one (values are immutable or copied on set)."""
        return StateData(
            generation=self.generation,
            written_at=self.written_at,
            writer=dict(self.writer),
            account=dict(self.account) if self.account is not None else None,
            positions=dict(self.positions),
            position_revs=dict(self.position_revs),
            metadata=dict(self.metadata),
            metadata_revs=dict(self.metadata_revs),
            position_tombstones=dict(self.position_tombstones),
            metadata_tombstones=dict(self.metadata_tombstones),
            journal=dict(self.journal) if self.journal is not None else None,
        )


def utc_text(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def parse_utc_text(text: str) -> float:
    return (
        datetime.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S")
        .replace(tzinfo=timezone.utc)
        .timestamp()
    )


# --------------------------------------------------------------------------------------------- metadata


def check_json_value(value: Any, where: str = "$", depth: int = 1) -> None:
    """Refuse what JSON cannot hold exactly or posstate cannot write back: NaN/infinity, non-string keys, huge ints,
    Decimals, nesting deeper than MAX_JSON_DEPTH levels (*value* is level *depth*), keys that are not text
    (controls, lone surrogates, bidi overrides) and strings holding a lone surrogate."""
    t = type(value)
    if value is None or t is bool:
        return
    if t is str:
        if SURROGATE.search(value) is not None:
            raise SchemaValidationError(None, where, "pattern", "string holds a lone surrogate (not valid Unicode text)")
        return
    if t is int:
        if not -(2**63) <= value < 2**64:
            raise SchemaValidationError(None, where, "type", "integer does not fit in 64 bits; store it as a string")
        return
    if t is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise SchemaValidationError(None, where, "type", f"{value!r} is not a JSON number")
        return
    if (t is dict or t is list or t is tuple) and depth > MAX_JSON_DEPTH:
        raise SchemaValidationError(None, where, "maxDepth", f"nested deeper than {MAX_JSON_DEPTH} levels")
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise SchemaValidationError(None, where, "propertyNames", f"key {k!r} is not a string")
            check_text(k, where, "key")
            check_json_value(v, f"{where}.{k}", depth + 1)
        return
    if t is list or t is tuple:
        for i, v in enumerate(value):
            check_json_value(v, f"{where}[{i}]", depth + 1)
        return
    hint = "; store Decimals as strings" if isinstance(value, Decimal) else ""
    raise SchemaValidationError(None, where, "type", f"{type(value).__name__} is not JSON{hint}")


def clean_metadata(symbol: str, data: Any) -> dict[str, Any]:
    """Validate a metadata dict and return a private deep copy (the caller's object is never kept)."""
    if not isinstance(symbol, str) or not 1 <= len(symbol) <= MAX_SYMBOL_LENGTH:
        raise SchemaValidationError(None, "$.symbol", "type", f"expected a symbol of 1 to {MAX_SYMBOL_LENGTH} characters")
    check_text(symbol, "$.symbol")
    if not isinstance(data, dict):
        raise SchemaValidationError(None, f"$.symbol_metadata[{symbol!r}]", "type", "metadata must be a dict")
    check_json_value(data, f"$.symbol_metadata[{symbol!r}].data")
    copied: dict[str, Any] = orjson.loads(orjson.dumps(data))
    return copied


def copy_json(data: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = orjson.loads(orjson.dumps(data))
    return copied


# --------------------------------------------------------------------------------------------- encode


def position_entry(position: Position, rev: int) -> dict[str, Any]:
    """The document form of one position (the manager caches it, so a save does not rebuild it)."""
    return {"rev": rev, "position": position.to_dict()}


def adopt_entries(state: StateData) -> dict[PositionKey, dict[str, Any]]:
    """The :func:`position_entry` dict of every position in *state*, reusing the decoder's own entries.

    An entry is reused only while the position is the very object decoded from it and its rev is
    unchanged (a Position is immutable, so any change replaced the object); otherwise it is rebuilt.
    Clears ``state.entries``.
    """
    cached, state.entries = state.entries, None
    revs = state.position_revs
    out: dict[PositionKey, dict[str, Any]] = {}
    for k, p in state.positions.items():
        rev = revs.get(k, 0)
        hit = cached.get(k) if cached is not None else None
        if hit is not None and hit[0] is p and hit[1]["rev"] == rev:
            out[k] = hit[1]
        else:
            out[k] = position_entry(p, rev)
    return out


def build_document(state: StateData, position_entries: dict[PositionKey, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON-ready dict of *state*; *position_entries* may hold cached :func:`position_entry` dicts."""
    if position_entries is None:
        position_entries = {k: position_entry(p, state.position_revs.get(k, 0)) for k, p in state.positions.items()}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generation": state.generation,
        "written_at": state.written_at,
        "writer": state.writer,
    }
    if state.account is not None:
        doc["account"] = state.account
    doc["positions"] = {f"{k[0]}|{k[1]}": position_entries[k] for k in state.positions}
    revs = state.metadata_revs
    doc["symbol_metadata"] = {s: {"rev": revs.get(s, 0), "data": d} for s, d in state.metadata.items()}
    doc["tombstones"] = {
        "positions": {position_key_text(k): r for k, r in state.position_tombstones.items()},
        "symbol_metadata": dict(state.metadata_tombstones),
    }
    if state.journal is not None:
        doc["journal"] = state.journal
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


# --------------------------------------------------------------------------------------------- decode


def loads(payload: bytes, *, path: str | Path | None, strict: bool) -> Any:
    """Parse JSON. ``strict`` also refuses duplicate keys (for payloads no key authenticated)."""
    try:
        if strict:
            return json.loads(
                payload.decode("utf-8"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_no_constant,
                parse_int=_int64,
                parse_float=_finite_float,
            )
        return orjson.loads(payload)
    except _Duplicate as dup:
        raise SchemaValidationError(path, "$", "uniqueKeys", f"duplicate key {dup.key!r} in one JSON object") from None
    except RecursionError:  # the stdlib parser recurses per level (orjson refuses past 1024 levels itself)
        raise CorruptStateError(path, _TOO_DEEP, kind="damaged") from None
    except (ValueError, UnicodeDecodeError) as exc:
        why = _TOO_DEEP if "depth limit" in str(exc) else f"payload is not valid JSON ({str(exc)[:80]})"
        raise CorruptStateError(path, why, kind="damaged") from None


_TOO_DEEP = f"payload is not valid JSON (nested too deep to parse; the schema allows {MAX_JSON_DEPTH} levels in metadata)"


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int64(text: str) -> int:
    """An integer the writer (orjson) can write back: -2**63 .. 2**64-1, like the values the setters accept; a
    bigger one would load and then make every later save raise TypeError."""
    if len(text) > 21:
        raise ValueError("integer does not fit in 64 bits")
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError("integer does not fit in 64 bits")
    return value


def _finite_float(text: str) -> float:
    """A finite float: ``1e400`` is infinity as a double, which orjson refuses to read and writes as null."""
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError("number is infinity when parsed as double")
    return value


_INF = float("inf")


def _counter(v: Any) -> int:
    if type(v) is not int or v < 0 or v > MAX_COUNTER:
        raise _Reject
    return v


def decimal_strings_ok(values: list[str]) -> bool:
    """True only if every value matches the schema's decimal pattern (values already parsed by Decimal())."""
    return _decimal_scan(values) != _DECIMALS_BAD


_DECIMALS_BAD, _DECIMALS_OK, _DECIMALS_NEGATIVE_ZERO, _DECIMALS_EXPONENT = 0, 1, 2, 3


def _decimal_scan(values: list[str]) -> int:
    """_DECIMALS_BAD unless every value matches the schema's decimal pattern; then _DECIMALS_NEGATIVE_ZERO if one is
    a negative zero (valid, but read as 0: the fast path leaves that to Position), else _DECIMALS_EXPONENT if one
    has an exponent (its value must be checked, see :func:`_exponents_ok`), else _DECIMALS_OK.

    One pass of C-speed string scans over all values at once; see ``_DECIMAL_BAD``.
    """
    if not values:
        return _DECIMALS_OK
    try:
        joined = "," + ",".join(values) + ","
    except TypeError:
        return _DECIMALS_BAD
    if not joined.isascii() or max(map(len, values)) > MAX_DECIMAL_LENGTH:
        return _DECIMALS_BAD
    raw = joined.encode("ascii")
    if raw.translate(None, _DECIMAL_CHARS):
        return _DECIMALS_BAD
    # Eight C-speed scans of the whole text instead of a regex per value (a 10,000-position load has
    # 110,000 decimals); every 2-byte search is a full pass, so the classes above keep their number low.
    raw = raw.translate(_DECIMAL_CLASSES)
    if b"e" in raw and _DECIMAL_LONG_EXPONENT.search(raw):
        return _DECIMALS_BAD
    negative_zero = b",-0" in raw and _DECIMAL_NEGATIVE_ZERO.search(raw) is not None
    raw = raw.replace(b",-", b",")
    if any(bad in raw for bad in _DECIMAL_BAD):
        return _DECIMALS_BAD
    if any(ch in raw and bad in raw for ch, bad in _DECIMAL_BAD_RARE):
        return _DECIMALS_BAD
    if negative_zero:
        return _DECIMALS_NEGATIVE_ZERO
    return _DECIMALS_EXPONENT if b"e" in raw else _DECIMALS_OK


def _exponents_ok(texts: list[str]) -> bool:
    """True if every text with an exponent has a value Position accepts: its adjusted exponent within
    +-MAX_DECIMAL_EXPONENT and its own text (``str(Decimal)``, what a save writes) at most MAX_DECIMAL_LENGTH
    characters. The pattern bounds the written exponent only: ``0.001E-999`` is 1E-1002 and ``1.5e-6`` is written
    ``0.0000015``, longer. Texts without an exponent never grow and stay within +-64 (no check needed)."""
    for text in texts:
        if "e" in text or "E" in text:
            value = Decimal(text)
            if not -MAX_DECIMAL_EXPONENT <= value.adjusted() <= MAX_DECIMAL_EXPONENT or len(str(value)) > MAX_DECIMAL_LENGTH:
                return False
    return True


def _fast_positions(
    raw: Any,
) -> tuple[dict[PositionKey, Position], dict[PositionKey, int], dict[PositionKey, tuple[Position, dict[str, Any]]]]:
    """Positions, revisions and the raw entries of a document's ``positions``, or _Reject.

    The hot loop of a validated load: each check is the cheapest test that refuses everything the schema
    refuses for that value; decimal texts are collected and checked against the schema's pattern in one
    pass at the end (:func:`decimal_strings_ok`).
    """
    if type(raw) is not dict:
        raise _Reject
    positions: dict[PositionKey, Position] = {}
    revs: dict[PositionKey, int] = {}
    entries: dict[PositionKey, tuple[Position, dict[str, Any]]] = {}
    texts: list[str] = []
    collect = texts.append
    symbols: list[str] = []
    collect_symbol = symbols.append
    new = object.__new__
    set_dict = object.__setattr__
    none_state = _NONE_STATE
    decimals = DECIMAL_FIELDS
    required, allowed, entry_keys = REQUIRED_FIELDS, _POSITION_ALLOWED, _ENTRY_KEYS
    dec = Decimal
    try:
        for key, entry in raw.items():
            if type(entry) is not dict or entry.keys() != entry_keys:
                raise _Reject
            p = entry["position"]
            if type(p) is not dict:
                raise _Reject
            names = p.keys()
            if not names >= required or not names <= allowed:
                raise _Reject
            sym = p["symbol"]
            side = p["side"]
            if type(sym) is not str or type(side) is not str or not 0 < len(sym) <= MAX_SYMBOL_LENGTH:
                raise _Reject
            if (side != "long" and side != "short") or key != f"{sym}|{side}":
                raise _Reject
            collect_symbol(sym)
            state = {**none_state, **p}
            for name in decimals:
                if name in p:  # present: must be a decimal string (null is refused by Decimal(None))
                    v = p[name]
                    collect(v)
                    state[name] = dec(v)
            if "timestamp" in names:
                ts = state["timestamp"]
                if type(ts) is not int or ts < 0 or ts > MAX_COUNTER:
                    raise _Reject
            if "margin_mode" in names:
                mm = state["margin_mode"]
                if mm != "cross" and mm != "isolated":
                    raise _Reject
            rev = entry["rev"]
            if type(rev) is not int or rev < 0 or rev > MAX_COUNTER:
                raise _Reject
            obj = new(Position)
            set_dict(obj, "__dict__", state)
            k: PositionKey = (sym, side)  # type: ignore[assignment]
            positions[k] = obj
            revs[k] = rev
            entries[k] = (obj, entry)
    except (InvalidOperation, TypeError, ValueError):
        raise _Reject from None
    scan = _decimal_scan(texts)
    if scan == _DECIMALS_EXPONENT and _exponents_ok(texts):
        scan = _DECIMALS_OK
    if scan != _DECIMALS_OK or not _texts_ok(symbols):
        raise _Reject
    return positions, revs, entries


def _texts_ok(texts: list[str]) -> bool:
    """No control, lone surrogate or bidi character in any of *texts* (one regex scan over all of them)."""
    return BAD_TEXT.search("".join(texts)) is None


def _json_ok(data: dict[str, Any]) -> bool:
    """A metadata ``data`` object within the schema's json0..json31 rules: at most MAX_JSON_DEPTH levels, keys
    are text, no string holds a lone surrogate. Iterative; keys and strings are checked in two scans at the end."""
    keys: list[str] = []
    strings: list[str] = []
    stack: list[tuple[Any, int]] = [(data, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, level = pop()
        if level > MAX_JSON_DEPTH:
            return False
        if type(node) is dict:
            keys.extend(node)
            values: Any = node.values()
        else:
            values = node
        for v in values:
            t = type(v)
            if t is dict or t is list:
                push((v, level + 1))
            elif t is str:
                strings.append(v)
    return _texts_ok(keys) and SURROGATE.search("".join(strings)) is None


def _fast_metadata(raw: Any) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    if type(raw) is not dict:
        raise _Reject
    data: dict[str, dict[str, Any]] = {}
    revs: dict[str, int] = {}
    for sym, entry in raw.items():
        if not 0 < len(sym) <= MAX_SYMBOL_LENGTH or type(entry) is not dict or entry.keys() != _META_KEYS:
            raise _Reject
        d = entry["data"]
        if type(d) is not dict or not _json_ok(d):
            raise _Reject
        data[sym] = d
        revs[sym] = _counter(entry["rev"])
    if not _texts_ok(list(data)):
        raise _Reject
    return data, revs


def _fast_tombstones(raw: Any) -> tuple[dict[PositionKey, int], dict[str, int]]:
    if type(raw) is not dict or raw.keys() != _TOMB_KEYS:
        raise _Reject
    tp, tm = raw["positions"], raw["symbol_metadata"]
    if type(tp) is not dict or type(tm) is not dict:
        raise _Reject
    positions: dict[PositionKey, int] = {}
    for key, rev in tp.items():
        symbol, side = parse_position_key(key)
        if side not in ("long", "short") or not 0 < len(symbol) <= MAX_SYMBOL_LENGTH:
            raise _Reject
        positions[(symbol, side)] = _counter(rev)
    metadata: dict[str, int] = {}
    for sym, rev in tm.items():
        if not 0 < len(sym) <= MAX_SYMBOL_LENGTH:
            raise _Reject
        metadata[sym] = _counter(rev)
    if not _texts_ok([s for s, _ in positions]) or not _texts_ok(list(metadata)):
        raise _Reject
    return positions, metadata


def _str(v: Any, lo: int, hi: int) -> str:
    if type(v) is not str or not lo <= len(v) <= hi or BAD_TEXT.search(v) is not None:
        raise _Reject
    return v


def _fast_decode(doc: Any) -> StateData:
    if type(doc) is not dict:
        raise _Reject
    names = doc.keys()
    if not names >= _TOP_REQUIRED or not names <= _TOP_ALLOWED:
        raise _Reject
    if type(doc["schema_version"]) is not int or doc["schema_version"] != SCHEMA_VERSION:
        raise _Reject
    written_at = doc["written_at"]
    if type(written_at) is not str or not _WRITTEN_AT.search(written_at):
        raise _Reject
    writer = doc["writer"]
    if type(writer) is not dict or writer.keys() != _WRITER_KEYS:
        raise _Reject
    _str(writer["host"], 0, 255)
    _str(writer["version"], 1, 64)
    if type(writer["pid"]) is not int or writer["pid"] < 0:
        raise _Reject
    account = doc.get("account")
    if "account" in doc:
        if type(account) is not dict or account.keys() != _ACCOUNT_KEYS:
            raise _Reject
        _str(account["exchange"], 1, 64)
        _str(account["account_id"], 1, 128)
        if account["mode"] != "live" and account["mode"] != "paper":
            raise _Reject
    journal = doc.get("journal")
    if "journal" in doc:
        if type(journal) is not dict or journal.keys() != _JOURNAL_KEYS:
            raise _Reject
        if type(journal["id"]) is not str or not _JOURNAL_ID.search(journal["id"]):
            raise _Reject
        _counter(journal["seq"])
    positions, position_revs, entries = _fast_positions(doc["positions"])
    metadata, metadata_revs = _fast_metadata(doc["symbol_metadata"])
    tomb_p, tomb_m = _fast_tombstones(doc["tombstones"])
    return StateData(
        generation=_counter(doc["generation"]),
        written_at=written_at,
        writer=writer,
        account=account,
        positions=positions,
        position_revs=position_revs,
        metadata=metadata,
        metadata_revs=metadata_revs,
        position_tombstones=tomb_p,
        metadata_tombstones=tomb_m,
        journal=journal,
        entries=entries,
    )


def _slow_decode(doc: dict[str, Any], *, path: str | Path | None) -> StateData:
    """Build from a document jsonschema accepted but the fast path did not (ints written as 1.0 and the like)."""
    positions: dict[PositionKey, Position] = {}
    revs: dict[PositionKey, int] = {}
    for key, entry in doc["positions"].items():
        raw = dict(entry["position"])
        if "timestamp" in raw:
            raw["timestamp"] = int(raw["timestamp"])
        try:
            p = Position.from_dict(raw)
        except SchemaValidationError as exc:
            raise SchemaValidationError(path, f"$.positions[{key!r}].position{exc.json_path[1:]}", exc.rule, exc.detail) from exc
        # Keyed by what the position says; relationship_errors() reports a key that disagrees.
        positions[p.key] = p
        revs[p.key] = int(entry["rev"])
    tomb = doc["tombstones"]
    return StateData(
        generation=int(doc["generation"]),
        written_at=doc["written_at"],
        writer=doc["writer"],
        account=doc.get("account"),
        positions=positions,
        position_revs=revs,
        metadata={s: e["data"] for s, e in doc["symbol_metadata"].items()},
        metadata_revs={s: int(e["rev"]) for s, e in doc["symbol_metadata"].items()},
        position_tombstones={parse_position_key(k): int(r) for k, r in tomb["positions"].items()},
        metadata_tombstones={s: int(r) for s, r in tomb["symbol_metadata"].items()},
        journal=doc.get("journal"),
    )


def relationship_errors(
    doc: dict[str, Any], state: StateData, *, now: float | None = None, skew: float = DEFAULT_CLOCK_SKEW
) -> list[tuple[str, str, str]]:
    """Rules beyond the schema, as (json path, rule, message)."""
    errors: list[tuple[str, str, str]] = []
    for key, entry in doc["positions"].items():
        p = entry["position"]
        if key != f"{p['symbol']}|{p['side']}":
            errors.append(
                (
                    f"$.positions[{key!r}]",
                    "key-matches-position",
                    f"key {key!r} does not match symbol {p['symbol']!r} and side {p['side']!r}",
                )
            )
    if len(state.positions) != len(doc["positions"]):
        errors.append(("$.positions", "unique", "two entries hold the same (symbol, side)"))
    for k, p in state.positions.items():
        if p.contracts < 0:
            errors.append(
                (
                    f"$.positions[{position_key_text(k)!r}].position.contracts",
                    "minimum",
                    f"contracts must be >= 0, got {p.contracts}",
                )
            )
    for k in state.positions.keys() & state.position_tombstones.keys():
        errors.append(
            (f"$.tombstones.positions[{position_key_text(k)!r}]", "tombstone-conflict", "a live position also has a tombstone")
        )
    for s in state.metadata.keys() & state.metadata_tombstones.keys():
        errors.append((f"$.tombstones.symbol_metadata[{s!r}]", "tombstone-conflict", "live metadata also has a tombstone"))
    g = state.generation
    for k, r in state.position_revs.items():
        if r > g:
            errors.append(
                (
                    f"$.positions[{position_key_text(k)!r}].rev",
                    "rev-not-after-generation",
                    f"revision {r} is after generation {g}",
                )
            )
    for s, r in state.metadata_revs.items():
        if r > g:
            errors.append((f"$.symbol_metadata[{s!r}].rev", "rev-not-after-generation", f"revision {r} is after generation {g}"))
    now = time.time() if now is None else now
    try:
        written = parse_utc_text(state.written_at)
    except ValueError:
        errors.append(("$.written_at", "date-time", f"{state.written_at!r} is not a valid UTC time"))
    else:
        if written > now + skew:
            errors.append(
                ("$.written_at", "not-in-future", f"{state.written_at} is in the future (clock now {utc_text(int(now * 1000))})")
            )
    return errors


@contextlib.contextmanager
def pause_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a document is parsed and turned into objects.

    A 10,000-position load allocates ~80,000 container objects; each ~700 allocations the collector runs,
    and every few loads it walks the whole heap, which found nothing here (these objects hold no cycles;
    reference counting frees them) but cost about a quarter of the load time. Mercurial's ``util.nogc``
    does the same. The previous setting is restored, so a caller that disabled the collector keeps it off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def decode_document(
    doc: Any, *, path: str | Path | None, now: float | None = None, skew: float = DEFAULT_CLOCK_SKEW
) -> StateData:
    """Validate a parsed document fully and return it in memory, or raise SchemaValidationError."""
    try:
        state = _fast_decode(doc)
    except _Reject:
        raise_for_schema(doc, path=path)
        state = _slow_decode(doc, path=path)
    problems = relationship_errors(doc, state, now=now, skew=skew)
    if problems:
        where, rule, message = problems[0]
        raise SchemaValidationError(path, where, rule, message, errors=[(w, m) for w, _, m in problems])
    return state
