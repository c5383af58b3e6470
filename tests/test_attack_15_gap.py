"""Issue 15 attack: the snapshot's own journal file is missing while the ``.next`` segment a background
compaction started (linked to that journal's id) survives. The segment starts after records the snapshot
does not hold: every reader that follows the chain must report the gap as damage, never replay the segment
onto the snapshot as if the missing records had not been acknowledged.

The image: the snapshot (generation 1, journal seq 0), the old segment (records 1-5: S0..S4 = 1..5, deleted
here) and ``.next`` (records 6-9: S0=100, S1=201, S2=202, S3=203).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from posstate import PositionStateManager, StateConfig
from posstate.backup import acked as _acked
from posstate.cli.main import cli
from posstate.core.errors import CorruptStateError
from posstate.journal.current import read_current
from posstate.journal.files import next_path, segment_chain
from posstate.journal.records import replay_chain
from posstate.model.position import Position
from posstate.selftest.harness import copy_tree
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring, encode_key_text
from posstate.storage.statefile import ReadOptions
from tests.test_background_compaction import held

KEY = bytes(range(32))
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}
OPTS = ReadOptions(keyring=Keyring(key=KEY))


def _pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def _cfg(d: Path) -> StateConfig:
    return StateConfig.in_dir(d, backup_interval=1e9, journal_max_records=5)


@pytest.fixture
def gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A crash image with two segments, then the snapshot's own journal (the first segment) deleted."""
    live, img = tmp_path / "live", tmp_path / "image"
    with held(monkeypatch) as gate, PositionStateManager(_cfg(live), key=KEY) as m:
        m.save()
        for i in range(5):
            m.set_position(_pos(f"S{i}", i + 1))
        m.set_position(_pos("S0", 100))  # rotates: this record opens .next
        assert gate.entered.wait(60)
        for i, n in ((1, 201), (2, 202), (3, 203)):
            m.set_position(_pos(f"S{i}", n))
        copy_tree(live, img)
        gate.release.set()
    cfg = _cfg(img)
    assert next_path(cfg.journal_path).exists()
    cfg.journal_path.unlink()  # records 1-5, acknowledged, gone
    yield img


def _run(d: Path, args: list[str]) -> Result:
    key_file = d.parent / "key.txt"
    if not key_file.exists():
        key_file.write_text(encode_key_text(KEY) + "\n")
        key_file.chmod(0o600)
    return CliRunner().invoke(cli, ["--state-dir", str(d), "--key-file", str(key_file), *args], env=CLEAN_ENV)


def test_read_only_replay_stops_at_a_segment_that_starts_past_the_snapshot(gap: Path) -> None:
    """issue 15 attack (missing journal): replay_chain applies none of .next and says why."""
    cfg = _cfg(gap)
    st = _statefile.read(cfg.state_path, options=OPTS).state
    chain = segment_chain(cfg.journal_path, cfg.legacy_journal_path, st.journal)
    applied, _, stopped = replay_chain(chain, keyring=Keyring(key=KEY), state=st)
    assert applied == 0 and "missing" in stopped, stopped
    assert st.positions == {}


def test_read_current_reports_the_gap_and_invents_nothing(gap: Path) -> None:
    """issue 15 attack (missing journal): show/export/diff's view is the snapshot alone, with a journal error."""
    cur = read_current(_cfg(gap), OPTS)
    assert isinstance(cur.error, CorruptStateError)
    assert "missing" in str(cur.error)
    assert cur.applied == 0 and cur.state.positions == {}


@pytest.mark.parametrize("args", [["validate"], ["history", "--json"], ["show", "--json"]], ids=["validate", "history", "show"])
def test_cli_readers_fail_on_the_gap(gap: Path, args: list[str]) -> None:
    """issue 15 attack (missing journal): validate, history and show exit non-zero naming the gap."""
    res = _run(gap, args)
    assert res.exit_code != 0, res.stdout
    assert "missing" in (res.stdout + res.stderr)


def test_online_backup_refuses_the_gap(gap: Path) -> None:
    """issue 15 attack (missing journal): the online backup raises the damage instead of backing up a state with a hole."""
    with pytest.raises(CorruptStateError, match="missing"):
        _acked.online(_cfg(gap), OPTS, write_keyring=Keyring(key=KEY))


def test_load_recovers_and_counts_the_records_it_cannot_replay(gap: Path) -> None:
    """issue 15 attack (missing journal): a load does not silently replay .next onto the snapshot: it recovers
    (last_recovery set, the segment kept in quarantine) and counts what is lost."""
    cfg = _cfg(gap)
    with PositionStateManager(cfg, key=KEY) as m:
        got = {k[0]: int(p.contracts) for k, p in m.load_positions().items()}
        report = m.last_recovery
    assert report is not None
    assert got == {}  # nothing invented: S1..S3 without S4 never existed as a state
    assert report.generations_lost is not None and report.generations_lost > 0
    assert any("next" in p.name for p in cfg.quarantine_dir.iterdir())
    assert json.dumps(report.to_dict())


def test_replica_lag_counts_the_segment_it_cannot_ship(gap: Path) -> None:
    """issue 15 attack (missing journal): the shipper cannot ship .next without the journal it continues, so
    `replica status` counts its records as behind (never "0 behind" while acknowledged records wait)."""
    from posstate.replica import local as _local

    cfg = _cfg(gap)
    local = _local.read_local(cfg.state_path, cfg.journal_path)
    assert _local.compare(local, [], []).records_behind == 4
