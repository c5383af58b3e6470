"""Fold records (issue 15.4): how recovery tells a lost save that only folded the journal from one that lost changes.

A save writes the next generation G' as a new snapshot; the journal it folded in (J1) is then redundant,
and stays on disk until the next change creates the next journal. When the snapshot is durable, the save
appends one more record to J1, of kind ``KIND_FOLD``: ``{"generation": G', "digest": D}``, where D is
:func:`content_digest` of what the snapshot holds (its positions, symbol metadata and bot metadata, each
with its revision). It is sealed and chained like every record of J1, so only the key holder can write one,
and it cannot be moved to another journal or another place in this one.

If that snapshot is lost later, recovery replays ``.bak`` (the snapshot J1 belongs to) and J1's records; when
the replay reaches the fold record and the state it has built has digest D, generation G' held nothing
more: it is not counted as lost. A save that replaced positions (``save_positions()``) writes a digest the
replay does not reach, so it is counted. A fold record is not a change: every reader skips it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from posstate.journal import format as jf
from posstate.model.document import StateData, build_document

__all__ = ["content_digest", "decode_fold", "encode_fold", "state_digest"]

_DIGEST_HEX = 64


def content_digest(doc: dict[str, Any]) -> str:
    """SHA-256 (hex) of what a bot sees in the document *doc* (``build_document``): positions, symbol
    metadata and bot metadata, each with its revision; keys sorted, so the order entries were made in does
    not matter. Generation, times, writer, journal and tombstones are left out (a fold changes those)."""
    parts = [doc.get("positions", {}), doc.get("symbol_metadata", {}), doc.get("bot_metadata")]
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def state_digest(state: StateData) -> str:
    """:func:`content_digest` of *state* (O(state): recovery only)."""
    return content_digest(build_document(state))


def encode_fold(generation: int, digest: str) -> bytes:
    """The payload of a fold record."""
    return orjson.dumps({"generation": generation, "digest": digest})


def decode_fold(plain: bytes) -> tuple[int, str] | None:
    """(generation, digest) of an authenticated fold record's payload; None when it is not one."""
    try:
        data = orjson.loads(plain)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or set(data) != {"generation", "digest"}:
        return None
    gen, digest = data["generation"], data["digest"]
    if type(gen) is not int or not 0 < gen <= jf.MAX_BASE:
        return None
    if type(digest) is not str or len(digest) != _DIGEST_HEX or digest.strip("0123456789abcdef"):
        return None
    return gen, digest
