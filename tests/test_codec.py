"""The container format and codec: header layout, flags, checksum, encryption, every kind of damage."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import orjson
import pytest
import zstandard

from posstate import CorruptStateError, MissingKeyError, UnsupportedVersionError, WrongKeyError, generate_key
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage import crypto as _crypto
from posstate.storage.container import HEADER_SIZE, OFFSETS, TRAILER_SIZE

DOC = orjson.dumps({"hello": "world", "n": [1, 2, 3], "pad": "x" * 200})


def _keyring(key: bytes | None = None) -> _crypto.Keyring:
    return _crypto.Keyring(key=key if key is not None else generate_key())


def _reseal(data: bytes, *, header: bytes | None = None) -> bytes:
    """Replace the header line (optional) and write a fresh, valid trailer: damage the checksum cannot see."""
    body = data[:-TRAILER_SIZE]
    if header is not None:
        body = header + body[HEADER_SIZE:]
    return body + _format.trailer_for(body)


def _set_field(data: bytes, name: str, value: int) -> bytes:
    start, width = OFFSETS[name]
    head = bytearray(data[:HEADER_SIZE])
    head[start : start + width] = b"%0*x" % (width, value)
    return _reseal(data, header=bytes(head))


def _container(payload: bytes, *, flags: int) -> bytes:
    header = _format.Header(
        format_version=1,
        flags=flags,
        key_id="0" * 16,
        nonce=bytes(12),
        salt=bytes(16),
        kdf_log2_n=0,
        schema_version=1,
        generation=1,
        written_at_ms=0,
        position_count=0,
        payload_length=len(payload),
    )
    body = _format.pack_header(header) + payload
    return body + _format.trailer_for(body)


def _encode(*, level: int | None = 3, keyring: _crypto.Keyring | None = None, document: bytes = DOC) -> bytes:
    return _codec.encode(
        document, generation=7, written_at_ms=1_700_000_000_123, position_count=2, compression_level=level, keyring=keyring
    ).data


def test_header_fields_sit_at_their_offsets() -> None:
    """Each header value is lower-case hex at OFFSETS[name], labelled ' name=' just before it."""
    kr = _crypto.Keyring(passphrase="correct horse", log2_n=10)
    enc = _codec.encode(DOC, generation=7, written_at_ms=1_700_000_000_123, position_count=2, compression_level=3, keyring=kr)
    data = enc.data
    assert len(data[:HEADER_SIZE].decode("ascii")) == HEADER_SIZE == 175 and data[HEADER_SIZE - 1 : HEADER_SIZE] == b"\n"
    assert data[:8] == b"PSTATE01"

    def field(name: str) -> int:
        start, width = OFFSETS[name]
        assert data[start - len(name) - 2 : start] == f" {name}=".encode()
        text = data[start : start + width].decode("ascii")
        assert re.fullmatch(r"[0-9a-f]+", text)
        return int(text, 16)

    h = enc.header
    assert field("f") == _format.FLAG_COMPRESSED | _format.FLAG_ENCRYPTED | _format.FLAG_PASSPHRASE == h.flags == 7
    assert f"{field('k'):016x}" == h.key_id == _crypto.key_id(kr.key_for(h.salt, 10))
    assert field("n").to_bytes(12, "big") == h.nonce and h.nonce != bytes(12)
    assert field("s").to_bytes(16, "big") == h.salt and h.salt != bytes(16)
    assert field("w") == 10
    assert field("v") == _codec.PLAIN_SCHEMA_VERSION  # a document without bot metadata (issue 15.7)
    assert field("g") == 7
    assert field("t") == 1_700_000_000_123
    assert field("c") == 2
    assert field("l") == len(data) - HEADER_SIZE - TRAILER_SIZE
    trailer = data[-TRAILER_SIZE:]
    assert trailer == b"\nsha256=" + hashlib.sha256(data[:-TRAILER_SIZE]).hexdigest().encode() + b"\n"
    assert enc.checksum == trailer[8:-1].decode()


def test_key_id_is_hmac_of_label() -> None:
    """key id = HMAC-SHA256(key, 'posstate/key-id/v1')[:8] as hex."""
    import hmac

    key = bytes(range(32))
    assert _crypto.key_id(key) == hmac.new(key, b"posstate/key-id/v1", hashlib.sha256).digest()[:8].hex()


def test_nonce_is_fresh_per_write() -> None:
    """Two encodings with one key use different nonces (and so different ciphertexts)."""
    kr = _keyring()
    a, b = (
        _codec.encode(DOC, generation=1, written_at_ms=0, position_count=0, compression_level=3, keyring=kr) for _ in range(2)
    )
    assert a.header.nonce != b.header.nonce and a.data != b.data


@pytest.mark.parametrize("level", [None, 3], ids=["raw", "zstd"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_round_trip_every_combination(level: int | None, encrypted: bool) -> None:
    """Compression and encryption on/off in all four combinations decode to the same JSON, with matching flags."""
    kr = _keyring() if encrypted else None
    data = _encode(level=level, keyring=kr)
    header, doc = _codec.decode(data, keyring=kr)
    assert doc == DOC
    assert header.compressed == (level is not None) and header.encrypted == encrypted and not header.passphrase
    assert header.flags == (1 if level is not None else 0) | (2 if encrypted else 0)
    if not encrypted:
        assert header.key_id == "0" * 16 and header.nonce == bytes(12)
    assert _codec.inspect(data) == header  # no key needed for the header checks


def test_plain_json_readable_as_text() -> None:
    """With compression and encryption off the whole file is ASCII text holding the JSON as is."""
    data = _encode(level=None, keyring=None)
    text = data.decode("utf-8")
    assert text[HEADER_SIZE:-TRAILER_SIZE] == DOC.decode()
    assert '"hello":"world"' in text


def test_wrong_key_names_both_key_ids() -> None:
    """A different key: the checksum holds, GCM fails, WrongKeyError names the file's and our key id."""
    k1, k2 = generate_key(), generate_key()
    data = _encode(keyring=_keyring(k1))
    with pytest.raises(WrongKeyError) as info:
        _codec.decode(data, keyring=_keyring(k2), path="state/positions.json")
    e = info.value
    assert (e.file_key_id, e.our_key_id) == (_crypto.key_id(k1), _crypto.key_id(k2))
    assert e.file_key_id in str(e) and e.our_key_id in str(e) and "state/positions.json" in str(e)
    assert k1.hex() not in str(e) and k2.hex() not in str(e)


def test_missing_key_for_encrypted_file() -> None:
    """An encrypted file read without a key raises MissingKeyError naming its key id."""
    kr = _keyring()
    data = _encode(keyring=kr)
    with pytest.raises(MissingKeyError, match=kr.key_id):
        _codec.decode(data, keyring=None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("g", 8, id="generation"),
        pytest.param("c", 3, id="count"),
        pytest.param("t", 5, id="time"),
        pytest.param("f", _format.FLAG_ENCRYPTED, id="flag-compressed-off"),
    ],
)
def test_tampered_header_with_fixed_checksum_is_wrong_key(name: str, value: int) -> None:
    """A header edited and re-checksummed fails GCM (the header is AAD): WrongKeyError saying 'altered'."""
    kr = _keyring()
    data = _set_field(_encode(keyring=kr), name, value)
    with pytest.raises(WrongKeyError, match="altered") as info:
        _codec.decode(data, keyring=kr)
    assert info.value.file_key_id == info.value.our_key_id == kr.key_id


def test_tampered_key_id_is_wrong_key() -> None:
    """Changing the key id field (re-checksummed) is detected as a wrong key, not accepted."""
    kr = _keyring()
    data = _set_field(_encode(keyring=kr), "k", 0x1234)
    with pytest.raises(WrongKeyError):
        _codec.decode(data, keyring=kr)


def test_encrypted_flag_cleared_is_detected() -> None:
    """Clearing the encrypted flag (re-checksummed) never yields a document: the ciphertext is not zstd."""
    kr = _keyring()
    data = _set_field(_encode(keyring=kr), "f", _format.FLAG_COMPRESSED)
    with pytest.raises(CorruptStateError):
        _codec.decode(data, keyring=kr)


def test_tampered_ciphertext_with_fixed_checksum_is_wrong_key() -> None:
    """A payload byte changed and re-checksummed: GCM refuses it."""
    kr = _keyring()
    data = bytearray(_encode(keyring=kr))
    data[HEADER_SIZE + 3] ^= 0x40
    with pytest.raises(WrongKeyError, match="altered"):
        _codec.decode(_reseal(bytes(data)), keyring=kr)


def _small_file(keyring: _crypto.Keyring | None, level: int | None) -> bytes:
    doc = orjson.dumps({"blob": base64.b64encode(os.urandom(2400)).decode()})  # incompressible: a few KiB on disk
    return _encode(level=level, keyring=keyring, document=doc)


@pytest.mark.parametrize(("encrypted", "level"), [pytest.param(True, 3, id="aes+zstd"), pytest.param(False, None, id="plain")])
def test_every_single_bit_flip_is_detected(encrypted: bool, level: int | None) -> None:
    """Flipping any one bit anywhere in a few-KiB file raises CorruptStateError (damage, not a key problem)."""
    kr = _keyring() if encrypted else None
    data = _small_file(kr, level)
    assert 2000 < len(data) < 5000
    buf = bytearray(data)
    kinds: set[str] = set()
    for i in range(len(buf)):
        orig = buf[i]
        for bit in range(8):
            buf[i] = orig ^ (1 << bit)
            try:
                _codec.decode(bytes(buf), keyring=kr)
            except CorruptStateError as exc:
                kinds.add(exc.kind)
            else:
                pytest.fail(f"bit {bit} of byte {i} flipped went undetected")
        buf[i] = orig
    assert kinds <= {"damaged", "truncated", "not-a-state-file"}


def test_every_truncation_is_detected() -> None:
    """Every proper prefix of a file (0 .. n-1 bytes) raises CorruptStateError of kind 'truncated'."""
    kr = _keyring()
    data = _small_file(kr, 3)
    for n in range(len(data)):
        with pytest.raises(CorruptStateError) as info:
            _codec.decode(data[:n], keyring=kr)
        assert info.value.kind == "truncated", n


@pytest.mark.parametrize(
    "extra", [b"\n", b"garbage", b"\x00" * 4096, b"trailer-copy"], ids=["newline", "text", "zeros", "trailer"]
)
def test_appended_bytes_are_detected(extra: bytes) -> None:
    """Bytes after the trailer (including a second copy of the trailer) are damage."""
    kr = _keyring()
    data = _encode(keyring=kr)
    if extra == b"trailer-copy":
        extra = data[-TRAILER_SIZE:]
    with pytest.raises(CorruptStateError, match="unexpected bytes") as info:
        _codec.decode(data + extra, keyring=kr)
    assert info.value.kind == "damaged"


def test_newer_format_version_is_unsupported() -> None:
    """A valid file claiming container format 02 raises UnsupportedVersionError (found=2)."""
    data = _encode(level=None)
    newer = _reseal(data, header=b"PSTATE02" + data[8:HEADER_SIZE])
    with pytest.raises(UnsupportedVersionError) as info:
        _codec.decode(newer, keyring=None)
    assert (info.value.what, info.value.found, info.value.supported) == ("container format", 2, 1)
    assert "upgrade posstate" in str(info.value)


def test_newer_schema_version_is_unsupported() -> None:
    """A valid file whose header says schema version 3 raises UnsupportedVersionError before decrypting (2 is
    this release's, issue 15.7)."""
    kr = _keyring()
    data = _set_field(_encode(keyring=kr), "v", 3)
    with pytest.raises(UnsupportedVersionError) as info:
        _codec.decode(data, keyring=None)
    assert (info.value.what, info.value.found) == ("schema", 3)


def test_unknown_flag_is_unsupported() -> None:
    """A flag bit this version does not know raises UnsupportedVersionError."""
    data = _set_field(_encode(level=None), "f", 0x08)
    with pytest.raises(UnsupportedVersionError, match="container flags"):
        _codec.decode(data, keyring=None)


def test_flipped_version_byte_reads_as_damage() -> None:
    """Without a valid checksum, a changed version byte is damage, not a newer file."""
    data = bytearray(_encode(level=None))
    data[7] = ord("2")
    with pytest.raises(CorruptStateError):
        _codec.decode(bytes(data), keyring=None)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b"PST", "truncated", id="magic-prefix"),
        pytest.param(b'{"positions": {}}', "not-a-state-file", id="json"),
        pytest.param(b"hello world" * 30, "not-a-state-file", id="text"),
    ],
)
def test_not_a_container(data: bytes, kind: str) -> None:
    """Empty files, JSON and random text are named as such."""
    with pytest.raises(CorruptStateError) as info:
        _codec.decode(data, keyring=None, path=Path("x.json"))
    assert info.value.kind == kind and str(info.value).startswith("x.json: ")


def test_zstd_bomb_with_declared_size_is_refused() -> None:
    """A frame declaring more than max_document_bytes is refused before it is inflated."""
    data = _encode(level=3, document=b" " * 2_000_000)
    assert len(data) < 10_000
    with pytest.raises(CorruptStateError, match="cap"):
        _codec.decode(data, keyring=None, max_document_bytes=1_000_000)
    assert len(_codec.decode(data, keyring=None, max_document_bytes=2_000_000)[1]) == 2_000_000


def test_zstd_bomb_without_declared_size_is_refused() -> None:
    """A streamed frame with no content size is inflated only up to the cap, then refused."""
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    payload = cobj.compress(b"\x00" * 3_000_000) + cobj.flush()
    assert zstandard.frame_content_size(payload) == -1
    data = _container(payload, flags=_format.FLAG_COMPRESSED)
    with pytest.raises(CorruptStateError, match="cap"):
        _codec.decode(data, keyring=None, max_document_bytes=1_000_000)
    assert len(_codec.decode(data, keyring=None, max_document_bytes=3_000_000)[1]) == 3_000_000


def test_uncompressed_document_over_cap_is_refused() -> None:
    """The cap also applies to an uncompressed payload."""
    data = _encode(level=None, document=b"1" * 5000)
    with pytest.raises(CorruptStateError, match="cap"):
        _codec.decode(data, keyring=None, max_document_bytes=4000)


def test_payload_not_zstd_is_damage() -> None:
    """A compressed flag over bytes that are not a zstd frame raises CorruptStateError."""
    data = _container(b"definitely not zstd", flags=_format.FLAG_COMPRESSED)
    with pytest.raises(CorruptStateError, match="zstd"):
        _codec.decode(data, keyring=None)


def test_passphrase_files() -> None:
    """A passphrase file decodes with the same passphrase (new Keyring), not with another or a raw key."""
    kr = _crypto.Keyring(passphrase="pw-one", log2_n=10)
    data = _encode(keyring=kr)
    header, doc = _codec.decode(data, keyring=_crypto.Keyring(passphrase="pw-one", log2_n=10))
    assert doc == DOC and header.passphrase and header.kdf_log2_n == 10
    with pytest.raises(WrongKeyError):
        _codec.decode(data, keyring=_crypto.Keyring(passphrase="pw-two", log2_n=10))
    with pytest.raises(WrongKeyError):
        _codec.decode(data, keyring=_keyring())


FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def test_format_md_offsets_match_a_real_file() -> None:
    """The header table in docs/FORMAT.md gives each field's real offset and width in a file the codec wrote."""
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ?(\w*) ?\|", FORMAT_MD.read_text(encoding="utf-8"), flags=re.M)
    table = {name or "newline": (int(off), int(width)) for off, width, name in rows}
    assert table["magic"] == (0, 6) and table["version"] == (6, 2) and table["newline"] == (HEADER_SIZE - 1, 1)
    assert {k: v for k, v in table.items() if k in OFFSETS} == OFFSETS
    kr = _crypto.Keyring(passphrase="pw", log2_n=10)
    enc = _codec.encode(
        DOC, generation=0x1234, written_at_ms=1_700_000_000_000, position_count=9, compression_level=3, keyring=kr
    )
    data, h = enc.data, enc.header

    def at(name: str) -> bytes:
        off, width = table[name]
        return data[off : off + width]

    assert at("magic") == b"PSTATE" and at("version") == b"01" and at("newline") == b"\n"
    assert int(at("f"), 16) == h.flags == 7
    assert at("k").decode() == h.key_id
    assert bytes.fromhex(at("n").decode()) == h.nonce and bytes.fromhex(at("s").decode()) == h.salt
    assert int(at("w"), 16) == 10 and int(at("v"), 16) == 1
    assert int(at("g"), 16) == 0x1234 and int(at("t"), 16) == 1_700_000_000_000 and int(at("c"), 16) == 9
    assert int(at("l"), 16) == len(data) - HEADER_SIZE - TRAILER_SIZE
    # Payload = AES-GCM(zstd(document)) with the header line as AAD, exactly as documented.
    key = _crypto.derive_key("pw", h.salt, 10)
    plain = _crypto.open_sealed(key, h.nonce, data[HEADER_SIZE:-TRAILER_SIZE], data[:HEADER_SIZE])
    assert plain is not None and zstandard.ZstdDecompressor().decompress(plain) == DOC
    assert _crypto.key_id(key) == h.key_id


def test_format_md_flag_values() -> None:
    """The flag table in docs/FORMAT.md matches the constants."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    for value, name in (
        (_format.FLAG_COMPRESSED, "compressed"),
        (_format.FLAG_ENCRYPTED, "encrypted"),
        (_format.FLAG_PASSPHRASE, "passphrase"),
    ):
        assert f"| `{value:#04x}` | {name} |" in text
