"""The journal's bytes: a fixed header, then framed records. Works on bytes; knows nothing of files or JSON.

Layout (all integers big-endian; see docs/JOURNAL.md for the byte-by-byte table):

* header, 96 bytes: magic ``PSJRNL``, version, flags, KDF cost, 4 reserved bytes (versions 1 and 2: a
  random nonce prefix), the 128-bit journal id, the key id, the passphrase salt, the snapshot generation and
  last sequence number the journal starts from, its creation time, and a truncated SHA-256 of the 88 bytes
  before it.
* the records, each: ``length`` (u32) + ``crc32(length field)`` (u32) + ``crc32(length field + body)`` (u32)
  + body, where body = ``seq`` (u64) + ``generation`` (u64) + ``time_ms`` (u64) + ``kind`` (u8) + payload. The payload is
  the JSON list of operations, sealed with AES-256-GCM when the journal is encrypted: the key is a per-journal
  subkey (HMAC-SHA256 of the master key and the journal id), the associated data is the header plus the 25
  body bytes before the payload (version 3: the header, the previous record's 16-byte GCM tag, 16 zero bytes
  for the first record, then the 25 bytes), and (version 3) the payload is a fresh random 96-bit nonce
  followed by the ciphertext and tag (chained: records of two copies of one journal never splice; a
  random nonce per record never repeats when a directory is copied or reverted; versions 1 and 2 used the
  header's prefix + the sequence number: read, never appended to when encrypted). Version 1 checked frames
  with ``SHA-256(length field + body)[:8]`` in a 16-byte head; later versions with CRC-32 (docs/JOURNAL.md).
  Version 4 (a linked segment, issue 14) is version 3 with a link to the segment before it in the header.
* zero bytes up to the end of the file: space written ahead of time, which the next records overwrite in
  place (a length field of zero followed by nothing but zeros ends the records).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from dataclasses import dataclass
from functools import partial

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from posstate.journal import tornframe as _tornframe
from posstate.model.position import MAX_COUNTER
from posstate.storage.crypto import MAX_SCRYPT_LOG2_N, MIN_SCRYPT_LOG2_N

MAGIC = b"PSJRNL"
VERSION = 4  # the newest read; versions 1 and 2 are still read (continued only when plain)
PLAIN_VERSION = 3  # a journal that starts right after a snapshot
#: A segment continuing another (issue 14): FLAG_LINKED, the first LINK_SIZE bytes of the previous id in bytes
#: 12..15 and 80..87; records framed and sealed as in version 3.
LINKED_VERSION, LINK_SIZE = 4, 12
#: The first version whose encrypted records carry their own random nonce (see Sealer).
RANDOM_NONCE_VERSION = 3
NONCE_SIZE = 12
HEADER_SIZE = 96
FRAME_HEAD = 12  # version 2: length, crc32(length field), crc32(length field + body)
FRAME_HEAD_V1 = 16  # version 1: length, crc32(length field), SHA-256(length field + body)[:8]
BODY_FIXED = 25  # seq, generation, time_ms, kind
TAG_SIZE = 16
#: Version 3: what the first record's associated data holds where later records hold the previous tag.
FIRST_LINK = bytes(TAG_SIZE)
MAX_BODY = 64 * 1024 * 1024
#: The largest base_seq / base_generation a header may name (a format rule). Half of what a snapshot's
#: ``journal.seq`` may hold: a journal continued from it can never hand out a number its next snapshot
#: could not store (a header with no records is authenticated by nothing; see parse_header).
MAX_BASE = (MAX_COUNTER + 1) // 2
FLAG_ENCRYPTED = 0x01
FLAG_PASSPHRASE = 0x02
FLAG_LINKED = 0x04  # version 4 only: the header names the segment before this one
KIND_OP, KIND_TRANSACTION = 1, 2
KIND_FOLD = 3  # not a change: what a durable save's snapshot holds (journal/fold.py, issue 15.4)
_SUBKEY_LABEL = b"posstate/journal-key/v1"
_HEAD = struct.Struct(">6sHHBB4s16s8s16sQQQ8x")  # 88 bytes, then 8 bytes of checksum
_LENGTH = struct.Struct(">II")  # length, crc32(length field): the same in both versions
_BODY = struct.Struct(">QQQB")
_U32 = struct.Struct(">I")
_LENGTH_OK = ("record cut short", "record checksum mismatch")  # a frame whose length field passes its CRC
_pack_body = _BODY.pack
_pack_u32 = _U32.pack
_unpack_u32 = _U32.unpack_from
_crc32 = zlib.crc32
_urandom = os.urandom
_sha256 = hashlib.sha256


class JournalProblem(Exception):
    """Bytes that are not a valid journal header or record (the caller names the file)."""


class JournalTooNew(JournalProblem):
    """An intact header of a journal format newer than this posstate reads: not damage, an older reader."""

    def __init__(self, found: int) -> None:
        self.found = found
        super().__init__(f"journal format version {found} is newer than this posstate reads ({VERSION})")


@dataclass(frozen=True, slots=True)
class JournalHeader:
    journal_id: bytes  # 16 bytes
    nonce_prefix: bytes  # 4 bytes (versions 1 and 2; zeros in version 3)
    flags: int
    kdf_log2_n: int
    key_id: str  # hex, all zeros when plain
    salt: bytes
    base_generation: int
    base_seq: int
    created_ms: int
    raw: bytes  # the 96 header bytes (AES-GCM associated data)
    version: int  # 1 to 4: decides the framing of the records (frame_head) and the nonces (Sealer)
    prev_link: bytes = b""  # version 4: the first 12 bytes of the previous segment's id

    def follows(self, other: JournalHeader) -> bool:  # this segment links to *other* and starts after its base
        return bool(self.prev_link) and self.prev_link == other.journal_id[:LINK_SIZE] and self.base_seq >= other.base_seq

    @property
    def frame_head(self) -> int:
        """Bytes before each record's body in this journal's framing."""
        return FRAME_HEAD_V1 if self.version == 1 else FRAME_HEAD

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def appendable(self) -> bool:
        """May records be added to this journal? Not to an encrypted journal of version 1 or 2: its nonces
        are the header's prefix + the sequence number, which a copy of the file would repeat."""
        return not self.encrypted or self.version >= RANDOM_NONCE_VERSION

    @property
    def passphrase(self) -> bool:
        return bool(self.flags & FLAG_PASSPHRASE)

    @property
    def id_hex(self) -> str:
        return self.journal_id.hex()


def new_header(
    *,
    base_generation: int,
    base_seq: int,
    created_ms: int,
    key_id: str | None,
    salt: bytes = b"",
    kdf_log2_n: int = 0,
    journal_id: bytes | None = None,
    version: int | None = None,
    prev_id: bytes | None = None,
) -> JournalHeader:
    """A header for a new journal: a fresh random id unless *journal_id* is given (the journal a durable
    snapshot already names, created only now). *version* other than the current one is for tests of
    reading older journals (those get a random nonce prefix, as they had). *prev_id* makes a linked segment
    (version 4) continuing the journal of that id."""
    version = version or (LINKED_VERSION if prev_id is not None else PLAIN_VERSION)
    flags = FLAG_LINKED if prev_id is not None else 0
    if key_id is not None:
        flags |= FLAG_ENCRYPTED
        if salt:
            flags |= FLAG_PASSPHRASE
    kid = bytes.fromhex(key_id) if key_id is not None else bytes(8)
    journal_id = os.urandom(16) if journal_id is None else journal_id
    prefix = os.urandom(4) if version < RANDOM_NONCE_VERSION else bytes(4)
    prefix, tail = (prev_id[:4], prev_id[4:LINK_SIZE]) if prev_id is not None else (prefix, bytes(8))
    head = _HEAD.pack(
        MAGIC,
        version,
        flags,
        kdf_log2_n,
        0,
        prefix,
        journal_id,
        kid,
        salt.ljust(16, b"\0"),
        base_generation,
        base_seq,
        created_ms,
    )
    head = head[:80] + tail  # version 4: bytes 80..87 hold the rest of the link (zeros otherwise)
    raw = head + hashlib.sha256(head).digest()[:8]
    return parse_header(raw)


def parse_header(data: bytes) -> JournalHeader:
    if len(data) < HEADER_SIZE:
        raise JournalProblem(f"file is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte journal header")
    raw = bytes(data[:HEADER_SIZE])
    if raw[:6] != MAGIC:
        raise JournalProblem("not a posstate journal (bad magic)")
    if hashlib.sha256(raw[:88]).digest()[:8] != raw[88:]:
        raise JournalProblem("journal header checksum mismatch (damaged on disk)")
    _magic, version, flags, log2_n, _res, prefix, jid, kid, salt, base_gen, base_seq, created = _HEAD.unpack(raw[:88])
    tail = raw[80:88]
    if version > VERSION:
        raise JournalTooNew(version)
    if version < 1:
        raise JournalProblem(f"journal format version {version} does not exist")
    if flags & ~(FLAG_ENCRYPTED | FLAG_PASSPHRASE | (FLAG_LINKED if version >= LINKED_VERSION else 0)):
        raise JournalProblem(f"unknown journal flags {flags:#x}")
    if version >= LINKED_VERSION and not flags & FLAG_LINKED:
        raise JournalProblem("version 4 journal header without the linked-segment flag")
    link, prefix = (prefix + tail, bytes(4)) if flags & FLAG_LINKED else (b"", prefix)
    # The header is read before anything authenticates it: bound the scrypt cost before any KDF runs.
    if flags & FLAG_PASSPHRASE and not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        raise JournalProblem(f"scrypt cost log2(N) = {log2_n} is outside {MIN_SCRYPT_LOG2_N}..{MAX_SCRYPT_LOG2_N}")
    if not flags & FLAG_PASSPHRASE and log2_n != 0:
        raise JournalProblem(f"scrypt cost log2(N) = {log2_n} without the passphrase flag (must be 0)")
    if flags & FLAG_PASSPHRASE and not flags & FLAG_ENCRYPTED:
        raise JournalProblem("passphrase flag without the encrypted flag")
    # Nothing authenticates a header until a record names it (AES-GCM associated data), and a journal with
    # no records is continued: bound the numbers the writer would go on from.
    if base_seq > MAX_BASE or base_gen > MAX_BASE:
        raise JournalProblem(f"base sequence {base_seq} or generation {base_gen} out of range (0..{MAX_BASE})")
    return JournalHeader(
        journal_id=jid,
        nonce_prefix=prefix,
        flags=flags,
        kdf_log2_n=log2_n,
        key_id=kid.hex(),
        salt=salt if flags & FLAG_PASSPHRASE else b"",
        base_generation=base_gen,
        base_seq=base_seq,
        created_ms=created,
        raw=raw,
        version=version,
        prev_link=link,
    )


def subkey(master: bytes, journal_id: bytes) -> bytes:
    """The per-journal AES key: a nonce can only repeat if a 128-bit random journal id repeats too."""
    return hmac.new(master, _SUBKEY_LABEL + journal_id, hashlib.sha256).digest()


class Sealer:
    """Frames (and, with a key, seals) records of one journal, in that journal's version. Cheap per record:
    12 random bytes, one encrypt and two CRC-32s (version 1: a SHA-256 instead of the second CRC).

    Version 3 draws each record's nonce from ``os.urandom`` (never from a buffer or a counter kept in
    memory or on disk: a forked process, a reverted VM or a copied directory would repeat those)."""

    __slots__ = ("_aead", "_encrypt", "_header", "_prefix", "_prev", "_random", "_raw", "_v1")

    def __init__(self, header: JournalHeader, master_key: bytes | None, *, after: RawRecord | None = None) -> None:
        self._header = header
        self._aead = AESGCM(subkey(master_key, header.journal_id)) if master_key is not None else None
        # Bound once: frame() runs for every durable change.
        self._encrypt = self._aead.encrypt if self._aead is not None else None
        self._prefix = header.nonce_prefix
        self._random = header.version >= RANDOM_NONCE_VERSION
        self._raw = header.raw
        self._v1 = header.version == 1
        # Version 3 chains the records: each one's associated data holds the GCM tag of the record before it
        # (FIRST_LINK before the first), so records of two copies of one journal never splice (docs/JOURNAL.md).
        self._prev = FIRST_LINK
        if after is not None:
            self.follow(after)

    def follow(self, rec: RawRecord) -> None:
        """The next record written or opened comes after *rec* (the last good record of a journal that is
        continued): chain to its tag. Nothing to do for a plaintext journal or versions 1 and 2."""
        if self._random and self._aead is not None and len(rec.payload) >= NONCE_SIZE + TAG_SIZE:
            self._prev = rec.payload[-TAG_SIZE:]

    def frame(self, *, seq: int, generation: int, time_ms: int, kind: int, payload: bytes) -> bytes:
        fixed = _pack_body(seq, generation, time_ms, kind)
        encrypt = self._encrypt
        if encrypt is not None:
            if self._random:
                nonce = _urandom(NONCE_SIZE)
                sealed = encrypt(nonce, payload, self._raw + self._prev + fixed)
                self._prev = sealed[-TAG_SIZE:]
                payload = nonce + sealed
            else:  # versions 1 and 2, only for tests that write them: Journal never appends to such a file
                payload = encrypt(self._prefix + seq.to_bytes(8, "big"), payload, self._raw + fixed)
        body = fixed + payload
        length = _pack_u32(len(body))
        length_crc = _crc32(length)
        if self._v1:
            return b"".join((length, _pack_u32(length_crc), _sha256(length + body).digest()[:8], body))
        # crc32(body, crc32(length)) is the CRC-32 of length + body, without building that string.
        return b"".join((length, _pack_u32(length_crc), _pack_u32(_crc32(body, length_crc)), body))

    def open(self, rec: RawRecord) -> bytes | None:
        """The plaintext payload, or None when authentication fails (tampering, a record spliced from another
        copy of this journal, or a wrong key). Records are opened in order: version 3 chains each to the one
        before (the chain moves on only past a record that opened)."""
        if self._aead is None:
            return rec.payload
        plain = self.unseal(rec.fixed, rec.payload, self._prev)
        if plain is not None and self._random:
            self._prev = rec.payload[-TAG_SIZE:]
        return plain

    def unseal(self, fixed: bytes, payload: bytes, prev: bytes) -> bytes | None:
        """The plaintext of a sealed record read after the record whose tag is *prev* (version 3), or None:
        it does not authenticate, or the journal is plain. Leaves the chain of :meth:`open` as it is."""
        if self._aead is None or (self._random and len(payload) < NONCE_SIZE + TAG_SIZE):
            return None
        if self._random:
            nonce, sealed, aad = payload[:NONCE_SIZE], payload[NONCE_SIZE:], self._raw + prev + fixed
        else:
            nonce, sealed, aad = self._prefix + fixed[:8], payload, self._raw + fixed
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            return None


@dataclass(frozen=True, slots=True)
class RawRecord:
    offset: int
    end: int
    seq: int
    generation: int
    time_ms: int
    kind: int
    fixed: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Scan:
    """What a pass over the records found. ``bad_offset`` is where the first bad frame starts (None: clean)."""

    records: tuple[RawRecord, ...]
    good_end: int
    bad_offset: int | None
    bad_reason: str
    bad_is_tail: bool  # True: nothing valid follows the bad bytes (a torn last append)
    torn_bytes: int = 0  # a torn tail: its bytes up to the last non-zero one (the zeros after it are space)


def _frame_at(data: bytes, off: int, head: int) -> tuple[RawRecord | None, str, bool]:
    """Parse the frame at *off*; (record, "", False) or (None, why, forged). *head* is the journal's
    ``frame_head`` (12 bytes: frames checked with CRC-32; 16 bytes: version 1's SHA-256). *forged*: a torn
    write cannot leave it: the length field passes its CRC but names a length no writer produces (below the
    25 fixed body bytes or above ``MAX_BODY``), or the whole frame checks but names no record kind."""
    size = len(data)
    if size - off < head:
        return None, "frame header cut short", False
    length, crc = _LENGTH.unpack_from(data, off)
    if _crc32(data[off : off + 4]) != crc:
        return None, "frame length field damaged", False
    if length < BODY_FIXED or length > MAX_BODY:
        return None, f"frame length {length} out of range ({BODY_FIXED}..{MAX_BODY}) with a valid length check", True
    end = off + head + length
    if end > size:
        return None, _LENGTH_OK[0], False
    body = data[off + head : end]
    if head == FRAME_HEAD:
        intact = _crc32(body, crc) == _unpack_u32(data, off + 8)[0]
    else:
        intact = _sha256(data[off : off + 4] + body).digest()[:8] == data[off + 8 : off + 16]
    if not intact:
        return None, _LENGTH_OK[1], False
    seq, gen, t, kind = _BODY.unpack_from(body, 0)
    if kind not in (KIND_OP, KIND_TRANSACTION, KIND_FOLD):
        return None, f"unknown record kind {kind}", True
    return (
        RawRecord(
            offset=off,
            end=end,
            seq=seq,
            generation=gen,
            time_ms=t,
            kind=kind,
            fixed=bytes(body[:BODY_FIXED]),
            payload=bytes(body[BODY_FIXED:]),
        ),
        "",
        False,
    )


def _whole(data: bytes, head: int, sealer: Sealer | None, start: int, end: int, link: bytes) -> bool:
    """tornframe.Whole: the frame at *start* read as ending at *end* checks, or authenticates after *link*."""
    body = data[start + head : end]
    if end > len(data) or not BODY_FIXED <= len(body) <= MAX_BODY:
        return False
    field = _pack_u32(len(body))
    if head == FRAME_HEAD:
        ok = _crc32(body, _crc32(field)) == _U32.unpack_from(data, start + 8)[0]
    else:
        ok = _sha256(field + body).digest()[:8] == data[start + 8 : start + 16]
    return bool(ok) or (sealer is not None and sealer.unseal(body[:BODY_FIXED], body[BODY_FIXED:], link) is not None)


def scan(data: bytes, header: JournalHeader, sealer: Sealer | None = None) -> Scan:
    """Walk the frames after the header. At the first bad frame, decide: torn tail or damage in the middle.
    The records end where only zeros remain (written ahead, overwritten in place). A bad frame is a torn tail
    only if no whole frame starts after it (a crash leaves garbage then zeros or the end of the file, never a
    good record behind it), its length field does not pass its CRC while naming an impossible length
    (``_frame_at``), and no whole record of another length hides behind its valid length field (tornframe.py;
    with *sealer*, the journal's key, "whole" includes "authenticates"). Sequence numbers run on from
    ``base_seq`` without gaps, in the header's generation."""
    records: list[RawRecord] = []
    off = HEADER_SIZE
    size = len(data)
    expect = header.base_seq + 1
    fhead = header.frame_head
    while off < size:
        head = data[off : off + 4]
        if head.count(0) == len(head) and data.count(0, off) == size - off:
            break  # a zero length field and only zeros after it: the padding after the last record
        rec, why, forged = _frame_at(data, off, fhead)
        if rec is not None and (rec.seq != expect or rec.generation != header.base_generation):
            # A checksummed frame with the wrong numbers is not a torn write: it is damage or a foreign record.
            why = (
                f"record sequence {rec.seq} (generation {rec.generation}) where {expect} "
                f"(generation {header.base_generation}) was expected"
            )
            return Scan(tuple(records), off, off, why, False)
        if rec is None:
            prev = records[-1].payload[-TAG_SIZE:] if records else FIRST_LINK
            whole = partial(_whole, data, fhead, sealer)
            changed = "" if forged else _tornframe.changed_length(data, off, fhead, whole, why in _LENGTH_OK, prev)
            if forged or changed:
                return Scan(tuple(records), off, off, f"{why}; {changed}" if changed else why, False)
            return Scan(tuple(records), off, off, why, True, max(1, len(data.rstrip(b"\0")) - off))
        records.append(rec)
        expect += 1
        off = rec.end
    return Scan(tuple(records), off, None, "", False)
