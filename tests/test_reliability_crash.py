"""Process crash: a real child saving in a loop is SIGKILLed at every operation of a save and at random."""

from __future__ import annotations

from pathlib import Path

import pytest

from posstate import generate_key
from posstate.selftest.crashchild import crash_matrix, run_child, soak


@pytest.fixture
def key() -> bytes:
    return generate_key()


def test_kill_before_and_after_every_operation_of_a_save(tmp_path: Path, key: bytes) -> None:
    """SIGKILL before/after each mutating op of a save: a fresh load is the last ack or the in-flight save."""
    cases = crash_matrix(tmp_path, key=key)
    # A steady-state save has at least open, write, fsync, close, link, 2 renames and a directory fsync.
    assert len(cases) >= 16
    bad = [c for c in cases if not c.ok]
    assert not bad, bad
    # Both outcomes occur: early kills leave the acknowledged save, late ones the in-flight one.
    loaded = {c.loaded.generation for c in cases if c.loaded is not None}
    assert len(loaded) == 2
    assert all(c.pending is not None and c.acked is not None for c in cases)


def test_kill_at_every_operation_of_the_first_save(tmp_path: Path, key: bytes) -> None:
    """The very first save into an empty directory: a kill leaves an empty fresh start or the new state."""
    cases = crash_matrix(tmp_path, key=key, warmup=0)
    assert len(cases) >= 10
    assert [c for c in cases if not c.ok] == []
    assert {c.loaded.generation for c in cases if c.loaded is not None} == {0, 1}
    assert all(c.acked is None for c in cases)


def test_soak_random_kills(tmp_path: Path, key: bytes) -> None:
    """Kills at random moments of a save loop never lose an acknowledged save nor leave a mix."""
    cases = soak(tmp_path / "state", key=key, kills=8, seed=1)
    assert [c for c in cases if not c.ok] == []
    gens = [c.loaded.generation for c in cases if c.loaded is not None]
    assert gens == sorted(gens) and gens[-1] > gens[0]


def test_child_that_is_not_killed_acks_every_save(tmp_path: Path, key: bytes) -> None:
    """The child's protocol itself: each save is reported pending, then acked with the same digest."""
    run = run_child(tmp_path / "s", key=key, saves=3)
    assert run.returncode == 0
    assert run.acked is not None and run.acked[0] == 3 and run.pending is None
