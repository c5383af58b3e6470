"""The bounded reliability run (benchmarks/reliability.py) is part of the suite: nothing lost, all detected."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reliability.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("posstate_reliability_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_bounded_reliability_run_loses_nothing() -> None:
    """Every family runs; lost == 0; detected == tried except the one documented limit; crash/fault families recovered."""
    bench = _load()
    rows = bench.run(full=False, only=sorted(set(bench.FAMILIES) - {"pfaults"}))
    assert {r.family.split(":")[0] for r in rows} == {
        "crash",
        "power loss",
        "I/O fault",
        "damage",
        "hostile",
        "concurrency",
        "security",
        "journal crash",
        "journal power loss",
        "journal I/O fault",
        "journal damage",
        "replica",
    }
    # The one documented limit: a journal cut exactly between two records is a valid shorter journal.
    assert [r.family for r in rows if r.known_limit] == ["journal damage: cut at a record boundary"]
    for r in rows:
        assert r.tried > 0, r.family
        assert r.lost == 0, (r.family, r)
        if r.known_limit:
            continue  # detected is 0 there by design; lost == 0 still says nothing invented was loaded
        assert r.detected == r.tried, (r.family, r)
        if r.must_recover:
            assert r.recovered == r.tried, (r.family, r)
    assert bench.failures(rows) == []
    assert "| family" in bench.table(rows)


def test_bounded_persistent_faults_lose_nothing() -> None:
    """issue 12.8: from each operation of a snapshot save, an append (sync, group) and a compaction on, every
    file operation fails (rollback included) until the process crashes or closes; on a healthy disk the
    directory loads what the callers were told: no acknowledged update lost, no update reported failed back."""
    bench = _load()
    rows = bench.run(full=False, only=["pfaults"])
    assert [r.family for r in rows] == [
        "persistent fault: from each op on, snapshot save",
        "persistent fault: from each op on, append, sync",
        "persistent fault: from each op on, append, group",
        "persistent fault: from each op on, compaction, sync",
        "persistent fault: from each op on, compaction, group",
    ]
    for r in rows:
        assert r.tried > 0, r.family
        assert r.lost == 0, (r.family, r)
        assert r.detected == r.tried and r.recovered == r.tried, (r.family, r)
    assert bench.failures(rows) == []
