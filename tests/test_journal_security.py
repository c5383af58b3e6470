"""Issue 12, points 1, 3, 4 and 13: the journal and header crypto against an attacker who can write files in
the state directory (but has no key), a copied or reverted directory, and crafted frames."""

from __future__ import annotations

import hashlib
import shutil
import zlib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from posstate import ConfigError, CorruptStateError, PositionStateManager, StateConfig, WrongKeyError
from posstate.journal import audit as _audit
from posstate.journal import format as jf
from posstate.journal import journal as _journal
from posstate.journal import records as _records
from posstate.journal.current import read_current
from posstate.model import ops as jops
from posstate.model.position import Position
from posstate.selftest.harness import copy_tree
from posstate.storage import crypto as _crypto
from posstate.storage import statefile as _statefile
from posstate.storage.container import OFFSETS, trailer_for
from posstate.storage.crypto import Keyring
from tests.killed import as_if_killed

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def pos(symbol: str, contracts: str = "1") -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def make(d: Path, key: bytes = KEY, **kw: Any) -> PositionStateManager:
    return PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, **kw), key=key)


def held(m: PositionStateManager) -> dict[str, str]:
    return {k[0]: str(p.contracts) for k, p in m.get_positions().items()}


def files(d: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def snapshot_journal(d: Path, key: bytes = KEY) -> tuple[int, dict[str, Any]]:
    loaded = _statefile.read(d / "positions.json", options=_statefile.ReadOptions(keyring=Keyring(key=key)))
    assert loaded.state.journal is not None
    return loaded.state.generation, loaded.state.journal


def forge_journal(d: Path, symbols: list[str], *, key: bytes | None = None, zero_pad: int = 0) -> bytes:
    """A journal carrying the real journal id and sequence number of the authentic snapshot, holding
    forged set_position records: plaintext (key None) or sealed under another *key*."""
    generation, snap = snapshot_journal(d)
    kid = _crypto.key_id(key) if key is not None else None
    header = jf.new_header(
        base_generation=generation, base_seq=snap["seq"], created_ms=0, key_id=kid, journal_id=bytes.fromhex(snap["id"])
    )
    sealer = jf.Sealer(header, key)
    frames = b"".join(
        sealer.frame(
            seq=snap["seq"] + i + 1,
            generation=generation,
            time_ms=0,
            kind=jf.KIND_OP,
            payload=orjson.dumps([jops.set_position(pos(sym, "666"), rev=generation + 10 + i).json]),
        )
        for i, sym in enumerate(symbols)
    )
    data = header.raw + frames + bytes(zero_pad)
    (d / "positions.json.journal").write_bytes(data)
    return data


def authentic(d: Path) -> None:
    """An encrypted state whose snapshot names a journal (one change after a save)."""
    with make(d) as m:
        m.set_position(pos("A"))
        m.save()
        m.set_position(pos("B"))


# ------------------------------------------------------------------------------------------ 12.1 downgrade
def test_plain_journal_with_the_real_id_is_refused_not_replayed(tmp_path: Path) -> None:
    """issue 12.1: with encryption on, a plaintext journal carrying the snapshot's real journal id is
    WrongKeyError on load (as a plaintext state file is): its forged records are never applied or saved."""
    authentic(tmp_path)
    forge_journal(tmp_path, ["FORGED"])
    before = files(tmp_path)
    with make(tmp_path) as m, pytest.raises(WrongKeyError, match="not encrypted") as info:
        m.load_positions()
    assert info.value.path == tmp_path / "positions.json.journal"
    assert files(tmp_path) == before  # nothing saved, moved or cut
    with make(tmp_path) as m, pytest.raises(WrongKeyError):
        m.save()  # no way around it: a save loads first
    assert b"FORGED" not in (tmp_path / "positions.json").read_bytes()


def test_plain_journal_is_refused_by_read_current_and_recovery_replay(tmp_path: Path) -> None:
    """issue 12.1: the read-only paths refuse it too: read_current (show, export, diff) reports WrongKeyError,
    and recovery's replay_prefix applies nothing from a plaintext journal when encryption is on."""
    authentic(tmp_path)
    forge_journal(tmp_path, ["FORGED"])
    cfg = StateConfig.in_dir(tmp_path)
    options = _statefile.ReadOptions(keyring=Keyring(key=KEY), require_encryption=True)
    cur = read_current(cfg, options)
    assert isinstance(cur.error, WrongKeyError) and "FORGED" not in {k[0] for k in cur.state.positions}
    state = _statefile.read(cfg.state_path, options=options).state
    applied, _, why = _records.replay_prefix(cfg.journal_path, keyring=Keyring(key=KEY), state=state, require_encryption=True)
    assert applied == 0 and "not encrypted" in why
    assert "FORGED" not in {k[0] for k in state.positions}
    report = _audit.check(cfg.journal_path, keyring=Keyring(key=KEY), require_encryption=True)
    assert not report.valid and "not encrypted" in report.problem


def test_journal_under_another_key_with_the_real_id_is_refused(tmp_path: Path) -> None:
    """issue 12.1: an encrypted journal whose key id is not the manager's is WrongKeyError, never replayed."""
    authentic(tmp_path)
    forge_journal(tmp_path, ["FORGED"], key=OTHER)
    with make(tmp_path) as m, pytest.raises(WrongKeyError, match="key id"):
        m.load_positions()


def test_no_plaintext_record_is_ever_appended_under_encryption(tmp_path: Path) -> None:
    """issue 12.1: a plaintext journal header with the real id and no records (so nothing to replay) is still
    refused: the manager never appends a plaintext record to it."""
    authentic(tmp_path)
    forge_journal(tmp_path, [], zero_pad=4096)
    with make(tmp_path) as m, pytest.raises(WrongKeyError):
        m.set_position(pos("SECRET"))
    assert b"SECRET" not in (tmp_path / "positions.json.journal").read_bytes()
    assert b"SECRET" not in (tmp_path / "positions.json").read_bytes()


def test_journal_refuses_to_seal_a_plain_header_with_a_write_key(tmp_path: Path) -> None:
    """issue 12.1: the open-for-append path itself refuses a plaintext journal while encryption is on."""
    j = _journal.Journal(
        tmp_path / "positions.json.journal",
        mode="sync",
        quarantine_dir=tmp_path / "q",
        read_keyring=Keyring(key=KEY),
        write_keyring=Keyring(key=KEY),
        max_bytes=1 << 20,
        max_records=100,
    )
    plain = jf.new_header(base_generation=1, base_seq=0, created_ms=0, key_id=None)
    with pytest.raises(WrongKeyError, match="not encrypted"):
        j._write_key(plain)


# ------------------------------------------------------------------------------------------ 12.3 nonces
@pytest.fixture
def sealed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bytes, bytes]]]:
    """Every (AES key, nonce) pair passed to AES-GCM encryption: journal records and state files alike."""
    used: list[tuple[bytes, bytes]] = []
    real_aead, real_seal = jf.AESGCM, _crypto.seal

    class Recording:
        def __init__(self, key: bytes) -> None:
            self.inner, self.key = real_aead(key), key

        def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
            used.append((self.key, bytes(nonce)))
            return self.inner.encrypt(nonce, data, aad)

        def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
            return self.inner.decrypt(nonce, data, aad)

    def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        used.append((key, bytes(nonce)))
        return real_seal(key, nonce, plaintext, aad)

    monkeypatch.setattr(jf, "AESGCM", Recording)
    monkeypatch.setattr(_crypto, "seal", seal)
    yield used


def _write(d: Path, tag: str, n: int = 3, key: bytes = KEY) -> None:
    with make(d, key=key) as m:
        for i in range(n):
            m.set_position(pos(tag, str(i + 1)))


def _no_repeats(used: list[tuple[bytes, bytes]]) -> None:
    repeated = {p for p in used if used.count(p) > 1}
    assert not repeated, f"{len(repeated)} (key, nonce) pairs used twice"


def test_copied_directory_both_copies_writing_never_repeat_a_nonce(tmp_path: Path, sealed: list[tuple[bytes, bytes]]) -> None:
    """issue 12.3: a state directory copied to a second machine, both copies go on writing the same journal."""
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "X")
    copy_tree(a, b)
    _write(a, "A")
    _write(b, "B")
    assert (
        jf.parse_header((a / "positions.json.journal").read_bytes()).journal_id
        == jf.parse_header((b / "positions.json.journal").read_bytes()).journal_id
    )  # the same journal, continued by both: only the nonces keep them apart
    assert len(sealed) >= 9
    _no_repeats(sealed)


def test_reverted_vm_mid_session_never_repeats_a_nonce(tmp_path: Path, sealed: list[tuple[bytes, bytes]]) -> None:
    """issue 12.3: a VM reverted in the middle of a session (the directory as it was, the process re-run)
    writes the same sequence numbers again, under new nonces."""
    a, saved = tmp_path / "a", tmp_path / "saved"
    with make(a) as m:
        m.set_position(pos("X", "1"))
        m.set_position(pos("X", "2"))
        copy_tree(a, saved, ignore=shutil.ignore_patterns("*.lock"))  # the VM's disk at this instant
        m.set_position(pos("X", "3"))
        m.set_position(pos("X", "4"))
    shutil.rmtree(a)
    copy_tree(saved, a)
    _write(a, "Y", 2)
    _no_repeats(sealed)


def test_journal_cut_at_a_record_boundary_and_continued_never_repeats_a_nonce(
    tmp_path: Path, sealed: list[tuple[bytes, bytes]]
) -> None:
    """issue 12.3: a journal cut exactly at a record boundary loads as a shorter journal; the records written
    after it reuse the cut records' sequence numbers, never their nonces."""
    _write(tmp_path, "A", 4)
    path = tmp_path / "positions.json.journal"
    data = path.read_bytes()
    records = jf.scan(data, jf.parse_header(data)).records
    path.write_bytes(data[: records[1].end] + bytes(len(data) - records[1].end))
    _write(tmp_path, "B", 3)
    data = path.read_bytes()
    seqs = [r.seq for r in jf.scan(data, jf.parse_header(data)).records]
    assert seqs[2] == records[2].seq  # the same sequence number was written again
    _no_repeats(sealed)


def test_old_backup_restored_and_continued_never_repeats_a_nonce(tmp_path: Path, sealed: list[tuple[bytes, bytes]]) -> None:
    """issue 12.3: an old copy of the directory (a file-level backup) restored, then writing goes on; and
    posstate's own backup restore, then writing goes on."""
    d, old = tmp_path / "s", tmp_path / "old"
    _write(d, "A")
    copy_tree(d, old)
    _write(d, "B")
    shutil.rmtree(d)
    copy_tree(old, d)
    _write(d, "C")
    with make(d) as m:
        m.create_backup()
        m.set_position(pos("D"))
        m.restore_from_backup("latest", accept_older=True)
        m.set_position(pos("E"))
    _no_repeats(sealed)


def test_rekey_and_the_snapshot_codec_use_fresh_nonces(tmp_path: Path, sealed: list[tuple[bytes, bytes]]) -> None:
    """issue 12.3: state files get a random nonce per write (the same document saved twice too), and after
    a rekey the new key's files and journal use fresh nonces."""
    from click.testing import CliRunner

    from posstate.cli.main import cli

    _write(tmp_path, "A")
    with make(tmp_path) as m:
        m.create_backup()
        m.save()
        m.save()
    new_key_file = tmp_path.parent / f"{tmp_path.name}-new.key"
    new_key_file.write_text(_crypto.encode_key_text(OTHER))
    old_key_file = tmp_path.parent / f"{tmp_path.name}-old.key"
    old_key_file.write_text(_crypto.encode_key_text(KEY))
    result = CliRunner().invoke(
        cli,
        ["rekey", "--state-dir", str(tmp_path), "--key-file", str(old_key_file), "--new-key-file", str(new_key_file), "--yes"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    _write(tmp_path, "B", key=OTHER)
    with make(tmp_path, key=OTHER) as m:
        m.save()
    keys = {k for k, _ in sealed}
    assert KEY in keys and OTHER in keys
    _no_repeats(sealed)


def test_encrypted_version_2_journal_is_replayed_then_never_appended_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12.3: an encrypted journal of version 1 or 2 (nonce = header prefix + sequence number) is
    replayed, and the next change starts a version-3 journal instead of adding to it."""
    import functools

    monkeypatch.setattr(jf, "new_header", functools.partial(jf.new_header, version=2))
    _write(tmp_path, "A", 2)
    monkeypatch.undo()
    path = tmp_path / "positions.json.journal"
    old = path.read_bytes()
    assert jf.parse_header(old).version == 2
    with make(tmp_path) as m:
        assert held(m) == {"A": "2"}
        m.set_position(pos("B"))
    data = path.read_bytes()
    assert jf.parse_header(data).version == jf.PLAIN_VERSION == 3
    assert jf.parse_header(data).journal_id != jf.parse_header(old).journal_id
    with make(tmp_path) as m:
        assert held(m) == {"A": "2", "B": "1"}


def test_version_3_records_carry_their_own_nonce(tmp_path: Path) -> None:
    """issue 12.3: the byte layout of an encrypted version-3 record: 25 fixed bytes, a 12-byte nonce, the
    ciphertext and its tag; the nonce is not derived from anything in the file; the associated data is the
    header, the previous record's tag (16 zero bytes for the first) and the 25 fixed bytes (review: chained)."""
    _write(tmp_path, "A", 2)
    data = (tmp_path / "positions.json.journal").read_bytes()
    header = jf.parse_header(data)
    assert header.version == 3 and header.raw[12:16] == bytes(4)
    recs = jf.scan(data, header).records
    nonces = [r.payload[:12] for r in recs]
    assert len(set(nonces)) == 2
    subkey = jf.subkey(KEY, header.journal_id)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    plain = AESGCM(subkey).decrypt(recs[0].payload[:12], recs[0].payload[12:], header.raw + bytes(16) + recs[0].fixed)
    assert orjson.loads(plain)[0]["op"] == "set_position"
    prev_tag = recs[0].payload[-16:]
    plain = AESGCM(subkey).decrypt(recs[1].payload[:12], recs[1].payload[12:], header.raw + prev_tag + recs[1].fixed)
    assert orjson.loads(plain)[0]["op"] == "set_position"


# ------------------------------------------------------------------------------------------ 12.4 KDF cost
def _state_with_cost(path: Path, cost: int) -> None:
    """Set the state file's scrypt cost field (w) and fix the keyless trailer, as an attacker can."""
    data = bytearray(path.read_bytes())
    start, width = OFFSETS["w"]
    data[start : start + width] = b"%0*x" % (width, cost)
    body = bytes(data[: -len(trailer_for(b""))])
    path.write_bytes(body + trailer_for(body))


def _journal_with_cost(path: Path, cost: int) -> None:
    data = bytearray(path.read_bytes())
    data[10] = cost
    data[88:96] = hashlib.sha256(bytes(data[:88])).digest()[:8]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("cost", [0, 9, 18, 64, 255])
def test_crafted_scrypt_cost_in_the_state_file_is_corrupt_state(
    tmp_path: Path, cost: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 12.4: a state file header naming a scrypt cost outside 10..17 is CorruptStateError before any
    KDF runs (never ValueError/OverflowError or a multi-GiB allocation)."""
    cfg = StateConfig.in_dir(tmp_path, durability="snapshot", backup_interval=1e9)
    with PositionStateManager(cfg, passphrase="pw") as m:
        m.set_position(pos("A"))
        m.save()
    _state_with_cost(cfg.state_path, cost)
    calls: list[int] = []
    real = _crypto.derive_key
    monkeypatch.setattr(_crypto, "derive_key", lambda p, s, n=15: calls.append(n) or real(p, s, n))
    with pytest.raises(CorruptStateError, match="scrypt cost"):
        _statefile.read(cfg.state_path, options=_statefile.ReadOptions(keyring=Keyring(passphrase="pw")))
    assert calls == []


def test_scrypt_cost_without_the_passphrase_flag_is_corrupt_state(tmp_path: Path) -> None:
    """issue 12.4: a raw-key (or plain) file whose header names a scrypt cost is malformed: the field is 0."""
    cfg = StateConfig.in_dir(tmp_path, durability="snapshot", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.set_position(pos("A"))
        m.save()
    _state_with_cost(cfg.state_path, 200)
    with pytest.raises(CorruptStateError, match="scrypt cost"):
        _statefile.read(cfg.state_path, options=_statefile.ReadOptions(keyring=Keyring(key=KEY)))


@pytest.mark.parametrize("cost", [0, 9, 18, 255])
def test_crafted_scrypt_cost_in_the_journal_header_is_corrupt_state(tmp_path: Path, cost: int) -> None:
    """issue 12.4: the journal header's scrypt cost is bounded the same way: CorruptStateError(kind="journal")."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9)
    with PositionStateManager(cfg, passphrase="pw") as m:
        m.set_position(pos("A"))
    _journal_with_cost(cfg.journal_path, cost)
    with pytest.raises(CorruptStateError, match="scrypt cost") as info:
        _records.read_records(cfg.journal_path.read_bytes(), path=cfg.journal_path, keyring=Keyring(passphrase="pw"))
    assert info.value.kind == "journal"
    report = _audit.check(cfg.journal_path, keyring=Keyring(passphrase="pw"))
    assert not report.valid and "scrypt cost" in report.problem


def test_keyring_refuses_a_cost_no_file_may_name() -> None:
    """issue 12.4: the range is a format rule: a Keyring cannot be made to write a cost readers refuse."""
    with pytest.raises(ConfigError):
        Keyring(passphrase="pw", log2_n=30)
    with pytest.raises(ConfigError):
        Keyring(passphrase="pw", log2_n=9)
    assert Keyring(passphrase="pw", log2_n=_crypto.DEFAULT_SCRYPT_LOG2_N).log2_n == 15


# ------------------------------------------------------------------------------------------ 12.13 frames
def _crafted(data: bytes, at: int, length: int) -> bytes:
    """*data* with a frame head at byte *at* holding *length* and the valid CRC of that length field."""
    field = length.to_bytes(4, "big")
    return data[:at] + field + zlib.crc32(field).to_bytes(4, "big") + data[at + 8 :]


def _frame_cases(data: bytes) -> list[tuple[str, bytes]]:
    """The last record's frame head replaced by a crafted one (nothing valid follows it)."""
    header = jf.parse_header(data)
    recs = jf.scan(data, header).records
    at = recs[-1].offset
    size = len(data)
    return [
        ("length 0", _crafted(data, at, 0)),
        ("length 1", _crafted(data, at, 1)),
        ("length 24", _crafted(data, at, jf.BODY_FIXED - 1)),
        ("past the end of the file", _crafted(data[: recs[-1].end], at, recs[-1].end - at + 100)),
        ("past the end of the file, over zeros", _crafted(data, at, size - at)),
        ("past the record limit", _crafted(data, at, jf.MAX_BODY + 1)),
        ("length 0 before non-zero bytes", data[:at] + bytes(8) + b"\x01" + bytes(size - at - 9)),
    ]


CASES = [
    "length 0",
    "length 1",
    "length 24",
    "past the record limit",
    "past the end of the file",
    "past the end of the file, over zeros",
]


@pytest.mark.parametrize("case", CASES)
def test_crafted_frame_is_damage_not_a_torn_tail(tmp_path: Path, case: str) -> None:
    """issue 12.13: a frame whose length passes its CRC but is 0, 1, past the end of the file or past the
    record limit is damage (scan), not a torn last record to cut quietly."""
    _write(tmp_path, "A", 3)
    data = (tmp_path / "positions.json.journal").read_bytes()
    crafted = dict(_frame_cases(data))[case]
    sc = jf.scan(crafted, jf.parse_header(crafted))
    assert sc.bad_offset is not None and not sc.bad_is_tail
    assert len(sc.records) == 2


@pytest.mark.parametrize("case", CASES)
def test_crafted_frame_is_reported_by_the_load(tmp_path: Path, case: str) -> None:
    """issue 12.13: the load reports it (recovery: last_recovery names the journal damage, the journal is kept
    in quarantine) and keeps the records before it; it never reads as "no changes since the snapshot"."""
    _write(tmp_path, "A", 3)
    as_if_killed(StateConfig.in_dir(tmp_path))  # the close backup (issue 15.2) would hold all three records
    path = tmp_path / "positions.json.journal"
    path.write_bytes(dict(_frame_cases(path.read_bytes()))[case])
    with make(tmp_path) as m:
        assert held(m) == {"A": "2"}
        report = m.last_recovery
        assert report is not None and "frame length" in report.reason and "journal moved to" in report.journal
    assert any(p.name.startswith("positions.json.journal") for p in (tmp_path / "quarantine").iterdir())


@pytest.mark.parametrize("case", ["length 0 before non-zero bytes"])
def test_what_a_torn_append_leaves_stays_a_torn_tail(tmp_path: Path, case: str) -> None:
    """issue 12.13 (the limit): zeros after the records still end them; a head of zeros before non-zero bytes
    (the record's first sector never reached the disk) is what a torn append leaves: a torn last record.
    A valid length running past the end of the file is one only when no whole record hides behind it
    (test_a_genuine_torn_append_stays_a_torn_tail, test_a_changed_frame_length_is_damage_not_a_torn_tail)."""
    _write(tmp_path, "A", 3)
    data = (tmp_path / "positions.json.journal").read_bytes()
    header = jf.parse_header(data)
    assert len(jf.scan(data, header).records) == 3 and jf.scan(data, header).bad_offset is None
    torn = dict(_frame_cases(data))[case]
    sc = jf.scan(torn, header)
    assert sc.bad_offset is not None and sc.bad_is_tail and len(sc.records) == 2


def _raised(data: bytes, rec: jf.RawRecord, length: int, *, checksum: bool = False) -> bytes:
    """*data* with the frame of *rec* naming *length* (with its valid length CRC); with *checksum* its record
    checksum rewritten too (an attacker without the key can do both: they are keyless)."""
    out = _crafted(data, rec.offset, length)
    return out[: rec.offset + 8] + (b"\xa5" * 4 if checksum else out[rec.offset + 8 : rec.offset + 12]) + out[rec.offset + 12 :]


def _broken_checksum(data: bytes, rec: jf.RawRecord) -> bytes:
    return data[: rec.offset + 8] + bytes(4) + data[rec.offset + 12 :]


def _changed_lengths(data: bytes) -> dict[str, tuple[bytes, int, bool]]:
    """name -> (journal, records before the changed frame, seen without the key): a length field changed
    (keyless: its CRC recomputed) so that the record no longer checks and would read as a torn append."""
    first, mid, last = jf.scan(data, jf.parse_header(data)).records
    grown = data[: last.end]  # no zeros written ahead: the file ends with the last record
    beyond = len(data) - mid.offset + 50
    own = last.end - last.offset
    return {
        "last, past the end of the file": (_raised(grown, last, own + 100), 2, True),
        "last, past the zeros": (_raised(data, last, len(data) - last.offset), 2, True),
        "last, raised within the zeros": (_raised(data, last, own + 100), 2, True),
        "last, lowered": (_raised(data, last, own - jf.FRAME_HEAD - 10), 2, True),
        "last, past the end, checksum rewritten": (_raised(grown, last, own + 100, checksum=True), 2, False),
        "middle, swallowing the rest": (_broken_checksum(_raised(data, mid, beyond), last), 1, True),
        "middle, swallowing the rest, checksums rewritten": (
            _broken_checksum(_raised(data, mid, beyond, checksum=True), last),
            1,
            False,
        ),
        "first, swallowing the rest, checksums rewritten": (
            _broken_checksum(_broken_checksum(_raised(data, first, beyond + 200, checksum=True), mid), last),
            0,
            False,
        ),
    }


def _torn_appends(data: bytes) -> dict[str, bytes]:
    """What a power loss during the last append leaves: its frame head, then a strict prefix of its body or
    zeros, in a file the append grew or over the zeros written ahead."""
    header = jf.parse_header(data)
    last = jf.scan(data, header).records[-1]
    body = last.offset + header.frame_head
    half = (body + last.end) // 2
    grown, size = data[: last.end], len(data)
    return {
        "grown: half the body": grown[:half],
        "grown: all but the last byte": grown[:-1],
        "grown: the head, then zeros": grown[:body] + bytes(last.end - body - 1),
        "over the zeros: half the body": data[:half] + bytes(size - half),
        "over the zeros: all but the last 8 bytes": data[: last.end - 8] + bytes(size - last.end + 8),
        "over the zeros: the head, then zeros": data[:body] + bytes(size - body),
    }


CHANGED = [
    "last, past the end of the file",
    "last, past the zeros",
    "last, raised within the zeros",
    "last, lowered",
    "last, past the end, checksum rewritten",
    "middle, swallowing the rest",
    "middle, swallowing the rest, checksums rewritten",
    "first, swallowing the rest, checksums rewritten",
]
TORN = [
    "grown: half the body",
    "grown: all but the last byte",
    "grown: the head, then zeros",
    "over the zeros: half the body",
    "over the zeros: all but the last 8 bytes",
    "over the zeros: the head, then zeros",
]


@pytest.mark.parametrize("case", CHANGED)
def test_a_changed_frame_length_is_damage_not_a_torn_tail(tmp_path: Path, case: str) -> None:
    """issue 12.13: a length field changed without the key (raised past the end of the file or over the
    zeros, lowered, or a middle record's swallowing the records after it) leaves a whole record behind it:
    damage for every keyed reader (scan with the key, read_records, validate's check), and for the keyless
    scan too unless the record's checksum was rewritten as well; never a torn last record cut quietly."""
    _write(tmp_path, "A", 3)
    path = tmp_path / "positions.json.journal"
    changed, before, keyless = _changed_lengths(path.read_bytes())[case]
    header = jf.parse_header(changed)
    sc = jf.scan(changed, header)
    assert (sc.bad_offset is not None and not sc.bad_is_tail) == keyless, sc
    keyed = jf.scan(changed, header, jf.Sealer(header, KEY))
    assert keyed.bad_offset is not None and not keyed.bad_is_tail and len(keyed.records) == before, keyed
    with pytest.raises(CorruptStateError, match="not a torn last record"):
        _records.read_records(changed, path=path, keyring=Keyring(key=KEY))
    path.write_bytes(changed)
    report = _audit.check(path, keyring=Keyring(key=KEY))
    assert not report.valid and report.torn_bytes == 0


@pytest.mark.parametrize("case", CHANGED)
def test_a_changed_frame_length_is_reported_by_the_load(tmp_path: Path, case: str) -> None:
    """issue 12.13: the load keeps the snapshot plus the records before the changed frame, quarantines the
    journal and says so in last_recovery (not a torn tail cut with only a stateRepaired event)."""
    _write(tmp_path, "A", 3)
    as_if_killed(StateConfig.in_dir(tmp_path))
    path = tmp_path / "positions.json.journal"
    changed, before, _ = _changed_lengths(path.read_bytes())[case]
    path.write_bytes(changed)
    with make(tmp_path) as m:
        assert held(m) == ({"A": str(before)} if before else {})
        report = m.last_recovery
        assert report is not None and "not a torn last record" in report.reason and "journal moved to" in report.journal
    assert any(p.name.startswith("positions.json.journal") for p in (tmp_path / "quarantine").iterdir())


@pytest.mark.parametrize("case", TORN)
@pytest.mark.parametrize("key", [KEY, None], ids=["encrypted", "plain"])
def test_a_genuine_torn_append_stays_a_torn_tail(tmp_path: Path, case: str, key: bytes | None) -> None:
    """issue 12.13 (the limit kept): a real record's frame head followed by a strict prefix of its body, or by
    zeros, holds no whole record: a torn last record for the keyless scan and the keyed readers alike, cut
    by the load (the two records before it kept, no last_recovery)."""
    plain = {} if key else {"encryption": False}
    with PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, **plain), key=key) as m:
        for i in range(3):
            m.set_position(pos("A", str(i + 1)))
    as_if_killed(StateConfig.in_dir(tmp_path))
    path = tmp_path / "positions.json.journal"
    torn = _torn_appends(path.read_bytes())[case]
    header = jf.parse_header(torn)
    for sc in (jf.scan(torn, header), jf.scan(torn, header, jf.Sealer(header, key))):
        assert sc.bad_offset is not None and sc.bad_is_tail and len(sc.records) == 2, sc
    path.write_bytes(torn)
    with PositionStateManager(StateConfig.in_dir(tmp_path, backup_interval=1e9, **plain), key=key) as m:
        assert held(m) == {"A": "2"}
        assert m.last_recovery is None


@pytest.mark.parametrize("checksum", [False, True], ids=["checksum kept", "checksum rewritten"])
def test_a_changed_frame_length_without_encryption(tmp_path: Path, checksum: bool) -> None:
    """issue 12.13 (plaintext): a plain record has only its keyless CRC-32. A length changed with the record's
    checksum left as written is damage; one whose checksum was rewritten too cannot be told from a torn
    append (nothing authenticates plaintext: anyone can write any record) and stays a torn last record."""
    with PositionStateManager(StateConfig.in_dir(tmp_path, encryption=False)) as m:
        for i in range(3):
            m.set_position(pos("A", str(i + 1)))
    data = (tmp_path / "positions.json.journal").read_bytes()
    last = jf.scan(data, jf.parse_header(data)).records[-1]
    changed = _raised(data[: last.end], last, last.end - last.offset + 100, checksum=checksum)
    sc = jf.scan(changed, jf.parse_header(changed))
    assert sc.bad_offset is not None and len(sc.records) == 2
    assert sc.bad_is_tail == checksum, sc
