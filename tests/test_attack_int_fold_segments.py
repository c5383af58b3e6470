"""Session 6 integration attack: a save's fold record (issue 15.4), the sequence number it uses, background
compaction's ``.next`` segment (issue 14), the missing-journal gap check (issue 15 attack) and the torn-frame
decision (issue 12.13) on one healthy directory. The directory is copied after every mutating file operation
of a run that saves explicitly (fold records), rotates, compacts in the background, and saves while a
rotation is pending; on no copy may a reader report damage or a gap, and a load must recover nothing and
hold a state the bot was told about."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import acked as _acked
from posstate.cli.main import cli
from posstate.journal import format as jf
from posstate.journal.current import read_current
from posstate.journal.files import next_path
from posstate.selftest.harness import MUTATING, HarnessOps, copy_tree
from posstate.storage import fileops as _fileops
from posstate.storage.crypto import Keyring, encode_key_text
from posstate.storage.statefile import ReadOptions

KEY = bytes(range(32))
OPTS = ReadOptions(keyring=Keyring(key=KEY))
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


def _cfg(d: Path, mode: str) -> StateConfig:
    return StateConfig.in_dir(d, durability=mode, backup_interval=1e9, journal_max_records=5)


def _pos(symbol: str, n: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(n), entry_price=Decimal("100"))


class _Imaging(HarnessOps):
    """Copies the live directory after each mutating operation (a SIGKILL image at that point)."""

    live: Path = Path()
    into: Path = Path()
    images: list[Path] = []  # noqa: RUF012 (replaced per instance below)
    _copy_lock: threading.Lock = threading.Lock()

    def _record(self, name: str, action: Any = None, **kw: object) -> None:
        super()._record(name, action, **kw)
        if name in MUTATING:
            with self._copy_lock:
                dst = self.into / f"img{len(self.images):04d}"
                copy_tree(self.live, dst)
                self.images.append(dst)


def _ends_in_fold(d: Path) -> bool:
    for j in d.glob("positions.json.journal*"):
        data = j.read_bytes()
        try:
            recs = jf.scan(data, jf.parse_header(data)).records
        except jf.JournalProblem:
            continue
        if recs and recs[-1].kind == jf.KIND_FOLD:
            return True
    return False


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_no_reader_reports_damage_on_any_image_of_saves_folds_and_segments(tmp_path: Path, mode: str) -> None:
    """issue 15.4 x 14 x 12.13 (integration): fold records, .next segments, gap check: a healthy directory is never damaged."""
    live = tmp_path / "live"
    ops = _Imaging(ignore_threads=frozenset())
    ops.live, ops.into, ops.images = live, tmp_path, []
    states: list[dict[str, int]] = [{}]
    with _fileops.use(ops), PositionStateManager(_cfg(live, mode), key=KEY) as m:

        def acked() -> None:
            states.append({k[0]: int(p.contracts) for k, p in m.get_positions().items()})

        for i in range(3):
            m.set_position(_pos("A", i + 1))
            acked()
        m.save()  # a fold record ends the first journal
        acked()
        for i in range(12):  # rotations to .next, background compactions
            m.set_position(_pos(f"B{i % 4}", i + 10))
            acked()
        m.save()
        acked()
        m.set_position(_pos("C", 1))
        acked()
        m.save()
        acked()
        m.save()  # a save with nothing new: its journal has no file
        acked()
        for i in range(7):
            m.set_position(_pos(f"D{i % 3}", i + 50))
            acked()
    images = [d for d in ops.images if _cfg(d, mode).state_path.exists()]
    assert any(next_path(_cfg(d, mode).journal_path).exists() for d in images), "no image with a .next segment"
    assert any(_ends_in_fold(d) for d in images), "no image with a fold record"
    key_file = tmp_path / "key.txt"
    key_file.write_text(encode_key_text(KEY) + "\n")
    key_file.chmod(0o600)
    bad: list[str] = []
    for d in images:
        cfg = _cfg(d, mode)
        cur = read_current(cfg, OPTS)
        if cur.error is not None:
            bad.append(f"{d.name}: read_current: {cur.error}")
            continue
        seen = {k[0]: int(p.contracts) for k, p in cur.state.positions.items()}
        if seen not in states:
            bad.append(f"{d.name}: read_current shows a state never acknowledged: {seen}")
        if next_path(cfg.journal_path).exists() or _ends_in_fold(d):
            for args in (["validate"], ["history", "--json"]):
                res = CliRunner().invoke(cli, ["--state-dir", str(d), "--key-file", str(key_file), *args], env=CLEAN_ENV)
                if res.exit_code != 0:
                    bad.append(f"{d.name}: {args[0]} exit {res.exit_code}: {res.stdout[-200:]}")
            _acked.online(cfg, OPTS, write_keyring=Keyring(key=KEY))
        with PositionStateManager(cfg, key=KEY) as r:
            got = {k[0]: int(p.contracts) for k, p in r.load_positions().items()}
            if r.last_recovery is not None:
                bad.append(f"{d.name}: load recovered: {r.last_recovery.to_dict()}")
            if got != seen:
                bad.append(f"{d.name}: load {got} != read_current {seen}")
    assert not bad, "\n".join(bad)
