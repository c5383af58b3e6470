"""Issue 12 review (points 1, 3, 4, 13): attacks on the journal and header crypto by someone who can write files
in the state directory but has no key. Each test names the threat it closes (or, xfail, leaves open)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
from test_journal_security import KEY, authentic, held, make, pos, snapshot_journal

from posstate import CorruptStateError, PosStateError
from posstate.journal import format as jf
from posstate.selftest.harness import copy_tree
from posstate.storage import crypto as _crypto

HUGE = 2**60  # above the 2**53 - 1 a snapshot's journal.seq may hold


def _empty_journal(d: Path, *, base_seq: int, base_generation: int | None = None) -> None:
    """An encrypted-looking journal header with no records: the real journal id and the (public) key id,
    so nothing authenticates it, and attacker-chosen numbers."""
    generation, snap = snapshot_journal(d)
    (d / "positions.json.journal").write_bytes(
        _raw_header(bytes.fromhex(snap["id"]), generation if base_generation is None else base_generation, base_seq)
    )


def _raw_header(journal_id: bytes, base_generation: int, base_seq: int) -> bytes:
    """A version-3 encrypted header packed by hand (as an attacker would; the checksum is keyless)."""
    kid = bytes.fromhex(_crypto.key_id(KEY))
    head = jf._HEAD.pack(jf.MAGIC, 3, jf.FLAG_ENCRYPTED, 0, 0, bytes(4), journal_id, kid, bytes(16), base_generation, base_seq, 0)
    return head + hashlib.sha256(head).digest()[:8]


@pytest.mark.parametrize("base_seq", [HUGE, 2**64 - 1])
def test_forged_empty_journal_header_cannot_make_the_next_snapshot_invalid(tmp_path: Path, base_seq: int) -> None:
    """review 12.1/12.13: a keyless, record-less journal header with a crafted base_seq is never adopted: else
    the bot appends under it, its next snapshot names a sequence number no snapshot may hold (or packing it
    overflows), and the following load rolls back to an older copy, losing acknowledged changes."""
    authentic(tmp_path)
    _empty_journal(tmp_path, base_seq=base_seq)
    with make(tmp_path) as m:
        m.load_positions()
        m.set_position(pos("C"))
        m.save()
        m.set_position(pos("D"))
    with make(tmp_path) as m:
        m.load_positions()
        assert {"C", "D"} <= set(held(m))
        assert m.last_recovery is None


def test_journal_header_numbers_are_bounded_by_the_format() -> None:
    """review 12.4: base_seq and base_generation in the unauthenticated header are format-bounded (damage)."""
    for seq, gen in ((HUGE, 1), (1, HUGE)):
        with pytest.raises(jf.JournalProblem, match="out of range"):
            jf.parse_header(_raw_header(bytes(16), gen, seq))


def test_forged_empty_journal_header_is_reported(tmp_path: Path) -> None:
    """review 12.13: such a header is damage a load reports (journal set aside), never silently continued."""
    authentic(tmp_path)
    _empty_journal(tmp_path, base_seq=HUGE)
    with make(tmp_path) as m:
        try:
            m.load_positions()
        except PosStateError as exc:  # a typed error is acceptable too
            assert isinstance(exc, CorruptStateError)
            return
        assert m.last_recovery is not None


def test_planted_journal_temp_cannot_push_the_sequence_past_what_a_snapshot_holds(tmp_path: Path) -> None:
    """review 12.3: a keyless file named like a journal-creation temp, holding a huge sequence number, must not
    move the bot's sequence past what a snapshot may hold (its next snapshot would be invalid and the load
    after it would roll back to an older backup, losing every acknowledged change since)."""
    authentic(tmp_path)
    header = jf.new_header(base_generation=1, base_seq=0, created_ms=0, key_id=None)
    (tmp_path / ".positions.json.journal.0123456789abcdef.tmp").write_bytes(
        header.raw + bytes(12) + HUGE.to_bytes(8, "big") + bytes(30)
    )
    with make(tmp_path) as m:
        m.load_positions()
        m.set_position(pos("C"))
        m.save()
        m.set_position(pos("D"))
    with make(tmp_path) as m:
        m.load_positions()
        assert {"A", "B", "C", "D"} <= set(held(m))
        assert m.last_recovery is None


def test_huge_sparse_journal_is_a_typed_error_not_memory_error(tmp_path: Path) -> None:
    """review (issue 12.15 for the journal): a 1 TiB sparse journal is a PosStateError, never MemoryError."""
    authentic(tmp_path)
    with open(tmp_path / "positions.json.journal", "r+b") as f:
        f.truncate(2**40)
    with make(tmp_path) as m, contextlib.suppress(PosStateError):
        m.load_positions()


def test_records_of_two_copies_of_one_journal_do_not_splice(tmp_path: Path) -> None:
    """review 12.3 (copied directory): after a copy, both copies append under one journal header; a keyless
    attacker must not build a history neither copy wrote by taking record 2 from one and record 3 from the other."""
    a, b = tmp_path / "a", tmp_path / "b"
    authentic(a)  # the journal exists (one record) before the copy
    copy_tree(a, b)
    for d, tag in ((a, "X"), (b, "Y")):
        with make(d) as m:
            m.load_positions()
            m.set_position(pos(tag, "2"))
            m.set_position(pos(tag, "3"))
    ja, jb = (a / "positions.json.journal").read_bytes(), (b / "positions.json.journal").read_bytes()
    ra = jf.scan(ja, jf.parse_header(ja)).records
    rb = jf.scan(jb, jf.parse_header(jb)).records
    assert ja[: jf.HEADER_SIZE] == jb[: jf.HEADER_SIZE] and len(ra) == len(rb) == 3
    spliced = ja[: ra[1].end] + jb[rb[2].offset : rb[2].end]
    (a / "positions.json.journal").write_bytes(spliced)
    with make(a) as m:
        m.load_positions()
        got = held(m)
    assert got.get("X") != "2" or got.get("Y") != "3"  # never the mixed history neither copy wrote


def test_planted_backup_header_with_a_huge_generation_cannot_break_a_restore(tmp_path: Path) -> None:
    """T1 (found with the damage family of `reliability.py --full`): a file planted in the backup folder whose
    keyless header claims a generation no journal can follow never becomes the number a restore writes
    above; the restore of a real backup succeeds (before: a foreign JournalProblem)."""
    from posstate.backup import backups as _backups
    from posstate.storage.container import OFFSETS

    authentic(tmp_path)
    with make(tmp_path) as m:
        m.load_positions()
        real = m.create_backup()
    fake = bytearray(real.path.read_bytes())
    start, width = OFFSETS["g"]
    fake[start : start + width] = f"{2**60:0{width}x}".encode()
    body = bytes(fake[:-73])
    fake = bytearray(body + b"\nsha256=" + hashlib.sha256(body).hexdigest().encode() + b"\n")
    planted = real.path.parent / _backups.file_name("20000101_000000")
    planted.write_bytes(bytes(fake))
    with make(tmp_path) as m:
        m.load_positions()
        m.restore_from_backup(real.id, accept_older=True)
        assert m.generation < 100
