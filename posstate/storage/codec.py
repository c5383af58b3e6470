"""Document bytes <-> container bytes: zstd, AES-256-GCM, header, checksum. No files, no JSON.

:func:`encode` turns the JSON of a state document into the bytes of a file; :func:`decode` does the reverse
and turns every way a file can be wrong into one typed error: damaged or truncated
(:class:`CorruptStateError`), wrong key or tampered (:class:`WrongKeyError`), no key
(:class:`MissingKeyError`), newer format or schema (:class:`UnsupportedVersionError`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import zstandard

from posstate.core.errors import CorruptStateError, MissingKeyError, UnsupportedVersionError, WrongKeyError
from posstate.storage import container as _format
from posstate.storage import crypto as _crypto
from posstate.storage.container import Header

SCHEMA_VERSION = 2  # the newest this release reads (model/state.py)
#: What a document without bot metadata is written as (every earlier release reads it).
PLAIN_SCHEMA_VERSION = 1
#: Largest document a reader will decompress (a zstd bomb is refused before it is inflated).
DEFAULT_MAX_DOCUMENT_BYTES = 256 * 1024 * 1024

_local = threading.local()


def max_file_bytes(max_document_bytes: int) -> int:
    """Largest container file a reader with this document cap reads: the document, zstd's worst-case growth
    (1/128 is more than its bound) and 64 KiB for header, trailer and tag. A larger file is refused from its
    size before a byte is read (an 8 GiB sparse file must not become an 8 GiB allocation)."""
    return max_document_bytes + (max_document_bytes >> 7) + 65536


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    found = cache.get(level)
    if found is None:
        found = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


@dataclass(frozen=True, slots=True)
class Encoded:
    """A file's bytes with its header and checksum (the checksum names this exact file)."""

    data: bytes
    header: Header
    checksum: str


def encode(
    document: bytes,
    *,
    generation: int,
    written_at_ms: int,
    position_count: int,
    compression_level: int | None,
    keyring: _crypto.Keyring | None,
    schema_version: int = PLAIN_SCHEMA_VERSION,
) -> Encoded:
    """Build a container. ``compression_level=None`` stores the JSON uncompressed; ``keyring=None`` plain."""
    payload = document
    flags = 0
    if compression_level is not None:
        payload = _compressor(compression_level).compress(payload)
        flags |= _format.FLAG_COMPRESSED
    key_id = "0" * 16
    nonce = salt = b""
    log2_n = 0
    key = b""
    if keyring is not None:
        key, salt = keyring.write_material()
        key_id = _crypto.key_id(key)
        nonce = _crypto.new_nonce()
        flags |= _format.FLAG_ENCRYPTED
        if salt:
            flags |= _format.FLAG_PASSPHRASE
            log2_n = keyring.log2_n
    header = Header(
        format_version=_format.FORMAT_VERSION,
        flags=flags,
        key_id=key_id,
        nonce=nonce or bytes(12),
        salt=salt or bytes(16),
        kdf_log2_n=log2_n,
        schema_version=schema_version,
        generation=generation,
        written_at_ms=written_at_ms,
        position_count=position_count,
        payload_length=len(payload) + (16 if keyring is not None else 0),
    )
    head = _format.pack_header(header)
    if keyring is not None:
        payload = _crypto.seal(key, nonce, payload, head)
    body = head + payload
    trailer = _format.trailer_for(body)
    return Encoded(body + trailer, header, trailer[len(_format.TRAILER_PREFIX) : -1].decode("ascii"))


def inspect(data: bytes, *, path: str | Path | None = None) -> Header:
    """Check everything that needs no key (magic, checksum, length, versions); return the header."""
    try:
        header = _format.check_file(data)
    except _format.FormatProblem as problem:
        if problem.kind == "unsupported-format":
            raise UnsupportedVersionError(
                path, what="container format", found=problem.found, supported=_format.FORMAT_VERSION
            ) from None
        if problem.kind == "unsupported-flags":
            raise UnsupportedVersionError(
                path, what="container flags", found=problem.found, supported=_format.KNOWN_FLAGS
            ) from None
        step = (
            "if it is a state document, load it with `posstate import FILE`"
            if problem.kind == "not-a-state-file"
            else "recover with `posstate repair` or restore a backup with `posstate backups restore latest`"
        )
        raise CorruptStateError(path, problem.reason, next_step=step, kind=problem.kind) from None
    if header.schema_version > SCHEMA_VERSION:
        raise UnsupportedVersionError(path, what="schema", found=header.schema_version, supported=SCHEMA_VERSION)
    return header


def decode(
    data: bytes,
    *,
    keyring: _crypto.Keyring | None,
    path: str | Path | None = None,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> tuple[Header, bytes]:
    """Return (header, document JSON bytes) or raise the typed error that says what is wrong."""
    header = inspect(data, path=path)
    payload = _format.payload_of(data)
    if header.encrypted:
        if keyring is None:
            raise MissingKeyError(path, reason=f"the file is encrypted (key id {header.key_id}) and no key was supplied")
        if header.passphrase != keyring.uses_passphrase:
            given = "key" if header.passphrase else "passphrase"
            raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, given=given)
        key = keyring.key_for(header.salt, header.kdf_log2_n)
        head = data[: _format.HEADER_SIZE]
        plain = _crypto.open_sealed(key, header.nonce, payload, head)
        if plain is None:
            raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=_crypto.key_id(key), passphrase=header.passphrase)
        payload = plain
    if header.compressed:
        payload = _inflate(payload, path=path, cap=max_document_bytes)
    elif len(payload) > max_document_bytes:
        raise CorruptStateError(
            path, f"document of {len(payload)} bytes is over the {max_document_bytes}-byte cap", kind="damaged"
        )
    return header, payload


def _inflate(payload: bytes, *, path: str | Path | None, cap: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:
        raise CorruptStateError(path, "payload is not a zstd frame", kind="damaged") from None
    if declared > cap:
        raise CorruptStateError(path, f"payload would inflate to {declared} bytes, over the {cap}-byte cap", kind="damaged")
    try:
        if declared >= 0:
            out = _decompressor().decompress(payload)
            if len(out) != declared:
                raise CorruptStateError(path, "payload inflated to the wrong size", kind="damaged")
            return out
        reader = _decompressor().stream_reader(payload)
        out = reader.read(cap + 1)
    except zstandard.ZstdError as exc:
        raise CorruptStateError(path, f"payload does not decompress ({exc})", kind="damaged") from None
    if len(out) > cap:
        raise CorruptStateError(path, f"payload inflates past the {cap}-byte cap", kind="damaged")
    return out
