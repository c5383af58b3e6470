"""Issue 15.4: a lost save that only folded journaled changes into a snapshot loses nothing, and recovery says
so (0 generations lost); a lost save that replaced positions is counted, whatever an attacker without the key
writes into the journal (journal/fold.py)."""

from __future__ import annotations

import shutil
import struct
import zlib
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from posstate import Position, PositionStateManager, StateConfig
from posstate.cli.main import cli
from posstate.journal import format as jf
from posstate.journal.fold import encode_fold, state_digest
from posstate.journal.records import replay_detail
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions, read


def pos(contracts: int, symbol: str = "A") -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def damage(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "payload":  # the header still says which generation the file was
        data[len(data) // 2] ^= 0xFF
    else:  # nothing of the file tells its generation
        data[:] = bytes(len(data))
    path.write_bytes(bytes(data))


def as_if_killed(cfg: StateConfig) -> None:
    """Drop the backups a clean close leaves (the bot was killed): only .bak and the journal remain."""
    shutil.rmtree(cfg.backup_path, ignore_errors=True)


def journaled_then_saved(cfg: StateConfig, key: bytes, *, replace: bool, writer: str = "save_positions") -> int:
    """A=1 saved (the .bak to be); A=2 and B=3 journaled; then save() (a fold) or, *replace*, a snapshot write
    that changes more than the journal holds (*writer*). Returns the generation of that last save."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        m.set_position(pos(3, "B"))
        if not replace:
            last = m.save()
        elif writer == "save_positions":
            last = m.save_positions([pos(9, "C")])
        elif writer == "batch_save_positions":
            last = m.batch_save_positions([pos(9, "C")])
        else:  # the first bot metadata is written as a snapshot, never only journaled (docs/JOURNAL.md)
            m.set_bot_metadata({"step": 1})
            last = m.generation
    as_if_killed(cfg)
    return last


@pytest.mark.parametrize("durability", ["sync", "group"])
@pytest.mark.parametrize("where", ["payload", "zeroed"])
def test_lost_fold_only_save_is_not_counted(cfg: StateConfig, key: bytes, durability: str, where: str) -> None:
    """issue 15.4: save() only folded journaled changes; its snapshot is lost (header readable or not) and
    its journal survives: .bak + the journal hold everything, so 0 generations lost, new generation above."""
    cfg = cfg.replace(durability=durability)
    last = journaled_then_saved(cfg, key, replace=False)
    damage(cfg.state_path, where)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2) and m.get_position("B", "long") == pos(3, "B")
        report = m.last_recovery
        assert report is not None and report.source.startswith("positions.json.bak")
        assert report.generations_lost == 0, report
        assert report.new_generation > last


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_lost_background_compaction_is_not_counted(cfg: StateConfig, key: bytes, durability: str) -> None:
    """issue 15.4: a background compaction's snapshot is lost after its rename, before the retirement (both
    journal segments on disk): .bak and the segments hold every change, so 0 generations lost."""
    cfg = cfg.replace(durability=durability, journal_max_records=3)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        for i in (2, 3, 4):
            m.set_position(pos(i))
        first = cfg.journal_path.read_bytes()  # the segment the compaction folds
        m.set_position(pos(5))  # rotation: the next segment holds this record
        assert m.compact(wait=True)
        m.set_position(pos(7, "B"))
        last = m.generation
    as_if_killed(cfg)
    nxt = cfg.journal_path.with_name(cfg.journal_path.name + ".next")
    cfg.journal_path.rename(nxt)  # as a crash before the retirement leaves the segments
    cfg.journal_path.write_bytes(first)
    damage(cfg.state_path, "payload")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(5) and m.get_position("B", "long") == pos(7, "B")
        report = m.last_recovery
        assert report is not None and report.generations_lost == 0, report
        assert report.new_generation > last


@pytest.mark.parametrize("writer", ["save_positions", "batch_save_positions", "set_bot_metadata"])
@pytest.mark.parametrize("durability", ["sync", "group"])
@pytest.mark.parametrize("where", ["payload", "zeroed"])
def test_lost_save_positions_is_counted(cfg: StateConfig, key: bytes, durability: str, where: str, writer: str) -> None:
    """issue 15.4: a snapshot write that changed more than the journal holds (save_positions(), a batch, the
    first bot metadata) is lost (header readable or not): at least that save is reported lost, never 0, and
    its number is never reused."""
    cfg = cfg.replace(durability=durability)
    last = journaled_then_saved(cfg, key, replace=True, writer=writer)
    damage(cfg.state_path, where)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("C", "long") is None and m.get_bot_metadata() is None  # the write is really gone
        report = m.last_recovery
        assert report is not None and report.generations_lost is not None
        assert report.generations_lost >= 1, report
        assert report.new_generation > last


def _records(path: Path) -> tuple[jf.JournalHeader, tuple[jf.RawRecord, ...]]:
    data = path.read_bytes()
    header = jf.parse_header(data)
    return header, jf.scan(data, header).records


def _frame(fixed: bytes, payload: bytes) -> bytes:
    body = fixed + payload
    length = struct.pack(">I", len(body))
    crc = zlib.crc32(length)
    return length + struct.pack(">I", crc) + struct.pack(">I", zlib.crc32(body, crc)) + body


def test_forged_fold_record_does_not_hide_a_lost_save(cfg: StateConfig, key: bytes) -> None:
    """issue 15.4: an attacker without the key replaces the fold record of a save_positions() with one that
    passes every keyless check (frame CRCs, numbers, kind) and claims exactly what would hide the loss (that
    generation, and the digest of .bak + the journal): it fails authentication, so the save is still counted."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        m.set_position(pos(3, "B"))
        last = m.save_positions([pos(9, "C")])
    as_if_killed(cfg)
    options = ReadOptions(keyring=Keyring(key=key), require_encryption=True)
    replayed = read(cfg.bak_path, options=options).state
    replay_detail([cfg.journal_path], keyring=options.keyring, state=replayed, require_encryption=True)
    claim = encode_fold(last, state_digest(replayed))
    header, recs = _records(cfg.journal_path)
    fold = recs[-1]
    assert fold.kind == jf.KIND_FOLD
    forged = _frame(struct.pack(">QQQB", fold.seq, header.base_generation, fold.time_ms, jf.KIND_FOLD), claim)
    data = bytearray(cfg.journal_path.read_bytes())
    data[fold.offset : fold.end] = forged
    cfg.journal_path.write_bytes(bytes(data))
    assert _records(cfg.journal_path)[1][-1].payload == claim  # every keyless check passes
    damage(cfg.state_path, "zeroed")
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        report = m.last_recovery
        assert report is not None and report.generations_lost is not None
        assert report.generations_lost >= 1, report
        assert report.new_generation > last


def test_replayed_journal_with_a_fold_record_does_not_hide_a_lost_save(cfg: StateConfig, key: bytes) -> None:
    """issue 15.4: an attacker puts back an older .bak and its journal, which ends with a genuine fold record
    (of an earlier save()), beside the damaged state file of a later save_positions(): the fold record holds
    only its own generation, so the later save is still counted lost."""
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        m.save()  # a fold: its record ends this journal
        old = {p: p.read_bytes() for p in (cfg.bak_path, cfg.journal_path)}
        m.set_position(pos(3))
        last = m.save_positions([pos(9, "C")])
    as_if_killed(cfg)
    assert _records(cfg.journal_path)[1][-1].kind == jf.KIND_FOLD
    for p, data in old.items():
        p.write_bytes(data)
    damage(cfg.state_path, "payload")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2)
        report = m.last_recovery
        assert report is not None and report.generations_lost is not None
        assert report.generations_lost >= 1, report
        assert report.new_generation > last


def test_repair_and_last_recovery_agree_on_a_lost_fold(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.4: `posstate repair --dry-run`, `posstate repair` and `last_recovery` all say 0 generations
    lost for a lost fold-only save, and at least 1 for a lost save_positions()."""
    runner = CliRunner()
    for replace, want in ((False, "0 generations lost"), (True, "1 generations lost")):
        state = tmp_path / f"state-{replace}"
        cfg = StateConfig.in_dir(state)
        journaled_then_saved(cfg, key, replace=replace)
        damage(cfg.state_path, "payload")
        lib = tmp_path / f"copy-{replace}"
        shutil.copytree(state, lib)
        base = ["--state-dir", str(state), "--key-file", str(key_file)]
        r = runner.invoke(cli, [*base, "repair", "--dry-run"])
        assert want in r.output, r.output
        r = runner.invoke(cli, [*base, "repair", "--yes"])
        assert want in r.output, r.output
        with PositionStateManager(StateConfig.in_dir(lib), key=key) as m:
            m.load_positions()
            assert m.last_recovery is not None
            assert f"{m.last_recovery.generations_lost} generations lost" == want


def test_readers_skip_a_fold_record_that_is_not_last(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.4: .bak copied over the state file after a save makes the journal ending with the fold record
    the live one again: a load, `show`, `history` and `validate` skip the fold record (no change, no damage),
    the bot goes on writing after it, and never under the generation the fold record names."""
    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos(1))
        m.save()
        m.set_position(pos(2))
        folded = m.save()
    as_if_killed(cfg)
    assert _records(cfg.journal_path)[1][-1].kind == jf.KIND_FOLD
    shutil.copy(cfg.bak_path, cfg.state_path)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(2)
        assert m.last_recovery is None
        m.set_position(pos(3))
        assert m.generation > folded  # the folded save's number is never given to A=3
    kinds = [r.kind for r in _records(cfg.journal_path)[1]]
    assert jf.KIND_FOLD in kinds[:-1], kinds  # continued after the fold record
    base = ["--state-dir", str(cfg.state_path.parent), "--key-file", str(key_file)]
    runner = CliRunner()
    for command in (["show"], ["history"], ["validate"]):
        r = runner.invoke(cli, [*base, *command])
        assert r.exit_code == 0, (command, r.output)
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("A", "long") == pos(3)
        assert m.last_recovery is None
