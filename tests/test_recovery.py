"""Automatic recovery inside load_positions(), attempt_recovery() and repair_state(), on real damaged files."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from posstate import (
    CorruptStateError,
    PersistenceError,
    Position,
    PositionStateManager,
    StaleBackupError,
    StateConfig,
    UnrecoverableStateError,
    WrongKeyError,
)
from posstate.backup import backups as _backups
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def pos(symbol: str = "BTC/USDT", side: str = "long", contracts: str = "1") -> Position:
    return Position(symbol=symbol, side=side, contracts=contracts, entry_price="100")  # type: ignore[arg-type]


def config(tmp_path: Path, **kw: Any) -> StateConfig:
    kw.setdefault("backup_interval", 0.0)
    return StateConfig.in_dir(tmp_path / "state", **kw)


def record(mgr: PositionStateManager, *names: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for n in names:
        mgr.on(n, seen.append)
    return seen


def history(tmp_path: Path, saves: int = 3, **kw: Any) -> StateConfig:
    """A state directory after *saves* saves (contracts 1..saves); returns its config."""
    cfg = config(tmp_path, **kw)
    with PositionStateManager(cfg, key=KEY) as m:
        for i in range(1, saves + 1):
            m.save_positions([pos(contracts=str(i)), pos("ETH/USDT", "short", str(i))])
            assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
    return cfg


def flip(path: Path, offset: int = 250) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_tail(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-120] + bytes(120))


def delete(path: Path) -> None:
    path.unlink()


def quarantined(cfg: StateConfig) -> list[str]:
    try:
        return sorted(os.listdir(cfg.quarantine_dir))
    except FileNotFoundError:
        return []


def write_doc(cfg: StateConfig, doc: dict[str, Any], *, generation: int, count: int) -> None:
    """Write an encrypted container holding *doc* as-is (it may break the schema) as the state file."""
    enc = _codec.encode(
        _document.dumps(doc),
        generation=generation,
        written_at_ms=int(time.time() * 1000),
        position_count=count,
        compression_level=3,
        keyring=Keyring.resolve(key=KEY, passphrase=None),
    )
    cfg.state_path.write_bytes(enc.data)


# ------------------------------------------------------------------------------------------ failure paths


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(flip, id="bit-flip"),
        pytest.param(truncate, id="truncated"),
        pytest.param(zero_tail, id="zero-filled-tail"),
        pytest.param(delete, id="deleted"),
    ],
)
def test_damaged_state_file_is_recovered_from_the_newest_backup(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    """A damaged or missing state file: stateCorrupted, recovery from the newest copy, quarantine, stateRepaired."""
    cfg = history(tmp_path)
    original = cfg.state_path.read_bytes()
    damage(cfg.state_path)
    with PositionStateManager(cfg, key=KEY) as m:
        seen = record(m, "stateCorrupted", "stateRepaired")
        positions = m.load_positions()
        assert positions[("BTC/USDT", "long")].contracts == 3 and len(positions) == 2
        report = m.last_recovery
        assert report is not None and report.source.startswith("backup ") and report.generation == 3
        assert report.new_generation == 4 and report.generations_lost == 0 and m.generation == 4
        assert [e["event"] for e in seen] == ["stateCorrupted", "stateRepaired"]
        assert _statefile.read(cfg.state_path, options=m._read).state.generation == 4
    q = quarantined(cfg)
    if damage is delete:
        assert q == []
    else:
        assert len(q) == 1 and q[0].startswith("positions.json.") and q[0].endswith(".corrupt")
        assert (cfg.quarantine_dir / q[0]).read_bytes() != original  # the damaged bytes, kept as they were


def test_damaged_bak_and_main_fall_back_to_timestamped_backup(tmp_path: Path) -> None:
    """Main and .bak both damaged: the newest valid timestamped backup is used, the .bak is listed as rejected."""
    cfg = history(tmp_path)
    flip(cfg.state_path)
    truncate(cfg.bak_path)
    with PositionStateManager(cfg, key=KEY) as m:
        m.load_positions()
        report = m.last_recovery
        assert report is not None and report.generation == 3
        verdicts = dict(report.candidates)
        assert "cut short" in verdicts["positions.json.bak"] and "checksum" in verdicts["positions.json"]


def test_bak_is_used_when_it_is_the_newest_copy(tmp_path: Path) -> None:
    """With one old timestamped backup, the .bak (one generation back) wins; one generation is reported lost.
    (Snapshot mode: in the journal modes a clean close backs up the last save, issue 15.2.)"""
    cfg = history(tmp_path, saves=4, backup_interval=1e9, durability="snapshot")
    flip(cfg.state_path, 300)
    with PositionStateManager(cfg, key=KEY) as m:
        assert m.load_positions()[("BTC/USDT", "long")].contracts == 3
        report = m.last_recovery
        assert report is not None and report.source == "positions.json.bak" and report.generations_lost == 1


def test_all_copies_damaged_raises_unrecoverable_and_never_starts_empty(tmp_path: Path) -> None:
    """Every copy damaged: UnrecoverableStateError naming each candidate; nothing quarantined; recoveryError."""
    cfg = history(tmp_path)
    flip(cfg.state_path)
    flip(cfg.bak_path)
    for b in _backups.scan(cfg.backup_path):
        zero_tail(b.path)
    with PositionStateManager(cfg, key=KEY) as m:
        errors = record(m, "recoveryError")
        with pytest.raises(UnrecoverableStateError) as info:
            m.load_positions()
        names = [name for name, _ in info.value.candidates]
        assert names[:2] == ["positions.json", "positions.json.bak"] and len(names) == 2 + 3
        assert "--accept-older" in str(info.value)
        assert errors
        with pytest.raises(UnrecoverableStateError):
            m.get_positions()  # still refuses; never an empty state
    assert quarantined(cfg) == [] and cfg.state_path.exists()


def test_valid_but_too_old_backup_is_refused_then_restored_on_purpose(tmp_path: Path) -> None:
    """Only a two-hour-old backup survives: recovery refuses it; restore needs accept_older=True. (Snapshot
    mode: in the journal modes a clean close backs up the last save, issue 15.2.)"""
    cfg = config(tmp_path, backup_interval=1e9, backup_threshold=3600, durability="snapshot")
    with PositionStateManager(cfg, key=KEY) as m:
        m.load_positions()
        then = time.time() - 7200
        st = StateData(generation=1, positions={pos().key: pos(contracts="9")}, position_revs={pos().key: 1})
        old = _backups.write_backup(
            st,
            backup_dir=cfg.backup_path,
            keyring=m._write_keyring,
            compression_level=3,
            options=m._read,
            now=then,
            written_at_ms=int(then * 1000),
        )
        m.save_positions([pos(contracts="1")])
        assert m.wait_for_backups(30)  # timed backups run in the background (issue 14.2)
    flip(cfg.state_path)
    with PositionStateManager(cfg, key=KEY) as m:
        with pytest.raises(UnrecoverableStateError) as info:
            m.load_positions()
        assert "too old" in dict(info.value.candidates)[f"backup {old.id}"]
        with pytest.raises(StaleBackupError):
            m.restore_from_backup(old.id)
        m.restore_from_backup(old.id, accept_older=True)
        assert m.get_positions() == {pos().key: pos(contracts="9")}
        assert m.generation == 2
    assert len(quarantined(cfg)) == 1


def test_wrong_key_is_not_corruption(tmp_path: Path) -> None:
    """A wrong key raises WrongKeyError; nothing is quarantined or rewritten."""
    cfg = history(tmp_path)
    before = cfg.state_path.read_bytes()
    with PositionStateManager(cfg, key=OTHER_KEY) as m:
        seen = record(m, "stateCorrupted", "stateRepaired")
        with pytest.raises(WrongKeyError):
            m.load_positions()
        assert seen == []
    assert cfg.state_path.read_bytes() == before and quarantined(cfg) == []


def test_damaged_main_with_only_wrong_key_copies_quarantines_nothing(tmp_path: Path) -> None:
    """A damaged main whose copies need another key: unrecoverable, reasons name the key, nothing moved."""
    cfg = history(tmp_path)
    flip(cfg.state_path)
    with PositionStateManager(cfg, key=OTHER_KEY) as m, pytest.raises(UnrecoverableStateError) as info:
        m.load_positions()
    assert "another key" in dict(info.value.candidates)["positions.json.bak"]
    assert quarantined(cfg) == []


def test_schema_invalid_state_file_is_recovered(tmp_path: Path) -> None:
    """A file that decrypts but breaks a relationship rule is recovered from a backup like a damaged one."""
    cfg = history(tmp_path)
    doc = _document.build_document(
        StateData(
            generation=4,
            written_at="2020-01-01T00:00:00.000Z",
            writer={"host": "h", "pid": 1, "version": "0"},
            positions={pos().key: pos()},
            position_revs={pos().key: 99},
        )
    )
    write_doc(cfg, doc, generation=4, count=1)
    with PositionStateManager(cfg, key=KEY) as m:
        seen = record(m, "stateCorrupted")
        m.load_positions()
        assert seen and seen[0]["kind"] == "invalid"
        assert m.last_recovery is not None and m.last_recovery.generation == 3
        assert m.last_recovery.generations_lost == 1


class _FailStateWrites(fs.FileOps):
    """ENOSPC for every temp file created in the state directory (the recovered state's write)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.attempts = 0

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        p = Path(path)
        verdicts = p.name.startswith(".positions.json.verdicts.")  # a background prune's verdict file, not the state
        if p.parent == self.state_dir and p.name.startswith(".positions.json.") and p.name.endswith(".tmp") and not verdicts:
            self.attempts += 1
            raise OSError(28, "injected ENOSPC")
        return super().open(path, flags, mode)


def test_recovery_max_attempts_bounds_retries_and_reports_recovery_error(tmp_path: Path) -> None:
    """When writing the recovered state keeps failing: recovery_max_attempts tries, recoveryError, then success."""
    cfg = history(tmp_path, recovery_max_attempts=2)
    flip(cfg.state_path)
    with PositionStateManager(cfg, key=KEY) as m:
        errors = record(m, "recoveryError")
        ops = _FailStateWrites(cfg.state_dir)
        with fs.use(ops), pytest.raises(PersistenceError):
            m.load_positions()
        assert ops.attempts == 2 and errors and errors[0]["attempts"] == 2
        assert len(quarantined(cfg)) == 1  # the damaged file is kept, never deleted
        assert m.load_positions()[("BTC/USDT", "long")].contracts == 3  # fault cleared


class _FlakyRead(fs.FileOps):
    def __init__(self, target: Path) -> None:
        self.target = str(target)
        self.flaked = False

    def read_file(self, path: fs.StrPath, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        data = super().read_file(path, limit, max_size)
        if str(path) == self.target and not self.flaked:
            self.flaked = True
            return data[:100]
        return data


def test_one_reread_resolves_a_transient_bad_read(tmp_path: Path) -> None:
    """A first read that comes back short is retried once; nothing is quarantined or rewritten."""
    cfg = history(tmp_path)
    before = cfg.state_path.read_bytes()
    with PositionStateManager(cfg, key=KEY) as m, fs.use(_FlakyRead(cfg.state_path)):
        m.load_positions()
        assert m.last_recovery is not None and m.last_recovery.source == "state file (re-read)"
    assert cfg.state_path.read_bytes() == before and quarantined(cfg) == []


def test_repair_refuses_a_file_that_does_not_decrypt(tmp_path: Path) -> None:
    """repair_state on a bit-flipped file raises CorruptStateError and moves nothing."""
    cfg = history(tmp_path)
    flip(cfg.state_path)
    with PositionStateManager(cfg, key=KEY) as m, pytest.raises(CorruptStateError):
        m.repair_state()
    assert quarantined(cfg) == []


# ------------------------------------------------------------------------------------------ repair / attempt_recovery


def test_repair_keeps_valid_restores_invalid_from_backup_and_drops_the_rest(tmp_path: Path) -> None:
    """Per entry: valid kept, invalid taken from the newest backup holding it, otherwise dropped; all reported."""
    cfg = history(tmp_path)
    st = StateData(
        generation=4,
        written_at="2020-01-01T00:00:00.000Z",
        writer={"host": "h", "pid": 1, "version": "0"},
        positions={pos().key: pos(contracts="4")},
        position_revs={pos().key: 4},
    )
    doc = _document.build_document(st)
    doc["positions"]["ETH/USDT|short"] = {
        "rev": 4,
        "position": {"symbol": "ETH/USDT", "side": "short", "contracts": "-5", "entry_price": "1"},
    }
    doc["positions"]["SOL/USDT|long"] = {
        "rev": 4,
        "position": {"symbol": "SOL/USDT", "side": "long", "contracts": "1", "entry_price": "x"},
    }
    write_doc(cfg, doc, generation=4, count=3)
    with PositionStateManager(cfg, key=KEY) as m:
        seen = record(m, "stateRepaired")
        report = m.repair_state()
        actions = {d.key: (d.action, d.source) for d in report.decisions}
        assert actions["BTC/USDT|long"] == ("kept", "state file")
        assert actions["ETH/USDT|short"][0] == "restored" and actions["ETH/USDT|short"][1].startswith("backup ")
        assert actions["SOL/USDT|long"] == ("dropped", "")
        assert report.repaired and report.rounds == 1 and report.generation == 5 and seen
        assert report.quarantined is not None and report.quarantined.exists()
        got = m.get_positions()
        assert got[("BTC/USDT", "long")].contracts == 4 and got[("ETH/USDT", "short")].contracts == 3
        assert ("SOL/USDT", "long") not in got
    with PositionStateManager(cfg, key=KEY) as m:
        assert m.validate_state().valid
        assert m.repair_state().repaired is False  # nothing left to repair


def test_attempt_recovery_is_none_for_a_good_file_and_a_report_for_a_bad_one(tmp_path: Path) -> None:
    """attempt_recovery() returns None when the file loads, the report when it had to recover."""
    cfg = history(tmp_path)
    with PositionStateManager(cfg, key=KEY) as m:
        assert m.attempt_recovery() is None
        flip(cfg.state_path)
        report = m.attempt_recovery()
        assert report is not None and report is m.last_recovery
        assert report.source == "memory" and report.generation == 3 and report.new_generation == 4


@pytest.mark.parametrize("bit", [pytest.param(60, id="beyond-the-format"), pytest.param(40, id="far-beyond-every-copy")])
def test_a_flipped_high_bit_in_a_damaged_generation_does_not_steer_recovery(tmp_path: Path, bit: int) -> None:
    """Found by `reliability.py --full` (damage family): a bit flip in the damaged state file's header
    generation (checksum no longer matches) is not a generation recovery may number its save above: the
    recovered state continues from the trustworthy copies (before: a foreign JournalProblem escaped the load,
    the new generation no journal header can hold)."""
    from posstate.storage.container import OFFSETS

    cfg = history(tmp_path, saves=3, durability="sync")
    data = bytearray(cfg.state_path.read_bytes())
    start, width = OFFSETS["g"]
    value = int(data[start : start + width], 16) | (1 << bit)
    data[start : start + width] = f"{value:0{width}x}".encode()
    cfg.state_path.write_bytes(bytes(data))
    with PositionStateManager(cfg, key=KEY) as m:
        got = m.load_positions()
        assert m.last_recovery is not None
        assert got[("BTC/USDT", "long")].contracts == 3
        assert m.generation < 100
        m.set_position(pos(contracts="4"))
    with PositionStateManager(cfg, key=KEY) as m:
        assert m.load_positions()[("BTC/USDT", "long")].contracts == 4
