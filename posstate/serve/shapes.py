"""The JSON shapes of the state, shared by the CLI's ``--json`` output and the HTTP/WebSocket API.

One serializer, so a dashboard and a script reading ``posstate show --json`` see the same objects:
positions keyed ``SYMBOL|side`` as ``{"rev": r, "position": {...}}`` and symbol metadata as ``{"rev": r, "data":
{...}}`` (the state document's own forms, :func:`posstate.model.document.position_entry`), backups as
``backups list --json`` prints them, orders as :meth:`posstate.account.types.Order.to_dict`. Decimals are
strings. No third-party import but orjson (the CLI loads this module).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from posstate.account.types import Order, thaw_json
from posstate.backup.backups import BackupInfo
from posstate.model.document import position_entry
from posstate.model.position import Position, PositionKey, position_key_text


def json_default(value: Any) -> Any:
    """orjson's fallback: Decimals as strings (the way the state document stores them), mappings as dicts."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def to_json(data: Any) -> str:
    """Indented JSON; Decimals as strings (the way the state document stores them). A string that is not valid
    UTF-8 (a path given as undecodable bytes, which Python holds as lone surrogates) is written with those bytes
    as ``\\xff`` escapes rather than failing the whole document."""
    try:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2, default=json_default).decode("utf-8")
    except TypeError as exc:
        if "surrogates" not in str(exc):
            raise
        return orjson.dumps(_printable(data), option=orjson.OPT_INDENT_2, default=json_default).decode("utf-8")


def _printable(value: Any) -> Any:
    """*value* with every string made valid UTF-8 (undecodable bytes as ``\\xNN``, other lone surrogates as ``\\uNNNN``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, Mapping):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def to_bytes(data: Any) -> bytes:
    """Compact JSON (the API's bodies and stream messages). What orjson refuses but the account store accepts
    (an integer past 64 bits such as an order's ``timestamp``, a string holding a lone surrogate) is written by
    the standard library instead (lone surrogates as ``\\udXXX`` escapes): one such value must neither fail the
    snapshot nor stop the stream's poll (the clients would miss that poll's changes)."""
    try:
        return orjson.dumps(data, default=json_default)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(data, default=json_default, separators=(",", ":"), allow_nan=False).encode("ascii")


def positions_json(positions: Mapping[PositionKey, Position], revs: Mapping[PositionKey, int] | None = None) -> dict[str, Any]:
    """``{"SYMBOL|side": {"rev": r, "position": {...}}}``, sorted by key; ``rev`` is None when the source
    keeps none (an account store)."""
    out: dict[str, Any] = {}
    for k in sorted(positions):
        entry = position_entry(positions[k], revs.get(k, 0) if revs is not None else 0)
        if revs is None:
            entry["rev"] = None
        out[position_key_text(k)] = entry
    return out


def metadata_json(metadata: Mapping[str, Mapping[str, Any]], revs: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``{"SYMBOL": {"rev": r, "data": {...}}}`` as the state document's ``symbol_metadata``."""
    return {s: {"rev": revs.get(s, 0) if revs is not None else None, "data": thaw_json(metadata[s])} for s in sorted(metadata)}


def order_json(order: Order) -> dict[str, Any]:
    """One order (new fields of :class:`~posstate.account.types.Order` appear here with no change)."""
    return order.to_dict()


def backup_json(info: BackupInfo) -> dict[str, Any]:
    """One ``backups list --json`` object: BackupInfo's fields plus ``positions``."""
    out = info.to_dict()
    out["positions"] = info.position_count
    return out
