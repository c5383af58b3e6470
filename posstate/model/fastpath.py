"""The fast validator of a decoded state document: accepts only what the JSON Schema accepts, and builds the
state on the way. When it is unsure it raises :class:`_Reject` and jsonschema (model/schema.py) decides.

Every check is the cheapest test that refuses everything the schema refuses for that value; a test holds
the patterns below equal to the schema's and compares this path with jsonschema on generated documents.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from posstate.model.position import (
    BAD_TEXT,
    DECIMAL_FIELDS,
    FIELD_NAMES,
    MAX_COUNTER,
    MAX_DECIMAL_EXPONENT,
    MAX_DECIMAL_LENGTH,
    MAX_SYMBOL_LENGTH,
    REQUIRED_FIELDS,
    SLOT_SETTERS,
    SURROGATE,
    Position,
    PositionKey,
    parse_position_key,
)
from posstate.model.schema import MAX_JSON_DEPTH
from posstate.model.state import SCHEMA_VERSION, StateData

_TOP_REQUIRED = frozenset({"schema_version", "generation", "written_at", "writer", "positions", "symbol_metadata", "tombstones"})
_TOP_ALLOWED = _TOP_REQUIRED | {"account", "journal", "bot_metadata"}
_ENTRY_KEYS = frozenset({"rev", "position"})
_META_KEYS = frozenset({"rev", "data"})
_WRITER_KEYS = frozenset({"host", "pid", "version"})
_ACCOUNT_KEYS = frozenset({"exchange", "account_id", "mode"})
_JOURNAL_KEYS = frozenset({"id", "seq"})
_TOMB_KEYS = frozenset({"positions", "symbol_metadata"})
_POSITION_ALLOWED = frozenset(DECIMAL_FIELDS) | {"symbol", "side", "margin_mode", "timestamp"}
_DECIMALS = frozenset(DECIMAL_FIELDS)
_DECIMAL_INDEXES = tuple(i for i, name in enumerate(FIELD_NAMES) if name in _DECIMALS)
_TIMESTAMP = FIELD_NAMES.index("timestamp")
_MARGIN_MODE = FIELD_NAMES.index("margin_mode")
_SIDES = {"long": "long", "short": "short"}
_MARGIN_MODES = {"cross": "cross", "isolated": "isolated"}
assert FIELD_NAMES[:2] == ("symbol", "side")
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


def _fast_positions(raw: Any) -> tuple[dict[PositionKey, Position], dict[PositionKey, int]]:
    """Positions and revisions of a document's ``positions``, or _Reject.

    The hot loop of a validated load: each check is the cheapest test that refuses everything the schema
    refuses for that value; decimal texts are collected and checked against the schema's pattern in one
    pass at the end (:func:`decimal_strings_ok`). Each Position is built straight into its slots from the
    checked values (``SLOT_SETTERS``), without ``__post_init__`` checking them again; nothing of the parsed
    document is kept, so it is freed as soon as the load returns (issue 14.4).
    """
    if type(raw) is not dict:
        raise _Reject
    positions: dict[PositionKey, Position] = {}
    revs: dict[PositionKey, int] = {}
    texts: list[str] = []
    collect = texts.append
    symbols: list[str] = []
    collect_symbol = symbols.append
    new = object.__new__
    field_names, setters, decimal_indexes = FIELD_NAMES, SLOT_SETTERS, _DECIMAL_INDEXES
    nfields = len(field_names)
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
            values = list(map(p.get, field_names))
            # Every present name is a field (checked above), so a null value is the only way for the count
            # of None values to exceed the count of absent fields: the schema refuses null everywhere.
            if values.count(None) != nfields - len(p):
                raise _Reject
            sym, side = values[0], values[1]
            if type(sym) is not str or type(side) is not str or not 0 < len(sym) <= MAX_SYMBOL_LENGTH:
                raise _Reject
            if (side != "long" and side != "short") or key != f"{sym}|{side}":
                raise _Reject
            # The parser made a new str for every "long"/"cross": hold the one constant instead (two fewer
            # objects per position, about 100 bytes).
            side = values[1] = _SIDES[side]
            collect_symbol(sym)
            for i in decimal_indexes:
                v = values[i]
                if v is not None:  # a non-string is refused by the joined scan (TypeError) below
                    collect(v)
                    values[i] = dec(v)
            ts = values[_TIMESTAMP]
            if ts is not None and (type(ts) is not int or ts < 0 or ts > MAX_COUNTER):
                raise _Reject
            mm = values[_MARGIN_MODE]
            if mm is not None:
                if mm != "cross" and mm != "isolated":
                    raise _Reject
                values[_MARGIN_MODE] = _MARGIN_MODES[mm]
            rev = entry["rev"]
            if type(rev) is not int or rev < 0 or rev > MAX_COUNTER:
                raise _Reject
            obj = new(Position)
            for setter, v in zip(setters, values, strict=True):
                setter(obj, v)
            k: PositionKey = (sym, side)  # type: ignore[assignment]
            positions[k] = obj
            revs[k] = rev
    except (InvalidOperation, TypeError, ValueError):
        raise _Reject from None
    scan = _decimal_scan(texts)
    if scan == _DECIMALS_EXPONENT and _exponents_ok(texts):
        scan = _DECIMALS_OK
    if scan != _DECIMALS_OK or not _texts_ok(symbols):
        raise _Reject
    return positions, revs


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
    version = doc["schema_version"]
    if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
        raise _Reject
    bot = doc.get("bot_metadata")
    bot_rev = 0
    if bot is not None or "bot_metadata" in doc:
        # Version 2 holds bot metadata; a version 1 document never does (issue 15.7).
        if version < 2 or type(bot) is not dict or bot.keys() != _META_KEYS or type(bot["data"]) is not dict:
            raise _Reject
        if not _json_ok(bot["data"]):
            raise _Reject
        bot_rev = _counter(bot["rev"])
        bot = bot["data"]
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
    positions, position_revs = _fast_positions(doc["positions"])
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
        bot_metadata=bot,
        bot_metadata_rev=bot_rev,
    )
