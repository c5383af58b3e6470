"""Issue 14 attack (session 13, point 3): a prune's checks in chunks. A chunk that fails fails the prune (no
backup removed on a worker's say), but the verdicts of the chunks answered before it are kept: a chunk that
fails every time must not make every prune check every backup again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from backup_links import linked_backups

from posstate.core.errors import PersistenceError


def jobs_of_two(monkeypatch: pytest.MonkeyPatch, *, at_third: Any) -> tuple[Any, list[int]]:
    """Worker checks in jobs of two files; *at_third* runs on the checks before the third job is sent. Returns
    the checks and the size of each job sent."""
    from posstate.manager import procheck as _procheck

    monkeypatch.setattr(_procheck, "CHECK_CHUNK", 2)
    real = _procheck.WorkerChecks._check
    sent: list[int] = []

    def check(self: Any, files: list[Any], *a: Any, **kw: Any) -> Any:
        sent.append(len(files))
        if len(sent) == 3:
            at_third(self)
        return real(self, files, *a, **kw)

    monkeypatch.setattr(_procheck.WorkerChecks, "_check", check)
    return _procheck.WorkerChecks(), sent


def test_a_failing_chunk_keeps_the_verdicts_of_the_chunks_answered_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 attack (session 13, point 3): the third of three check jobs failed (its worker died) and the
    prune failed, as it must; but the verdicts of the two jobs answered were thrown away, so a chunk that fails
    every time (a worker the OOM killer takes on one backup) made every prune decrypt every backup again. They
    are remembered; the next prune sends only the failed chunk's files, and nothing is removed meanwhile."""
    from posstate.backup import verified as _verified
    from posstate.manager import procheck as _procheck

    folder, options = linked_backups(tmp_path, 5)

    def died(_checks: Any) -> None:
        raise _procheck._failed(folder, "exited with code -9 (0 bytes on stderr, not shown)")

    checks, sent = jobs_of_two(monkeypatch, at_third=died)
    cache = _verified.VerifiedCache(remote=checks)
    with pytest.raises(PersistenceError):
        _verified.check_all(folder, options=options, cache=cache)
    assert sent == [2, 2, 1]
    assert len(cache) == 4  # before: 0 (the answered chunks' verdicts were lost with the failure)
    assert all(cache.by_worker(n) for n in os.listdir(folder) if cache.lookup(n, _verified.probe(folder / n)))
    sent.clear()
    infos = _verified.check_all(folder, options=options, cache=cache)
    assert sent == [1] and len(infos) == 5 and all(i.valid for i in infos)
    assert len(list(folder.glob("positions_*.json"))) == 5


def test_checks_stopped_by_close_between_chunks_keep_the_chunks_answered_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """session 13: close() stops a prune's checks between two check jobs (the third finds the service
    stopped); the verdicts of the two jobs answered before are remembered, not thrown away with the stop."""
    from posstate.backup import verified as _verified
    from posstate.backup.closing import ChecksStopped

    folder, options = linked_backups(tmp_path, 5)
    # close(): this job and any later one are not started
    checks, sent = jobs_of_two(monkeypatch, at_third=lambda c: c.stop())

    def pause() -> None:
        if checks._stopped:
            raise ChecksStopped

    cache = _verified.VerifiedCache(remote=checks, pause=pause, stoppable=lambda: True)
    with pytest.raises(ChecksStopped):
        _verified.check_all(folder, options=options, cache=cache)
    assert sent == [2, 2, 1]
    assert len(cache) == 4  # before: 0 (the answered chunks' verdicts were lost with the stop)
