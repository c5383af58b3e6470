"""Hostile input: random and mutated files only ever raise PosStateError; bombs and bad documents are refused."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posstate import CorruptStateError, Position, PositionStateManager, PosStateError, SchemaValidationError, StateConfig
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions, parse, read_document

KEY = bytes(range(32))
PLAIN = ReadOptions(keyring=None)
KEYED = ReadOptions(keyring=Keyring(key=KEY))
PATH = Path("fuzz/positions.json")


def _container(payload: bytes, *, flags: int, generation: int = 1, count: int = 0) -> bytes:
    header = _format.Header(
        format_version=_format.FORMAT_VERSION,
        flags=flags,
        key_id="0" * 16,
        nonce=bytes(12),
        salt=bytes(16),
        kdf_log2_n=0,
        schema_version=_codec.SCHEMA_VERSION,
        generation=generation,
        written_at_ms=1_700_000_000_000,
        position_count=count,
        payload_length=len(payload),
    )
    body = _format.pack_header(header) + payload
    return body + _format.trailer_for(body)


def _reseal(data: bytes) -> bytes:
    """Recompute the trailer so a mutation gets past the checksum and reaches the deeper parsers."""
    body = data[: -_format.TRAILER_SIZE]
    return body + _format.trailer_for(body)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid files in each mode: plain, compressed, encrypted (raw key), and the plain document."""
    out: dict[str, bytes] = {}
    for name, kw in {"plain": {"encryption": False, "compression": False}, "zstd": {"encryption": False}, "aes": {}}.items():
        d = tmp_path_factory.mktemp(name)
        with PositionStateManager(StateConfig.in_dir(d, **kw), key=KEY if name == "aes" else None) as m:
            m.set_symbol_metadata("BTC/USDT", {"entries_long": 2, "trail": {"stop": "1.5"}})
            m.save_positions(
                [
                    Position(symbol="BTC/USDT", side="long", contracts=Decimal("0.5"), entry_price=Decimal("60000.1")),
                    Position(
                        symbol="ETH/USDT", side="short", contracts=Decimal(3), entry_price=Decimal("3000"), leverage=Decimal(5)
                    ),
                ]
            )
        out[name] = (d / "positions.json").read_bytes()
    return out


def _decode_all(data: bytes) -> None:
    for opts in (PLAIN, KEYED):
        with contextlib.suppress(PosStateError):
            parse(data, path=PATH, options=opts)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_posstate_errors(data: bytes) -> None:
    """Arbitrary bytes: the decoder raises a PosStateError subclass or nothing, never anything else."""
    _decode_all(data)
    _decode_all(b"PSTATE01" + data)


mutation = st.tuples(
    st.sampled_from(["plain", "zstd", "aes"]),
    st.integers(0, 10_000),
    st.binary(min_size=0, max_size=8),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(mutation)
def test_mutated_files_raise_only_posstate_errors(samples: dict[str, bytes], m: tuple[str, int, bytes, bool, bool]) -> None:
    """Mutated valid files (splice, delete, re-sealed so the checksum holds): typed errors only."""
    name, pos, chunk, delete, reseal = m
    data = samples[name]
    pos %= len(data)
    out = data[:pos] + chunk + data[pos + (len(chunk) if not delete else 1 + len(chunk)) :]
    _decode_all(_reseal(out) if reseal and len(out) > _format.TRAILER_SIZE else out)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(st.binary(min_size=1, max_size=512), st.booleans())
def test_garbage_payload_in_a_valid_container(samples: dict[str, bytes], payload: bytes, compressed: bool) -> None:
    """A well-formed container around garbage (zstd or JSON layer): CorruptStateError or schema error."""
    data = _container(payload, flags=_format.FLAG_COMPRESSED if compressed else 0)
    with pytest.raises(PosStateError):
        parse(data, path=PATH, options=PLAIN)


def test_zstd_bomb_with_declared_size_is_refused_before_inflating() -> None:
    """A frame declaring 16 MiB under a 1 MiB cap is refused from its header (documented cap, default 256 MiB)."""
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(16 * 1024 * 1024))
    assert len(bomb) < 4096
    data = _container(bomb, flags=_format.FLAG_COMPRESSED)
    with pytest.raises(CorruptStateError, match="cap"):
        parse(data, path=PATH, options=ReadOptions(keyring=None, max_document_bytes=1024 * 1024))
    assert _codec.DEFAULT_MAX_DOCUMENT_BYTES == 256 * 1024 * 1024


def test_zstd_bomb_without_declared_size_stops_at_the_cap() -> None:
    """A streamed frame with no content size is inflated at most cap+1 bytes, then refused."""
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=False)
    obj = cctx.compressobj()
    bomb = b"".join(obj.compress(bytes(1024 * 1024)) for _ in range(16)) + obj.flush()
    assert zstandard.frame_content_size(bomb) == -1
    data = _container(bomb, flags=_format.FLAG_COMPRESSED)
    with pytest.raises(CorruptStateError, match="cap"):
        parse(data, path=PATH, options=ReadOptions(keyring=None, max_document_bytes=1024 * 1024))


# ------------------------------------------------------------------------------------------ schema fuzzing
def _leaves(doc: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if path[-1:] == ("data",) or k == "account":
                continue  # symbol metadata is free-form by design
            out.append((*path, k))
            out.extend(_leaves(v, (*path, k)))
    return out


def _wrong(value: Any, variant: int) -> Any:
    if isinstance(value, str):
        return [12345, None, ["x"]][variant % 3]
    if isinstance(value, (bool, int)):
        return ["7", None, {"x": 1}][variant % 3]
    if isinstance(value, dict):
        return [[], "x", 3][variant % 3]
    return object()


def _set(doc: Any, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        doc = doc[k]
    if value is _DELETE:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


_DELETE = object()
#: Members the schema requires (removing one must be refused).
_REQUIRED = frozenset(
    {"schema_version", "generation", "written_at", "writer", "positions", "symbol_metadata", "tombstones", "host", "pid"}
    | {"version", "rev", "position", "data", "symbol", "side", "contracts", "entry_price"}
)


@pytest.fixture(scope="module")
def document(samples: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    p = tmp_path_factory.mktemp("doc") / "positions.json"
    p.write_bytes(samples["plain"])
    return read_document(p, options=PLAIN)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.data())
def test_invalid_documents_name_the_path_of_the_first_error(document: tuple[Any, Any], data: st.DataObject) -> None:
    """A document with one field of the wrong type (or a required one removed) is refused at that JSON path."""
    header, doc = document
    leaves = _leaves(doc)
    path = data.draw(st.sampled_from(leaves))
    variant = data.draw(st.integers(0, 3))
    mutated = json.loads(json.dumps(doc))
    value: Any = mutated
    for k in path:
        value = value[k]
    new = _DELETE if variant == 3 else _wrong(value, variant)
    if new is _DELETE and path[-1] not in _REQUIRED:
        new = _wrong(value, 0)  # removing an optional member or a whole entry is valid: change its type instead
    _set(mutated, path, new)
    raw = json.dumps(mutated).encode()
    data_bytes = _container(raw, flags=0, generation=header.generation, count=header.position_count)
    with pytest.raises(SchemaValidationError) as info:
        parse(data_bytes, path=PATH, options=PLAIN)
    where = info.value.json_path
    assert where.startswith("$")
    # Every component of the mutated path up to the failing one appears in order in the reported path.
    target = path[:-1] if new is _DELETE else path
    pos = 0
    for comp in target:
        found = where.find(comp, pos)
        assert found >= 0, (path, where)
        pos = found + len(comp)
