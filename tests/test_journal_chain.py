"""Issue 12 review, journal holes: records chained across copies (12.3), planted creation temps, record-less
journals never continued, and the one choice between the journal's two names (12.7)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import orjson
import pytest
from test_journal_security import KEY, authentic, held, make, pos, snapshot_journal

from posstate import CorruptStateError, PositionStateManager, StateConfig
from posstate.journal import files as _jfiles
from posstate.journal import format as jf
from posstate.journal import records as _records
from posstate.model import ops as jops
from posstate.selftest.harness import copy_tree
from posstate.storage import crypto as _crypto

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "data" / "legacy_journal"


def _two_copies_spliced(tmp_path: Path) -> Path:
    """Copy a directory while its journal exists, let both copies append, then splice copy A's records 1-2
    with copy B's record 3 (authentic records, header identical in both)."""
    a, b = tmp_path / "a", tmp_path / "b"
    authentic(a)
    copy_tree(a, b)
    for d, tag in ((a, "X"), (b, "Y")):
        with make(d) as m:
            m.load_positions()
            m.set_position(pos(tag, "2"))
            m.set_position(pos(tag, "3"))
    ja, jb = (a / "positions.json.journal").read_bytes(), (b / "positions.json.journal").read_bytes()
    ra = jf.scan(ja, jf.parse_header(ja)).records
    rb = jf.scan(jb, jf.parse_header(jb)).records
    (a / "positions.json.journal").write_bytes(ja[: ra[1].end] + jb[rb[2].offset : rb[2].end])
    return a


# ------------------------------------------------------------------------------------------ 1: chained records
def test_spliced_journal_is_damage_recovered_to_the_prefix(tmp_path: Path) -> None:
    """issue 12.3 (review 1): a record spliced from another copy fails authentication: damage, the load keeps
    the snapshot plus the records before it, reports it in last_recovery and keeps the journal in quarantine."""
    a = _two_copies_spliced(tmp_path)
    with make(a) as m:
        m.load_positions()
        assert held(m) == {"A": "1", "B": "1", "X": "2"}
        assert m.last_recovery is not None and "journal" in m.last_recovery.reason
    assert list((a / "quarantine").glob("positions.json.journal.*"))


def test_version_3_records_are_chained_to_the_record_before() -> None:
    """issue 12.3 (review 1): a version-3 record opens only after the record its writer sealed before it."""
    header = jf.new_header(base_generation=1, base_seq=0, created_ms=0, key_id=_crypto.key_id(KEY))
    writer = jf.Sealer(header, KEY)
    payload = orjson.dumps([jops.set_position(pos("A"), rev=1).json])
    data = header.raw + b"".join(writer.frame(seq=s, generation=1, time_ms=0, kind=jf.KIND_OP, payload=payload) for s in (1, 2))
    first, second = jf.scan(data, header).records
    assert jf.Sealer(header, KEY).open(second) is None  # out of order: fails
    reader = jf.Sealer(header, KEY)
    assert reader.open(first) == payload and reader.open(second) == payload
    assert jf.Sealer(header, KEY, after=first).open(second) == payload  # a writer continuing after a reload


def test_chain_continues_across_reloads(tmp_path: Path) -> None:
    """issue 12.3 (review 1): a journal continued after a reload chains on from its last record (the
    writer keeps the last tag): every record of the continued file authenticates in order."""
    authentic(tmp_path)
    for sym in ("C", "D"):
        with make(tmp_path) as m:
            m.load_positions()
            m.set_position(pos(sym))
    path = tmp_path / "positions.json.journal"
    header, records, _ = _records.read_records(path.read_bytes(), path=path, keyring=_crypto.Keyring(key=KEY))
    assert len(records) == 3 and header.version == 3
    with make(tmp_path) as m:
        assert set(held(m)) == {"A", "B", "C", "D"} and m.last_recovery is None


# ------------------------------------------------------------------------------------------ 2: planted temps
def _plant_temp(d: Path, journal_id: bytes, seq: int) -> None:
    header = jf.new_header(base_generation=1, base_seq=0, created_ms=0, key_id=None, journal_id=journal_id)
    (d / ".positions.json.journal.0123456789abcdef.tmp").write_bytes(header.raw + bytes(12) + seq.to_bytes(8, "big") + bytes(30))


def test_planted_temp_with_the_real_journal_id_cannot_pass_the_format_bound(tmp_path: Path) -> None:
    """review 2: a keyless temp naming the snapshot's real journal id and a sequence number above MAX_BASE is
    not counted: the bot goes on, and every later snapshot holds a valid sequence number."""
    authentic(tmp_path)
    _, snap = snapshot_journal(tmp_path)
    _plant_temp(tmp_path, bytes.fromhex(snap["id"]), jf.MAX_BASE + 1)
    with make(tmp_path) as m:
        m.load_positions()
        m.set_position(pos("C"))
        m.save()
        m.set_position(pos("D"))
    with make(tmp_path) as m:
        assert set(held(m)) == {"A", "B", "C", "D"} and m.last_recovery is None
    assert snapshot_journal(tmp_path)[1]["seq"] <= jf.MAX_BASE


def test_temp_of_the_snapshots_journal_keeps_the_sequence_moving_forward(tmp_path: Path) -> None:
    """review 2: a temp of the snapshot's journal inside the bound still moves the sequence past its record."""
    authentic(tmp_path)
    (tmp_path / "positions.json.journal").unlink()  # the crash left only the creation temp
    _, snap = snapshot_journal(tmp_path)
    _plant_temp(tmp_path, bytes.fromhex(snap["id"]), snap["seq"] + 50)
    with make(tmp_path) as m:
        m.load_positions()
        m.set_position(pos("C"))
    data = (tmp_path / "positions.json.journal").read_bytes()
    assert jf.scan(data, jf.parse_header(data)).records[0].seq > snap["seq"] + 50


# ------------------------------------------------------------------------------------------ 3: empty journals
def test_record_less_journal_is_never_continued(tmp_path: Path) -> None:
    """review 3: a planted header with no records (the real journal id and the public key id, fields chosen by
    the attacker) is never appended to: the next change rotates to a journal whose header the bot wrote."""
    authentic(tmp_path)
    generation, snap = snapshot_journal(tmp_path)
    kid = bytes.fromhex(_crypto.key_id(KEY))
    head = jf._HEAD.pack(
        jf.MAGIC, 3, jf.FLAG_ENCRYPTED, 0, 0, bytes(4), bytes.fromhex(snap["id"]), kid, bytes(16), generation + 7, snap["seq"], 0
    )
    planted = head + hashlib.sha256(head).digest()[:8]
    (tmp_path / "positions.json.journal").write_bytes(planted)
    with make(tmp_path) as m:
        m.load_positions()
        m.set_position(pos("C"))
    data = (tmp_path / "positions.json.journal").read_bytes()
    assert data[: jf.HEADER_SIZE] != planted
    assert jf.parse_header(data).journal_id != bytes.fromhex(snap["id"])
    with make(tmp_path) as m:
        assert set(held(m)) == {"A", "C"} and m.last_recovery is None  # B was only in the replaced journal


# ------------------------------------------------------------------------------------------ 4: which file
def _two_names(tmp_path: Path) -> Path:
    """posstate 0.1.x wrote journal J0 as positions.json.journal; a downgrade to 0.1.0 then compacted into
    journal J (positions.journal, the old name) holding an acknowledged record past the snapshot."""
    d = tmp_path / "state"
    with make(d) as m:
        m.set_position(pos("A"))
        old = (d / "positions.json.journal").read_bytes()  # J0: its record is in every later snapshot
        m.save()
        m.set_position(pos("B"))  # journal J, record past the snapshot
    (d / "positions.json.journal").rename(d / "positions.journal")
    (d / "positions.json.journal").write_bytes(old)
    return d


def test_old_name_with_the_snapshots_journal_wins_over_an_older_new_name(tmp_path: Path) -> None:
    """review 4: the file whose header names the snapshot's journal is read, whatever its name: the records
    acknowledged under the old name are never ignored because an older journal has the new name."""
    d = _two_names(tmp_path)
    with make(d) as m:
        assert held(m) == {"A": "1", "B": "1"} and m.last_recovery is None
        m.set_position(pos("C"))
    with make(d) as m:
        assert set(held(m)) == {"A", "B", "C"}


def test_both_names_holding_the_snapshots_journal_past_it_are_refused(tmp_path: Path) -> None:
    """review 4: both files name the snapshot's journal and both hold records past it: CorruptStateError
    (kind journal) naming both files, never a silent choice."""
    d = _two_names(tmp_path)
    shutil.copy(d / "positions.journal", d / "positions.json.journal")
    cfg = StateConfig.in_dir(d)
    _, snap = snapshot_journal(d)
    with pytest.raises(CorruptStateError, match=r"positions\.journal") as info:
        _jfiles.journal_file(cfg.journal_path, cfg.legacy_journal_path, snap)
    assert info.value.kind == "journal" and "positions.json.journal" in str(info.value)
    with make(d) as m, pytest.raises(CorruptStateError, match="both"):
        m.load_positions()


def _legacy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    for name in ("positions.json", "positions.journal"):
        (d / name).write_bytes((LEGACY / name).read_bytes())
    return d


def test_repair_of_a_damaged_old_layout_snapshot_replays_the_old_named_journal(tmp_path: Path) -> None:
    """review 4: repair_state() on a 0.1.0 directory replays positions.journal onto the repaired snapshot
    and keeps it in quarantine (it read only positions.json.journal before)."""
    from posstate.model import document as _document
    from posstate.storage import codec as _codec
    from posstate.storage.crypto import Keyring

    d = _legacy_dir(tmp_path)
    cfg = StateConfig.in_dir(d)
    kr = Keyring(key=KEY)
    header, payload = _codec.decode(cfg.state_path.read_bytes(), keyring=kr, path=cfg.state_path)
    doc = orjson.loads(payload)
    bad = {"symbol": "ETH/USDT", "side": "long", "contracts": "1", "entry_price": "x"}
    doc["positions"]["ETH/USDT|long"] = {"rev": header.generation, "position": bad}
    enc = _codec.encode(
        _document.dumps(doc),
        generation=header.generation,
        written_at_ms=header.written_at_ms,
        position_count=2,
        compression_level=3,
        keyring=kr,
    )
    cfg.state_path.write_bytes(enc.data)
    with PositionStateManager(cfg, key=KEY) as m:
        report = m.repair_state()
        assert any(d.kind == "journal" and d.reason.startswith("4 journal records") for d in report.decisions)
        assert {k[0] for k in m.get_positions()} == {"B", "C"}
    assert not (d / "positions.journal").exists()
    assert list((d / "quarantine").glob("positions.journal.*"))
    with PositionStateManager(cfg, key=KEY) as m:
        assert {k[0] for k in m.load_positions()} == {"B", "C"}


def test_restore_sets_an_old_named_journal_aside(tmp_path: Path) -> None:
    """review 4: restoring a backup whose snapshot names the journal under the old name moves that journal
    aside: its records (newer than the backup) never come back on top of the restored state."""
    d = _legacy_dir(tmp_path)
    (d / "backups").mkdir(mode=0o700)
    shutil.copy(d / "positions.json", d / "backups" / "positions_20200101_000000.json")  # holds only A
    (d / "positions.json").write_bytes(b"damaged beyond reading")
    cfg = StateConfig.in_dir(d, durability="snapshot", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.restore_from_backup("latest", accept_older=True)
        assert {k[0] for k in m.get_positions()} == {"A"}
    assert not (d / "positions.journal").exists()
    assert list((d / "quarantine").glob("positions.journal.*"))
    with PositionStateManager(cfg, key=KEY) as m:
        assert {k[0] for k in m.load_positions()} == {"A"}
