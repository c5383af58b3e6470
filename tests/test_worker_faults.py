"""Faults in the compaction worker's own file operations (issue 14, "faults at each of their operations, once
and persistent", for the default ``compaction="process"``; an outside review of session 9 found only SIGKILL,
garbage and hangs injected into the worker): a full or failing disk under its temp's write, fsync or
read-back fails the attempt, which is reported and retried; no record is lost, no temp is left, the state file
is untouched until an attempt succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from posstate import PosStateError
from posstate.journal import compactjob as _job
from posstate.journal.files import next_path
from posstate.manager import procompaction as _proc
from tests.test_compaction_process import contracts, failed_attempt_then_retry, make, pos, temps

FAULTS = [
    pytest.param("write:28", id="ENOSPC-write"),
    pytest.param("fsync:5", id="EIO-fsync"),
    pytest.param("readback:5", id="EIO-readback"),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_once_in_the_workers_file_operations_fails_the_attempt_and_the_retry_compacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """issue 14 (faults, once): the worker's temp write, fsync or read-back failing fails the attempt (an
    ``error`` event naming the worker), its temp removed and the state file untouched; writers go on, and
    the next attempt compacts with every record."""
    failed_attempt_then_retry(tmp_path, monkeypatch, f"fault@{fault}", "worker failed")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_persistent_fault_in_the_worker_ends_with_the_compaction_done_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """issue 14 (faults, persistent): a worker whose disk keeps failing fails WORKER_TRIES attempts, each
    reported; the next attempt compacts in the bot's process (its own file operations, checked as a save's),
    and nothing is lost."""
    errors: list[dict[str, Any]] = []
    monkeypatch.setenv(_job.TEST_HOOK, f"fault@{fault}")
    with make(tmp_path) as m:
        m.on("error", errors.append)
        m.save()
        for i in range(6):
            m.set_position(pos(f"S{i}", i + 1))
        failed = 0
        for _ in range(_proc.WORKER_TRIES + 1):
            try:
                done = m.compact(wait=True)
            except PosStateError:
                failed += 1
                assert temps(m) == []
                continue
            break
        assert done and 1 <= failed <= _proc.WORKER_TRIES  # a wait may see a background retry's outcome
        assert not next_path(m.config.journal_path).exists() and temps(m) == []
        want = contracts(m)
    assert len(errors) == _proc.WORKER_TRIES and all("worker" in e["error"] for e in errors)
    monkeypatch.delenv(_job.TEST_HOOK)
    with make(tmp_path) as m:
        assert contracts(m) == want == {f"S{i}": i + 1 for i in range(6)}
