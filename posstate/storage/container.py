"""The container: one ASCII header line, the payload, one ASCII checksum line. See docs/FORMAT.md.

Layout (format version 1)::

    PSTATE01 f=FF k=KKKKKKKKKKKKKKKK n=NNNN...(24) s=SSSS...(32) w=WW v=VVVV g=G...(16) t=T...(16) c=CCCCCCCC l=L...(16)\\n
    <payload: l bytes>
    \\nsha256=<64 hex digits>\\n

Every field has a fixed width, so each sits at a fixed byte offset. The header line is the AES-GCM
associated data. The trailer's SHA-256 covers every byte before it and is keyless, so a reader can tell
damage on disk (checksum fails) from a wrong key or tampering (checksum holds, GCM fails) without a key.
The trailer layout is frozen for all format versions: it is checked before the version is trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

from posstate.storage.crypto import MAX_SCRYPT_LOG2_N, MIN_SCRYPT_LOG2_N

MAGIC = b"PSTATE"
FORMAT_VERSION = 1
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
FLAG_PASSPHRASE = 0x04
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_ENCRYPTED | FLAG_PASSPHRASE

_FIELDS: tuple[tuple[str, int], ...] = (
    ("f", 2),  # flags
    ("k", 16),  # key id (8 bytes)
    ("n", 24),  # AES-GCM nonce (12 bytes)
    ("s", 32),  # scrypt salt (16 bytes)
    ("w", 2),  # scrypt log2(N)
    ("v", 4),  # schema version of the payload document
    ("g", 16),  # generation
    ("t", 16),  # written at, ms since the epoch (UTC)
    ("c", 8),  # position count
    ("l", 16),  # payload length in bytes
)
HEADER_SIZE = len(MAGIC) + 2 + sum(1 + len(name) + 1 + width for name, width in _FIELDS) + 1
TRAILER_PREFIX = b"\nsha256="
TRAILER_SIZE = len(TRAILER_PREFIX) + 64 + 1
MIN_FILE_SIZE = HEADER_SIZE + TRAILER_SIZE

#: Byte offset of each field's value in the header line (documented in docs/FORMAT.md).
OFFSETS: dict[str, tuple[int, int]] = {}
_pos = len(MAGIC) + 2
for _name, _width in _FIELDS:
    _pos += 1 + len(_name) + 1
    OFFSETS[_name] = (_pos, _width)
    _pos += _width
del _pos


@dataclass(frozen=True, slots=True)
class Header:
    """What the header line says; everything here is public (no key material)."""

    format_version: int
    flags: int
    key_id: str
    nonce: bytes
    salt: bytes
    kdf_log2_n: int
    schema_version: int
    generation: int
    written_at_ms: int
    position_count: int
    payload_length: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def passphrase(self) -> bool:
        return bool(self.flags & FLAG_PASSPHRASE)

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.payload_length + TRAILER_SIZE


class FormatProblem(Exception):
    """Raised by the parsers below; the codec turns it into a typed posstate error with the file's path."""

    def __init__(self, kind: str, reason: str, *, found: int = 0) -> None:
        super().__init__(reason)
        self.kind = kind  # not-a-state-file | truncated | damaged | unsupported-format | unsupported-flags
        self.reason = reason
        self.found = found


def _is_json(data: bytes) -> bool:
    """Only for the error message: call a file plain JSON only if it really parses as JSON."""
    try:
        json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def pack_header(h: Header) -> bytes:
    parts = [MAGIC + b"%02d" % h.format_version]
    values = {
        "f": h.flags,
        "k": int(h.key_id, 16),
        "n": int.from_bytes(h.nonce, "big") if h.nonce else 0,
        "s": int.from_bytes(h.salt, "big") if h.salt else 0,
        "w": h.kdf_log2_n,
        "v": h.schema_version,
        "g": h.generation,
        "t": h.written_at_ms,
        "c": h.position_count,
        "l": h.payload_length,
    }
    for name, width in _FIELDS:
        value = values[name]
        if value < 0 or value >= 16**width:
            raise ValueError(f"header field {name} out of range")
        parts.append(b" %s=%0*x" % (name.encode(), width, value))
    out = b"".join(parts) + b"\n"
    assert len(out) == HEADER_SIZE
    return out


def parse_header(data: bytes) -> Header:
    """Parse the header line at the start of *data*; the checksum must already have been checked."""
    if len(data) < HEADER_SIZE:
        raise FormatProblem("truncated", f"header cut short ({len(data)} of {HEADER_SIZE} bytes)")
    line = data[:HEADER_SIZE]
    if not line.startswith(MAGIC):
        raise FormatProblem("not-a-state-file", "not a posstate file (no PSTATE magic)")
    try:
        version = int(line[6:8].decode("ascii"), 10)
    except ValueError:
        raise FormatProblem("damaged", "header format version is not a number") from None
    if version > FORMAT_VERSION:
        raise FormatProblem("unsupported-format", f"format version {version}", found=version)
    if version < 1 or line[-1:] != b"\n":
        raise FormatProblem("damaged", "header line malformed")
    values: dict[str, int] = {}
    for name, width in _FIELDS:
        start, _ = OFFSETS[name]
        label = line[start - len(name) - 2 : start]
        if label != b" " + name.encode() + b"=":
            raise FormatProblem("damaged", f"header field {name} malformed")
        text = line[start : start + width]
        try:
            if not all(ch in b"0123456789abcdef" for ch in text):
                raise ValueError
            values[name] = int(text, 16)
        except ValueError:
            raise FormatProblem("damaged", f"header field {name} is not hex") from None
    if values["f"] & ~KNOWN_FLAGS:
        raise FormatProblem("unsupported-flags", f"unknown flags {values['f']:#04x}", found=values["f"])
    _check_kdf_cost(values["w"], passphrase=bool(values["f"] & FLAG_PASSPHRASE))
    return Header(
        format_version=version,
        flags=values["f"],
        key_id=f"{values['k']:016x}",
        nonce=values["n"].to_bytes(12, "big"),
        salt=values["s"].to_bytes(16, "big"),
        kdf_log2_n=values["w"],
        schema_version=values["v"],
        generation=values["g"],
        written_at_ms=values["t"],
        position_count=values["c"],
        payload_length=values["l"],
    )


def _check_kdf_cost(log2_n: int, *, passphrase: bool) -> None:
    """The scrypt cost is read before anything authenticates the header: bound it before any KDF runs
    (a crafted cost would otherwise ask for gigabytes of memory or hours of CPU)."""
    if passphrase and not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        raise FormatProblem(
            "damaged", f"scrypt cost log2(N) = {log2_n} is outside {MIN_SCRYPT_LOG2_N}..{MAX_SCRYPT_LOG2_N} (header field w)"
        )
    if not passphrase and log2_n != 0:
        raise FormatProblem("damaged", f"scrypt cost log2(N) = {log2_n} without the passphrase flag (header field w must be 0)")


def trailer_for(body: bytes) -> bytes:
    return TRAILER_PREFIX + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"


def checksum_of(data: bytes) -> str | None:
    """The hex checksum a file's trailer records, or None if the trailer is malformed."""
    tail = data[-TRAILER_SIZE:]
    if len(data) < TRAILER_SIZE or not tail.startswith(TRAILER_PREFIX) or tail[-1:] != b"\n":
        return None
    digest = tail[len(TRAILER_PREFIX) : -1]
    if not all(ch in b"0123456789abcdef" for ch in digest):
        return None
    return digest.decode("ascii")


def check_file(data: bytes) -> Header:
    """Check magic, trailer, checksum, version and length of a whole file; return its header.

    The order matters: the checksum is verified before any header field is trusted, so a flipped bit in
    the version or flags reads as damage, not as a file from a newer posstate.
    """
    if not data:
        raise FormatProblem("truncated", "file is empty (0 bytes)")
    if not data.startswith(MAGIC):
        if data[: len(MAGIC)] == MAGIC[: len(data)]:
            raise FormatProblem("truncated", f"file is cut short ({len(data)} bytes)")
        if data.lstrip()[:1] in (b"{", b"[") and _is_json(data):
            raise FormatProblem("not-a-state-file", "plain JSON, not a posstate container")
        raise FormatProblem("not-a-state-file", "not a posstate file (no PSTATE magic)")
    expected_size: int | None = None
    with contextlib.suppress(FormatProblem):
        expected_size = parse_header(data).file_size
    recorded = checksum_of(data)
    if recorded is None or hashlib.sha256(data[:-TRAILER_SIZE]).hexdigest() != recorded:
        if expected_size is not None and len(data) < expected_size:
            raise FormatProblem("truncated", f"file is cut short ({len(data)} of {expected_size} bytes)")
        if expected_size is not None and len(data) > expected_size:
            raise FormatProblem("damaged", f"{len(data) - expected_size} unexpected bytes after the end of the file")
        if len(data) < MIN_FILE_SIZE:
            raise FormatProblem("truncated", f"file is cut short ({len(data)} bytes)")
        raise FormatProblem("damaged", "checksum mismatch (file damaged on disk)")
    header = parse_header(data)
    if len(data) != header.file_size:
        raise FormatProblem("damaged", f"length field says {header.file_size} bytes, file has {len(data)}")
    return header


def payload_of(data: bytes) -> bytes:
    return data[HEADER_SIZE:-TRAILER_SIZE]
