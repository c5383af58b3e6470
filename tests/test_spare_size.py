"""The spare's size (issue 14, the tail): a spare holds room for the records of the next segment, so no record
of that segment writes zeros ahead on the caller's thread; its zeros are written and synced in steps; a spare
is never larger than ``BLANK_MAX``, the largest blank ``.next`` any reader takes for one.

The failure paths come first (a fault at each step of a stepped preparation is in test_spare_segment.py's
``test_fault_at_each_step_of_the_spare_preparation[stepped]``): the bound, then the size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from posstate.journal import format as jf
from posstate.journal import spare as spare_mod
from posstate.journal.files import BLANK_MAX, SPARE_ZEROS_MAX, next_path
from posstate.selftest.harness import HarnessOps
from posstate.storage import fileops as fs
from tests.test_spare_segment import contracts, fill_until_spare, keyed, make, pos, run, settle, spare_ready

SMALL_STEP = 16 * 1024  # makes a 128 KiB spare take 8 steps


def _next_size(m: Any) -> int:
    return next_path(m.config.journal_path).stat().st_size


def test_a_spare_is_never_larger_than_blank_max(tmp_path: Path) -> None:
    """Records so large that the next segment would need more than SPARE_ZEROS_MAX: the spare stops there, so
    every reader still takes it for a blank spare (a load ignores it, validate passes, nothing quarantined)."""
    big = {"blob": "x" * 60_000}  # about 60 KB a record: 100 records far past what a spare may hold
    with make(tmp_path, journal_max_records=100, journal_max_bytes=64 * 1024 * 1024) as m:
        for i in range(51):
            m.set_symbol_metadata(f"S{i % 8}", {**big, "i": i})
        settle(m)
        assert spare_ready(m)
        assert _next_size(m) == jf.HEADER_SIZE + SPARE_ZEROS_MAX == BLANK_MAX
        val = run([*keyed(tmp_path), "validate"])
        assert val.exit_code == 0, val.stdout + val.stderr
        for i in range(60):
            m.set_symbol_metadata(f"T{i % 8}", {**big, "i": i})
        assert m.compact(wait=True)
    q = m.config.quarantine_dir
    assert not (q.exists() and [p for p in q.iterdir() if ".next" in p.name])


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-bound", "one-byte-more"])
def test_a_blank_next_is_a_spare_up_to_blank_max_and_kept_aside_beyond(tmp_path: Path, extra: int) -> None:
    """A planted all-zero ``.next`` of BLANK_MAX bytes is a blank spare (replaced, never quarantined); one byte
    more is no spare of ours: moved to quarantine, kept, never read whole."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
    nxt = next_path(m.config.journal_path)
    with open(nxt, "wb") as f:
        f.truncate(BLANK_MAX + extra)
    with make(tmp_path) as m:
        assert contracts(m) == {"A": 1}
        fill_until_spare(m, 1)
        assert spare_ready(m)
        assert m._journal.spare_error is None
    q = m.config.quarantine_dir
    kept = [p for p in q.iterdir() if ".next" in p.name] if q.exists() else []
    assert [p.stat().st_size for p in kept] == ([BLANK_MAX + 1] if extra else [])


def test_no_spare_zeros_when_preallocation_is_off(tmp_path: Path) -> None:
    """``journal_preallocate=0`` turns zeros ahead off: the spare is the header's bytes, nothing more."""
    with make(tmp_path, journal_preallocate=0) as m:
        fill_until_spare(m)
        assert spare_ready(m)
        assert _next_size(m) == jf.HEADER_SIZE


def test_the_spare_holds_the_next_segments_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spare is sized from this segment's bytes per record up to the thresholds, so the next segment's
    records all land in zeros already on disk: from the rotation to the next one, no write on the caller's
    thread is larger than a record (no zeros ahead, 64 KiB and more, written with a record)."""
    monkeypatch.setattr(spare_mod, "SPARE_STEP", SMALL_STEP)
    records = 400
    meta = {"note": "y" * 700}  # about 1 KB a record: a segment of 400 holds far more than the first 64 KiB
    with make(tmp_path, journal_max_records=records) as m:
        i = 0
        while m._journal.records < records // 2 + 1:
            m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
            i += 1
        settle(m)
        assert spare_ready(m)
        per = (m._journal.size - jf.HEADER_SIZE) / m._journal.records
        assert _next_size(m) >= jf.HEADER_SIZE + per * records
        while not m._journal.rotating:
            m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
            i += 1
        assert m.compact(wait=True)
        probe = HarnessOps(skip_thread_prefix="posstate-compact")
        with fs.use(probe):
            for _ in range(records - 2):  # the new segment's records, up to just before its own rotation
                m.set_symbol_metadata(f"S{i % 8}", {**meta, "i": i})
                i += 1
        writes = [op.size for op in probe.ops if op.name == "write" and op.size is not None]
        assert writes and max(writes) < 4 * 1024, max(writes)
        want = {s: m.get_symbol_metadata(s) for s in (f"S{k}" for k in range(8))}
    with make(tmp_path, journal_max_records=records) as m:
        assert {s: m.get_symbol_metadata(s) for s in (f"S{k}" for k in range(8))} == want
