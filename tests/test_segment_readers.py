"""Issue 14.1: every reader follows the journal's segment chain (the ``.next`` segment a background compaction
started): the read-only view (show/export/diff), validate, history, recovery and repair.

The directory under test is a crash image taken while a background compaction is held at a gate: the old
snapshot, the old segment (records 1-5) and the ``.next`` segment linked to it (records 6-9).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from posstate import PositionStateManager, StateConfig
from posstate.cli.main import cli
from posstate.journal import format as jf
from posstate.journal.current import read_current
from posstate.journal.files import next_path
from posstate.model.position import Position
from posstate.selftest.harness import copy_tree
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, encode_key_text
from posstate.storage.statefile import ReadOptions
from tests.test_background_compaction import held

KEY = bytes(range(32))
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}
# What a load of the image holds: S0..S4 = 1..5 in the old segment, then S0=100, S1=201, S2=202, S3=203.
WANT = {"S0": 100, "S1": 201, "S2": 202, "S3": 203, "S4": 5}


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def cfg_of(d: Path) -> StateConfig:
    return StateConfig.in_dir(d, backup_interval=1e9, journal_max_records=5)


def contracts(positions: dict[object, Position]) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in positions.items()}  # type: ignore[index]


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A crash image with two segments (see the module docstring)."""
    live, img = tmp_path / "live", tmp_path / "image"
    with held(monkeypatch) as gate, PositionStateManager(cfg_of(live), key=KEY) as m:
        m.save()
        # The first save's backup is taken in the background: wait for it, so the image always holds it (the
        # restore test picks the oldest backup; copying while it was being written left none, 1 run in ~4).
        assert m.wait_for_backups(60)
        for i in range(5):
            m.set_position(pos(f"S{i}", i + 1))
        m.set_position(pos("S0", 100))  # the threshold is passed: rotates; this record opens .next
        assert gate.entered.wait(60)
        for i, n in ((1, 201), (2, 202), (3, 203)):
            m.set_position(pos(f"S{i}", n))
        copy_tree(live, img)
        gate.release.set()
    assert next_path(cfg_of(img).journal_path).exists()
    return img


def run(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env=CLEAN_ENV, catch_exceptions=False)


def keyed(d: Path) -> list[str]:
    key_file = d.parent / "key.txt"
    if not key_file.exists():
        key_file.write_text(encode_key_text(KEY) + "\n")
        key_file.chmod(0o600)
    return ["--state-dir", str(d), "--key-file", str(key_file)]


def damage_record(path: Path, index: int) -> None:
    """Flip a byte inside the *index*-th record of the journal file at *path* (records follow it)."""
    data = bytearray(path.read_bytes())
    header = jf.parse_header(bytes(data))
    rec = jf.scan(bytes(data), header).records[index]
    data[rec.end - 5] ^= 1
    path.write_bytes(bytes(data))


def test_read_current_replays_both_segments(image: Path) -> None:
    """issue 14.1: the read-only view (show/export/diff) replays the old segment and then the .next one."""
    cur = read_current(cfg_of(image), ReadOptions(keyring=Keyring(key=KEY)))
    assert cur.error is None
    assert contracts(cur.state.positions) == WANT  # type: ignore[arg-type]
    assert cur.applied == 9 and cur.last_seq == 9


def test_cli_show_history_validate_follow_the_segment_chain(image: Path) -> None:
    """issue 14.1: show --json, history --json and validate read the .next segment too, and write nothing."""
    before = {p: p.read_bytes() for p in image.rglob("*") if p.is_file()}
    show = run([*keyed(image), "show", "--json"])
    assert show.exit_code == 0, show.stderr
    doc = json.loads(show.stdout)
    assert {k.split("|")[0]: int(v["position"]["contracts"]) for k, v in doc["positions"].items()} == WANT
    hist = run([*keyed(image), "history", "--json"])
    assert hist.exit_code == 0, hist.stderr
    assert [e["seq"] for e in json.loads(hist.stdout)] == list(range(1, 10))
    val = run([*keyed(image), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr
    assert "segment positions.json.journal.next: 4 records" in val.stdout
    assert {p: p.read_bytes() for p in image.rglob("*") if p.is_file()} == before


def test_validate_fails_on_damage_in_the_next_segment(image: Path) -> None:
    """issue 14.1: damage before the last record of the .next segment fails validate (exit 1)."""
    damage_record(next_path(cfg_of(image).journal_path), 1)
    val = run([*keyed(image), "validate"])
    assert val.exit_code == 1, val.stdout + val.stderr


def test_recovery_replays_the_trustworthy_records_of_both_segments(image: Path) -> None:
    """issue 14.1: damage in the .next segment: recovery keeps the old segment's records and the .next
    segment's up to the damage (never only the first segment), and keeps both files in quarantine."""
    damage_record(next_path(cfg_of(image).journal_path), 2)  # record 8 (S2=202) of records 6-9
    with PositionStateManager(cfg_of(image), key=KEY) as m:
        got = contracts(m.load_positions())
        assert m.last_recovery is not None
    assert got == {"S0": 100, "S1": 201, "S2": 3, "S3": 4, "S4": 5}
    quarantined = [p.name for p in cfg_of(image).quarantine_dir.iterdir()]
    assert any("next" in n for n in quarantined), quarantined
    with PositionStateManager(cfg_of(image), key=KEY) as m:
        assert contracts(m.load_positions()) == got


def test_repair_replays_both_segments_onto_the_repaired_snapshot(image: Path) -> None:
    """issue 14.1: repair of the state file replays the old segment and the .next one onto it."""
    with PositionStateManager(cfg_of(image), key=KEY) as m:
        report = m.repair_state()
        assert report is not None
        assert contracts(m.get_positions()) == WANT
    with PositionStateManager(cfg_of(image), key=KEY) as m:
        assert contracts(m.load_positions()) == WANT
        assert not next_path(m.config.journal_path).exists()


def test_restore_keeps_the_records_of_the_next_segment(image: Path) -> None:
    """issue 14.1: a restore first folds both segments into a snapshot (the pre-restore backup holds every
    acknowledged change, the .next records too), then restores; nothing of the chain is lost."""
    with PositionStateManager(cfg_of(image), key=KEY) as m:
        m.load_positions()
        oldest = min(m.list_backups(), key=lambda b: b.created_at)
        result = m.restore_from_backup(oldest.id, accept_older=True)
        assert result.pre_restore_backup is not None
        pre = [b for b in m.list_backups() if b.id == result.pre_restore_backup]
    assert pre and not next_path(cfg_of(image).journal_path).exists()
    loaded = _statefile.read(pre[0].path, options=ReadOptions(keyring=Keyring(key=KEY)))
    assert contracts(loaded.state.positions) == WANT  # type: ignore[arg-type]
