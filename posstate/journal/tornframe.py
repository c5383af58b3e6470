"""A torn append, or a length field changed on purpose? (issue 12.13) Works on bytes, like format.py.

A frame whose length field passes its CRC but whose record does not check out (it runs past the end of the
file, or its checksum fails) is what a power loss during an append leaves: the record's bytes after its
frame head are a strict prefix of ONE record, so no whole record can be found in them. A length field
raised or lowered by someone without the key (the CRC is keyless) leaves the real record whole, and often
further whole frames after it. So before such a frame is cut as a torn tail, the real boundaries it could
have are tried: every later offset where a frame head with a valid length check starts, where the zeros
after the last non-zero byte begin (up to a tag's length later: a sealed record may end in zero bytes), and
the end of the file. A whole record there (its checksum holds for that length, or with the key it
authenticates), or a whole frame starting at one of those heads, makes the frame damage. Without the key
an attacker who rewrites the record's checksum too is not seen (nothing keyless can tell); with the key the
record authenticates. A cut at a record boundary stays undetectable without an outside count (docs/SECURITY.md).

The work is bounded: one pass over the bytes after the frame (a CRC-32 of 4 bytes per offset) and at most
``MAX_HEADS`` + ``TAG_SIZE`` + 1 candidate checks, each over at most those bytes; the first whole record ends it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator

#: The most frame heads with a valid length check tried as boundaries or whole frames (each costs a checksum
#: or a decryption over at most the bytes after the frame). Random bytes hold one by chance every 2**32 offsets.
MAX_HEADS = 16
_TAG = 16  # AES-GCM tag: the last bytes of a sealed record, which may be zeros
_FIXED = 25  # the smallest body: seq, generation, time, kind (format.BODY_FIXED)
_LENGTH = struct.Struct(">II")  # a frame's length field and its CRC-32: the same in every journal version

#: (start, end, link) -> the frame at *start*, read as ending at *end*, holds a whole record: its checksum
#: holds for that length, or (with the key) it authenticates after the record whose tag is *link*.
Whole = Callable[[int, int, bytes], bool]


def heads_after(data: bytes, start: int, stop: int) -> Iterator[int]:
    """Offsets in start..stop where 8 bytes read as a length field and its valid CRC (at most MAX_HEADS)."""
    found = 0
    unpack, crc32 = _LENGTH.unpack_from, zlib.crc32
    for off in range(start, min(stop, len(data) - _LENGTH.size) + 1):
        length, crc = unpack(data, off)
        if length and crc32(data[off : off + 4]) == crc:
            yield off
            found += 1
            if found >= MAX_HEADS:
                return


def changed_length(data: bytes, off: int, head: int, whole: Whole, length_ok: bool, prev: bytes) -> str:
    """Why the bad frame at *off* cannot be a torn append ("" when it can be one).

    *head*: the journal's frame head size. *length_ok*: the frame's length field passes its CRC (only then
    are other lengths tried for it; a later whole frame is damage either way). *prev*: the tag of the last
    good record (a record's associated data names the one before it)."""
    nonzero = len(data.rstrip(b"\0"))
    heads: list[int] = []
    for p in heads_after(data, off + 1, nonzero - 1):  # a whole frame later on: its own length, after the tag before it
        if whole(p, p + head + _LENGTH.unpack_from(data, p)[0], data[max(0, p - _TAG) : p]):
            return f"a whole frame follows at byte {p}"
        heads.append(p)
    if not length_ok:
        return ""
    first = off + head + _FIXED
    ends = [p for p in heads if p >= first]
    ends += [e for e in range(nonzero, min(nonzero + _TAG, len(data)) + 1) if e >= first and e not in ends]
    if len(data) not in ends and len(data) >= first:
        ends.append(len(data))
    for end in ends:
        if whole(off, end, prev):
            length = _LENGTH.unpack_from(data, off)[0]
            return f"frame length {length} was changed: a whole record of {end - off - head} bytes ends at byte {end}"
    return ""
