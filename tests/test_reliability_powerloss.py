"""Power-loss replay (ALICE idea): rebuild every disk state a power cut during a save could leave; load it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from posstate import generate_key
from posstate.selftest.harness import Fault
from posstate.selftest.replay import crash_states, lying_disk_states
from posstate.selftest.scenarios import Recorded, load_state, record_save

SYNC_OPS = frozenset({"fsync", "fdatasync", "fsync_dir"})


@pytest.fixture
def key() -> bytes:
    return generate_key()


def _replay(rec: Recorded, work: Path, key: bytes) -> list:
    counter = itertools.count()
    return [
        load_state(st, work / f"c{next(counter)}", key=key, old=rec.old, new=rec.new)
        for st in crash_states(rec.before, rec.ops, rec.root)
    ]


@pytest.mark.parametrize("warmup", [pytest.param(0, id="first-save"), pytest.param(2, id="steady-state")])
def test_every_power_loss_state_loads_old_or_new(tmp_path: Path, key: bytes, warmup: int) -> None:
    """Each prefix of the ops, unsynced writes lost, unsynced dir ops lost: old or new, new once acked."""
    rec = record_save(tmp_path / "s", key=key, warmup=warmup)
    outcomes = _replay(rec, tmp_path, key)
    assert len(outcomes) >= 8
    lost = [(o.state.label, o.result, o.detail) for o in outcomes if o.lost]
    assert lost == []
    assert {o.result for o in outcomes} == {"old", "new"}
    assert all(o.result == "new" for o in outcomes if o.state.complete)


def test_replay_model_includes_torn_and_zero_filled_files(tmp_path: Path, key: bytes) -> None:
    """The model really produces zero-filled and torn versions of the unsynced temp file."""
    rec = record_save(tmp_path / "s", key=key)
    labels = " ".join(st.label for st in crash_states(rec.before, rec.ops, rec.root))
    for word in ("unsynced-new", "zero-filled", "torn@512"):
        assert word in labels


def test_lying_disk_damaged_state_file_recovers_from_bak(tmp_path: Path, key: bytes) -> None:
    """The renamed file empty, zero-filled or torn at 512/4096 despite fsync: recovery loads old or new."""
    rec = record_save(tmp_path / "s", key=key)
    states = list(lying_disk_states(rec.before, rec.ops, rec.root, target="positions.json"))
    assert len(states) >= 3
    outcomes = [load_state(st, tmp_path / f"l{i}", key=key, old=rec.old, new=rec.new) for i, st in enumerate(states)]
    assert [(o.state.label, o.result, o.detail) for o in outcomes if o.result not in ("old", "new")] == []


def _sync_sites(tmp_path: Path, key: bytes) -> int:
    rec = record_save(tmp_path / "probe", key=key)
    return sum(1 for op in rec.ops if op.name in SYNC_OPS)


def test_each_fsync_of_a_save_is_needed(tmp_path: Path, key: bytes) -> None:
    """Mutation check: turning any single fsync / directory fsync of a save into a no-op loses acked data."""
    sites = _sync_sites(tmp_path, key)
    assert sites >= 2  # the temp file's fsync and the directory fsync after the rename
    for k in range(1, sites + 1):
        work = tmp_path / f"m{k}"
        rec = record_save(work / "s", key=key, fault=Fault(at=k, action="skip", ops=SYNC_OPS))
        skipped = [op for op in rec.ops if op.faulted == "skip"]
        assert len(skipped) == 1, f"site {k} was not reached"
        outcomes = _replay(rec, work, key)
        assert any(o.lost for o in outcomes), f"removing {skipped[0].name} on {skipped[0].path} went unnoticed"
