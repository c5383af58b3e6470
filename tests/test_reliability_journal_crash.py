"""Journal (durability="sync"/"group"): a real child doing durable updates is SIGKILLed at every operation
of an append and of a compaction, and at random; a fresh load shows the last ack or the update in flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from posstate import generate_key
from posstate.selftest.crashjournal import expected_positions, journal_matrix, journal_soak, parse_lines, run_child


@pytest.fixture
def key() -> bytes:
    return generate_key()


def test_kill_before_and_after_every_operation_of_an_append_and_a_compaction(tmp_path: Path, key: bytes) -> None:
    """SIGKILL before/after each mutating op: never an older state, never an error, never a mix."""
    matrix = journal_matrix(tmp_path, key=key)
    append, compaction = matrix["append"], matrix["compaction"]
    assert len(append) == 4  # write + fdatasync, each before and after
    # The rotation (issue 14): the new segment starts in the spare prepared ahead of time (issue 14.3): its
    # header and record in one write, then the fdatasync; without a spare it creates the segment (temp,
    # rename, directory fsync).
    assert len(compaction) >= 4
    bad = [(c.label, c.loaded, c.allowed, c.error) for c in append + compaction if not c.ok]
    assert bad == []
    # Both outcomes occur in each: early kills leave the last ack, late ones the update in flight.
    for cases in (append, compaction):
        acked, in_flight = cases[0].allowed[0]
        assert {c.loaded[0] for c in cases if c.loaded is not None} == {acked, in_flight}

    # The compaction's new record only counts once the new journal's rename is durable.
    # (issue 14: the rotation creates the new segment: its rename is the first point the record can survive.)
    def op_of(label: str) -> tuple[int, bool]:
        k = int(label.split(" op ")[1].split()[0])
        return k, "after" in label

    # (issue 14.3: in the spare, the write that puts the header and the record in place is that point.)
    renames = [op_of(c.label)[0] for c in compaction if "(replace)" in c.label]
    first = min(renames) if renames else min(op_of(c.label)[0] for c in compaction if "(write)" in c.label)
    survived = [op_of(c.label) for c in compaction if c.loaded is not None and c.loaded[0] == c.allowed[0][1]]
    assert survived and all(k > first or (k == first and after) for k, after in survived), survived


def test_kill_before_and_after_every_operation_of_a_background_compaction(tmp_path: Path, key: bytes) -> None:
    """issue 14.1: SIGKILL before/after each mutating op of the background compaction (snapshot temp, .bak,
    rename, directory fsync, the segment's rename) while updates go on: every ack survives, in order."""
    cases = journal_matrix(tmp_path, key=key, which=("background",))["background"]
    assert len(cases) >= 16
    assert [(c.label, c.loaded, c.allowed, c.error) for c in cases if not c.ok] == []


def test_kill_before_and_after_every_install_step_of_a_worker_compaction(tmp_path: Path, key: bytes) -> None:
    """issue 14.1 (compaction="process"): SIGKILL of the manager before/after each of its own operations
    installing the snapshot its worker wrote (.bak link, rename, directory fsync, the segment's rename) while
    updates go on: every ack survives, in order."""
    cases = journal_matrix(tmp_path, key=key, which=("background-process",))["background-process"]
    labels = " ".join(c.label for c in cases)
    assert len(cases) >= 8 and "(replace)" in labels and "(fsync_dir)" in labels
    assert [(c.label, c.loaded, c.allowed, c.error) for c in cases if not c.ok] == []


def test_soak_sync_mode_with_compactions(tmp_path: Path, key: bytes) -> None:
    """Random kills of a sync-mode update loop (compaction every 6 updates): every ack survives."""
    cases = journal_soak(tmp_path / "s", key=key, kills=8, mode="sync", seed=5)
    assert [(c.label, c.loaded, c.allowed, c.error) for c in cases if not c.ok] == []
    progress = [c.loaded[0] for c in cases if c.loaded is not None]
    assert progress == sorted(progress) and progress[-1] > 6  # at least one compaction happened


def test_soak_group_commit_three_threads(tmp_path: Path, key: bytes) -> None:
    """Group commit, 3 threads: after each kill every thread shows its last ack or its update in flight."""
    cases = journal_soak(tmp_path / "s", key=key, kills=6, mode="group", threads=3, seed=6)
    assert [(c.label, c.loaded, c.allowed, c.error) for c in cases if not c.ok] == []
    last = cases[-1].loaded
    assert last is not None and set(last) == {1, 2, 3} and min(last.values()) > 0


def test_child_acks_each_update_and_the_parent_checks_the_whole_state(tmp_path: Path, key: bytes) -> None:
    """The protocol itself: pending then ack per update; a load equals the state rebuilt from the counter."""
    rc, rep = run_child(tmp_path / "s", key=key, updates=9)
    assert rc == 0 and rep.acked == {0: 9} and rep.pending == {}
    assert parse_lines(["pending 2 7", "ack 2 7", "pending 2 8"]).pending == {2: 8}
    assert len(expected_positions(9)) == 5 and expected_positions(0) == {}
