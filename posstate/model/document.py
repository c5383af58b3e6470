"""The state document: JSON bytes to and from :class:`StateData`, and the entry point of its validation.

Encoding takes already-valid parts (every :class:`Position` validated itself when it was made, every
metadata dict when it was set), so a save never re-validates the whole document. Decoding validates all of
it: a fast path that accepts only what the JSON Schema accepts (model/fastpath.py), jsonschema (the source
of truth, model/schema.py) when the fast path is unsure, then the relationship rules a schema cannot express
(model/rules.py). The in-memory form itself is model/state.py; its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from posstate.core.errors import CorruptStateError, SchemaValidationError
from posstate.model.fastpath import _fast_decode, _Reject
from posstate.model.position import (
    MAX_SYMBOL_LENGTH,
    SURROGATE,
    Position,
    PositionKey,
    check_text,
    position_key_text,
)
from posstate.model.rules import _slow_decode, relationship_errors
from posstate.model.schema import MAX_JSON_DEPTH, raise_for_schema
from posstate.model.state import DEFAULT_CLOCK_SKEW, SCHEMA_VERSION, StateData, parse_utc_text, utc_text

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "ENTRY_CACHE_POSITIONS",
    "Entries",
    "MAX_JSON_DEPTH",
    "SCHEMA_VERSION",
    "StateData",
    "dumps_in_slices",
    "build_document",
    "check_json_value",
    "clean_bot_metadata",
    "clean_metadata",
    "copy_json",
    "decode_document",
    "dumps",
    "loads",
    "parse_utc_text",
    "pause_gc",
    "position_entry",
    "relationship_errors",
    "utc_text",
]

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


def clean_bot_metadata(data: Any) -> dict[str, Any]:
    """Validate bot-wide metadata (the rules of a symbol's metadata) and return a private deep copy."""
    if not isinstance(data, dict):
        raise SchemaValidationError(None, "$.bot_metadata", "type", f"bot metadata must be a dict, got {type(data).__name__}")
    check_json_value(data, "$.bot_metadata.data")
    copied: dict[str, Any] = orjson.loads(orjson.dumps(data))
    return copied


def copy_json(data: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = orjson.loads(orjson.dumps(data))
    return copied


# --------------------------------------------------------------------------------------------- encode


#: The manager keeps the document entries of a state's positions between saves only while it holds at most this
#: many (issue 14.4): a small state's save reuses them instead of rebuilding each (about 1.5 us per position),
#: while a large one keeps nothing per position, so holding it costs what the Positions cost.
ENTRY_CACHE_POSITIONS = 4096

#: Per position key: the Position an entry was built from and the entry (:func:`position_entry`).
Entries = dict[PositionKey, tuple[Position, dict[str, Any]]]


def position_entry(position: Position, rev: int) -> dict[str, Any]:
    """The document form of one position."""
    return {"rev": rev, "position": position.to_dict()}


def build_document(state: StateData, cache: Entries | None = None) -> dict[str, Any]:
    """The JSON-ready dict of *state*.

    Without *cache*, every position's entry is built from its Position. With it (the manager's, issue 14.4),
    an entry of an earlier save is reused only for the very Position object it was built from and the same
    revision (a Position is immutable: any change replaced the object), so it is never stale; the cache is
    then refilled with every entry of this document while the state holds at most
    :data:`ENTRY_CACHE_POSITIONS` positions, and emptied above that (a large state keeps nothing per position).
    """
    revs = state.position_revs
    doc: dict[str, Any] = {
        "schema_version": state.schema_version,
        "generation": state.generation,
        "written_at": state.written_at,
        "writer": state.writer,
    }
    if state.account is not None:
        doc["account"] = state.account
    if cache is None or len(state.positions) > ENTRY_CACHE_POSITIONS:
        if cache:
            cache.clear()
        doc["positions"] = {
            f"{k[0]}|{k[1]}": {"rev": revs.get(k, 0), "position": p.to_dict()} for k, p in state.positions.items()
        }
    else:
        out: dict[str, Any] = {}
        for k, p in state.positions.items():
            rev = revs.get(k, 0)
            hit = cache.get(k)
            if hit is not None and hit[0] is p and hit[1]["rev"] == rev:
                entry = hit[1]
            else:
                entry = {"rev": rev, "position": p.to_dict()}
                cache[k] = (p, entry)
            out[f"{k[0]}|{k[1]}"] = entry
        if len(cache) > len(out):  # entries of positions gone from the state
            for k in [k for k in cache if k not in state.positions]:
                del cache[k]
        doc["positions"] = out
    mrevs = state.metadata_revs
    doc["symbol_metadata"] = {s: {"rev": mrevs.get(s, 0), "data": d} for s, d in state.metadata.items()}
    doc["tombstones"] = {
        "positions": {position_key_text(k): r for k, r in state.position_tombstones.items()},
        "symbol_metadata": dict(state.metadata_tombstones),
    }
    if state.journal is not None:
        doc["journal"] = state.journal
    if state.bot_metadata is not None:
        doc["bot_metadata"] = {"rev": state.bot_metadata_rev, "data": state.bot_metadata}
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def dumps_in_slices(
    state: StateData,
    cache: Entries | None = None,
    *,
    pause: Callable[[], None],
    size: int = 64,
) -> bytes:
    """``dumps(build_document(state, cache))``, the same bytes (*cache* is read, never changed), built and serialized *size*
    positions at a time with *pause* called between slices (issue 14.3: a background compaction hands the GIL
    to the bot's threads between slices instead of holding it for one O(state) C call; each slice's objects
    are freed before the next is built)."""
    positions = state.positions
    shell = build_document(dataclasses.replace(state, positions={}))
    names = list(shell)
    at = names.index("positions")
    before = {k: shell[k] for k in names[:at]}
    after = {k: shell[k] for k in names[at + 1 :]}
    parts = [orjson.dumps(before)[:-1], b',"positions":{']
    keys = list(positions)
    revs = state.position_revs
    given = cache if cache is not None and len(positions) <= ENTRY_CACHE_POSITIONS else {}
    first = True
    for i in range(0, len(keys), size):
        chunk = keys[i : i + size]
        part = {}
        for k in chunk:
            p, rev, hit = positions[k], revs.get(k, 0), given.get(k)
            entry = hit[1] if hit is not None and hit[0] is p and hit[1]["rev"] == rev else None
            part[f"{k[0]}|{k[1]}"] = entry if entry is not None else {"rev": rev, "position": p.to_dict()}
        if not first:
            parts.append(b",")
        parts.append(orjson.dumps(part)[1:-1])
        first = False
        del part
        pause()
    parts.append(b"}," + orjson.dumps(after)[1:] if after else b"}}")
    return b"".join(parts)


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
