"""Session 6 integration attack: ``GET /api/health`` (and ``posstate_journal_bytes``) report the journal's size;
while a background compaction is pending (issue 14) the acknowledged records past the rotation are in the
``.next`` segment, which grows until the compaction finishes (a failing one retries for as long as it fails):
the size must count it, or a journal growing without bound reads as small."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.journal.files import next_path
from posstate.serve.health import BackupCache, HealthLimits, report
from posstate.serve.sources import ManagerSource
from tests.test_background_compaction import held

KEY = bytes(range(32))


def test_health_counts_the_next_segment_in_the_journal_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 x 18 (integration): the health body's journal bytes include the .next segment of a pending compaction."""
    cfg = StateConfig.in_dir(tmp_path, backup_interval=1e9, journal_max_records=5, journal_preallocate=0)
    with held(monkeypatch) as gate, PositionStateManager(cfg, key=KEY) as m:
        for i in range(6):
            m.set_position(Position(symbol=f"S{i}", side="long", contracts=Decimal(i + 1), entry_price=Decimal("1")))
        assert gate.entered.wait(60)
        for i in range(20):  # held: these records all go to .next
            m.set_position(Position(symbol=f"N{i}", side="long", contracts=Decimal(1), entry_price=Decimal("1")))
        nxt = next_path(cfg.journal_path)
        assert nxt.exists()
        src = ManagerSource(m)
        try:
            _, body = report(src, BackupCache(), HealthLimits(), clients=0)
        finally:
            src.close()
        want = cfg.journal_path.stat().st_size + nxt.stat().st_size
        gate.release.set()
    assert body["journal"]["bytes"] == want
