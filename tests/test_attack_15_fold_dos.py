"""Issue 15.4 attack: fold records cost recovery one digest of the whole state each (O(state)). A plaintext
journal authenticates nothing, so anyone who can write it could append thousands of them and make every
recovery O(state x records); a genuine journal holds at most a few. Recovery checks a bounded number."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.journal import fold as _fold
from posstate.journal import format as jf
from tests.test_fold_loss import as_if_killed, damage

FORGED = 200


def _pos(sym: str, n: int) -> Position:
    return Position(symbol=sym, side="long", contracts=Decimal(n), entry_price=Decimal("100"))


def test_recovery_digests_a_bounded_number_of_fold_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.4 attack: a plaintext journal stuffed with fold records costs recovery a bounded number of digests."""
    cfg = StateConfig.in_dir(tmp_path / "s", backup_interval=1e9, encryption=False)
    with PositionStateManager(cfg) as m:
        m.set_position(_pos("A", 1))
        m.save()
        m.set_position(_pos("A", 2))
        last = m.save()
    as_if_killed(cfg)
    data = cfg.journal_path.read_bytes()
    header = jf.parse_header(data)
    recs = jf.scan(data, header).records
    assert recs[-1].kind == jf.KIND_FOLD
    sealer = jf.Sealer(header, None, after=recs[-1])
    extra = b"".join(
        sealer.frame(
            seq=recs[-1].seq + i,
            generation=header.base_generation,
            time_ms=recs[-1].time_ms,
            kind=jf.KIND_FOLD,
            payload=_fold.encode_fold(last + i, "0" * 64),
        )
        for i in range(1, FORGED + 1)
    )
    cfg.journal_path.write_bytes(data[: recs[-1].end] + extra)
    damage(cfg.state_path, "payload")
    calls = 0
    real = _fold.state_digest

    def counting(state: object) -> str:
        nonlocal calls
        calls += 1
        return real(state)  # type: ignore[arg-type]

    monkeypatch.setattr(_fold, "state_digest", counting)
    with PositionStateManager(cfg) as m:
        assert m.get_position("A", "long") == _pos("A", 2)
        report = m.last_recovery
    assert report is not None and report.new_generation > last + FORGED  # every number named stays used
    assert calls <= 16, calls
