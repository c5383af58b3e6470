"""Full verification of a state file a slice of positions at a time (issue 14.3), for background threads.

:func:`posstate.storage.statefile.read` parses the whole document in one C call (orjson: about 0.4 s at
100,000 positions, with the interpreter lock held all along) and builds every ``Position`` at once; a
background prune that verifies a backup that way stalls every thread of the bot for that long. Here the
same checks run in slices: the document is parsed by the standard library's scanner (the strict parser
:func:`posstate.model.document.loads` uses for payloads no key authenticated: duplicate keys, non-finite
numbers and integers beyond 64 bits are refused), the ``positions`` object entry by entry; each slice of
*size* positions is validated with the rest of the document (:func:`posstate.model.document.decode_document`,
every rule) and dropped, and *pause* is called between slices (``time.sleep(0)`` hands the lock over).
Nothing is kept: the verdict is the point (a restore or recovery reads the file itself again).

The verdicts match :func:`~posstate.storage.statefile.read`, with one difference: a key-authenticated file
with a duplicate key in one JSON object (posstate never writes one) is refused here, accepted there.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posstate.core.errors import CorruptStateError, PosStateError, SchemaValidationError, WrongKeyError
from posstate.model import document as _document
from posstate.storage import codec as _codec
from posstate.storage.container import Header
from posstate.storage.statefile import ReadOptions, read_bytes

__all__ = ["check_bytes_in_slices", "check_in_slices"]

_WS = json.decoder.WHITESPACE.match  # type: ignore[attr-defined]


def _scanner() -> Any:
    dec = json.JSONDecoder(
        object_pairs_hook=_document._no_duplicates,
        parse_constant=_document._no_constant,
        parse_int=_document._int64,
        parse_float=_document._finite_float,
    )
    return json.scanner.make_scanner(dec)  # type: ignore[arg-type]


def check_in_slices(
    path: Path, *, options: ReadOptions, pause: Callable[[], None] = lambda: time.sleep(0), size: int = 16
) -> Header:
    """Verify the state file or backup at *path* as :func:`~posstate.storage.statefile.read` would (the same
    typed errors), a slice of *size* positions at a time, calling *pause* between slices. Returns its header."""
    data = read_bytes(path, what="backup", max_size=options.max_file_bytes)
    return check_bytes_in_slices(data, path=path, options=options, pause=pause, size=size)


def check_bytes_in_slices(
    data: bytes, *, path: Path, options: ReadOptions, pause: Callable[[], None] = lambda: time.sleep(0), size: int = 16
) -> Header:
    """:func:`check_in_slices` of the bytes *data* read from *path* (a backup just written and read back)."""
    header, payload = _codec.decode(data, keyring=options.keyring, path=path, max_document_bytes=options.max_document_bytes)
    if options.require_encryption and not header.encrypted:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
    del data
    try:
        return _check(payload.decode("utf-8"), header, path, options, pause, size)
    except PosStateError:
        raise
    except _document._Duplicate as dup:
        raise SchemaValidationError(path, "$", "uniqueKeys", f"duplicate key {dup.key!r} in one JSON object") from None
    except RecursionError:
        raise CorruptStateError(path, _document._TOO_DEEP, kind="damaged") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptStateError(path, f"payload is not valid JSON ({str(exc)[:80]})", kind="damaged") from None


def _expect(s: str, idx: int, ch: str) -> int:
    if s[idx : idx + 1] != ch:
        raise ValueError(f"expected {ch!r} at {idx}")
    return int(_WS(s, idx + 1).end())


def _check(s: str, header: Header, path: Path, options: ReadOptions, pause: Callable[[], None], size: int) -> Header:
    scan = _scanner()
    rest: dict[str, Any] = {}
    starts: list[int] = []  # where each position entry's key starts, in order
    walked = False  # the positions object was walked (else it is in *rest*, or missing)
    j = _WS(s, 0).end()
    if s[j : j + 1] != "{":
        _document.decode_document(scan(s, j)[0], path=path)  # not an object: the validator says what is wrong
        raise CorruptStateError(path, "payload is not a JSON object", kind="damaged")
    j = _WS(s, j + 1).end()
    if s[j : j + 1] == "}":
        j += 1
    else:
        while True:
            if s[j : j + 1] != '"':
                raise ValueError(f"expected a key at {j}")
            key, j = json.decoder.scanstring(s, j + 1)  # type: ignore[attr-defined]
            j = _expect(s, _WS(s, j).end(), ":")
            if key in rest or (key == "positions" and walked):
                raise _document._Duplicate(key)
            if key == "positions" and s[j : j + 1] == "{":
                walked = True
                j = _walk(s, j, scan, starts, pause)
            else:
                rest[key], j = scan(s, j)
            j = _WS(s, j).end()
            if s[j : j + 1] == "}":
                j += 1
                break
            j = _expect(s, j, ",")
    if _WS(s, j).end() != len(s):
        raise ValueError("extra data after the document")
    skew = math.inf if header.encrypted else options.clock_skew
    count = 0
    generation = None
    for i in range(0, max(len(starts), 1), size):
        doc = dict(rest)
        if walked:
            chunk: dict[str, Any] = {}
            for start in starts[i : i + size]:
                key, k = json.decoder.scanstring(s, start + 1)  # type: ignore[attr-defined]
                chunk[key] = scan(s, _expect(s, _WS(s, k).end(), ":"))[0]
            doc["positions"] = chunk
        state = _document.decode_document(doc, path=path, skew=skew)
        count += len(state.positions)
        generation = state.generation
        del state, doc
        pause()
    if header.generation != generation:
        raise SchemaValidationError(
            path,
            "$.generation",
            "header-matches-document",
            f"header says generation {header.generation}, document says {generation}",
        )
    if header.position_count != count:
        raise SchemaValidationError(
            path,
            "$.positions",
            "header-matches-document",
            f"header says {header.position_count} positions, document has {count}",
        )
    return header


def _walk(s: str, j: int, scan: Any, starts: list[int], pause: Callable[[], None]) -> int:
    """Walk the ``positions`` object whose ``{`` is at *j*: each entry is parsed (and dropped) to find where
    it ends, its key's offset kept in *starts*; a repeated key is refused. Returns the index after ``}``."""
    keys: set[str] = set()
    j = _WS(s, j + 1).end()
    if s[j : j + 1] == "}":
        return j + 1
    while True:
        if s[j : j + 1] != '"':
            raise ValueError(f"expected a key at {j}")
        starts.append(j)
        key, k = json.decoder.scanstring(s, j + 1)  # type: ignore[attr-defined]
        if key in keys:
            raise _document._Duplicate(key)
        keys.add(key)
        _, end = scan(s, _expect(s, _WS(s, k).end(), ":"))
        if len(starts) % 16 == 0:
            pause()
        j = _WS(s, end).end()
        if s[j : j + 1] == "}":
            return j + 1
        j = _expect(s, j, ",")
