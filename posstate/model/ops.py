"""Journal operations: what one change is, how it applies to the in-memory state, and how it is undone.

An operation is the JSON the journal records (``{"op": "set_position", "rev": 7, "position": {...}}``).
Applying it to a :class:`~posstate.model.document.StateData` returns an undo record, so a transaction or a failed
append can put memory back exactly as it was. Replay applies the same JSON after validating it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posstate.core.errors import CorruptStateError, PosStateError
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.model.position import MAX_COUNTER, Position, PositionKey, check_key

SET_POSITION = "set_position"
DELETE_POSITION = "delete_position"
SET_METADATA = "set_symbol_metadata"
DELETE_METADATA = "delete_symbol_metadata"
SET_BOT_METADATA = "set_bot_metadata"
OP_NAMES = frozenset({SET_POSITION, DELETE_POSITION, SET_METADATA, DELETE_METADATA, SET_BOT_METADATA})

#: The manager's cache of document entries (:func:`~posstate.model.document.build_document`; bounded, issue 14.4).
#: :func:`apply` drops the entry of every position it changes and :func:`undo` puts it back with the position;
#: build_document also checks each entry against its Position, so an entry found in one is never stale.
Entries = _document.Entries
#: ("p", key, position, rev, entry, tombstone), ("m", symbol, data, rev, tombstone) or ("b", data, rev): what
#: was there before.
Undo = tuple[Any, ...]


class Op:
    """One change, with the Position memory needs beside its JSON."""

    __slots__ = ("json", "position")

    def __init__(self, json: dict[str, Any], position: Position | None = None) -> None:
        self.json = json
        self.position = position


def set_position(position: Position, rev: int) -> Op:
    return Op({"op": SET_POSITION, "rev": rev, "position": position.to_dict()}, position)


def delete_position(key: PositionKey, rev: int) -> Op:
    return Op({"op": DELETE_POSITION, "rev": rev, "symbol": key[0], "side": key[1]})


def set_metadata(symbol: str, data: dict[str, Any], rev: int) -> Op:
    return Op({"op": SET_METADATA, "rev": rev, "symbol": symbol, "data": data})


def delete_metadata(symbol: str, rev: int) -> Op:
    return Op({"op": DELETE_METADATA, "rev": rev, "symbol": symbol})


def set_bot_metadata(data: dict[str, Any], rev: int) -> Op:
    return Op({"op": SET_BOT_METADATA, "rev": rev, "data": data})


def restamp(op: Op, rev: int) -> None:
    """Give *op* revision *rev* (set just before it is recorded, after any compaction)."""
    op.json["rev"] = rev


def apply(st: StateData, entries: Entries, op: Op) -> Undo:
    """Apply *op* to memory; return what undoes it."""
    j = op.json
    name = j["op"]
    rev = j["rev"]
    if name == SET_POSITION:  # the common case, first and without the generic branches below
        position = op.position
        assert position is not None
        key: PositionKey = (position.symbol, position.side)
        positions = st.positions
        revs = st.position_revs
        # pop() returns what was there: the same undo record as a get() before the pop.
        undo: Undo = ("p", key, positions.get(key), revs.get(key), entries.pop(key, None), st.position_tombstones.pop(key, None))
        positions[key] = position
        revs[key] = rev
        return undo
    if name == DELETE_POSITION:
        key = (j["symbol"], j["side"])
        # pop() returns what was there: the same undo record as get() before removing.
        undo = (
            "p",
            key,
            st.positions.pop(key, None),
            st.position_revs.pop(key, None),
            entries.pop(key, None),
            st.position_tombstones.get(key),
        )
        st.position_tombstones[key] = rev
        return undo
    if name == SET_BOT_METADATA:
        undo = ("b", st.bot_metadata, st.bot_metadata_rev)
        st.bot_metadata = j["data"]
        st.bot_metadata_rev = rev
        return undo
    symbol = j["symbol"]
    undo = ("m", symbol, st.metadata.get(symbol), st.metadata_revs.get(symbol), st.metadata_tombstones.get(symbol))
    if name == SET_METADATA:
        st.metadata[symbol] = j["data"]
        st.metadata_revs[symbol] = rev
        st.metadata_tombstones.pop(symbol, None)
    else:
        st.metadata.pop(symbol, None)
        st.metadata_revs.pop(symbol, None)
        st.metadata_tombstones[symbol] = rev
    return undo


def _restore(d: dict[Any, Any], k: Any, v: Any) -> None:
    if v is None:
        d.pop(k, None)
    else:
        d[k] = v


def undo(st: StateData, entries: Entries, u: Undo) -> None:
    """Put back what :func:`apply` changed (apply undos newest first)."""
    if u[0] == "p":
        _, key, pos, rev, entry, tomb = u
        _restore(st.positions, key, pos)
        _restore(st.position_revs, key, rev)
        _restore(entries, key, entry)
        _restore(st.position_tombstones, key, tomb)
    elif u[0] == "b":
        st.bot_metadata, st.bot_metadata_rev = u[1], u[2]
    else:
        _, sym, data, rev, tomb = u
        _restore(st.metadata, sym, data)
        _restore(st.metadata_revs, sym, rev)
        _restore(st.metadata_tombstones, sym, tomb)


def _counter(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_COUNTER:
        raise ValueError(f"revision {v!r} is not a counter")
    return int(v)


def from_json(j: Any, *, path: Path, seq: int) -> Op:
    """Validate one recorded operation (replay trusts nothing it did not check) and rebuild it."""
    try:
        if type(j) is not dict or j.get("op") not in OP_NAMES:
            raise ValueError("not an operation")
        name = j["op"]
        rev = _counter(j["rev"])
        if name == SET_POSITION:
            if set(j) != {"op", "rev", "position"} or type(j["position"]) is not dict:
                raise ValueError("bad set_position fields")
            p = Position.from_dict(j["position"])
            return set_position(p, rev)
        if name == DELETE_POSITION:
            if set(j) != {"op", "rev", "symbol", "side"}:
                raise ValueError("bad delete_position fields")
            # check_key: the tombstone it leaves is written into the next snapshot, which must be valid
            return delete_position(check_key(j["symbol"], j["side"]), rev)
        if name == SET_BOT_METADATA:
            if set(j) != {"op", "rev", "data"}:
                raise ValueError("bad set_bot_metadata fields")
            return set_bot_metadata(_document.clean_bot_metadata(j["data"]), rev)
        if name == SET_METADATA:
            if set(j) != {"op", "rev", "symbol", "data"}:
                raise ValueError("bad set_symbol_metadata fields")
            return set_metadata(j["symbol"], _document.clean_metadata(j["symbol"], j["data"]), rev)
        if set(j) != {"op", "rev", "symbol"}:
            raise ValueError("bad delete_symbol_metadata fields")
        check_key(j["symbol"], "long")  # the symbol rule (its tombstone goes into the next snapshot)
        return delete_metadata(j["symbol"], rev)
    except (ValueError, KeyError, TypeError, PosStateError) as exc:
        raise CorruptStateError(
            path,
            f"journal record {seq} holds an invalid operation ({str(exc)[:120]})",
            next_step="the journal was written by another program or damaged; run `posstate validate`",
            kind="journal",
        ) from None


def key_of(op: Op) -> tuple[str, str | None]:
    """(symbol, side) the operation touches; side None for metadata; ("", None) for bot metadata."""
    j = op.json
    if j["op"] == SET_BOT_METADATA:
        return "", None
    if j["op"] == SET_POSITION:
        assert op.position is not None
        return op.position.symbol, op.position.side
    if j["op"] == DELETE_POSITION:
        return j["symbol"], j["side"]
    return j["symbol"], None
