"""Issue 14 (tail): a prune's full checks of backups the bot's process never verified (all of them after a
restart) run in a worker process (posstate/backup/checkjob.py, posstate/manager/procheck.py) on the
compaction worker's plumbing. Real worker processes throughout; a step of the worker is hit through its
test-only hook (``POSSTATE_TEST_COMPACT_WORKER``). Nothing here sleeps to wait for another thread or asserts
a time.
"""

from __future__ import annotations

import os
import signal
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, PosStateError, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.backup.verified import Probe
from posstate.journal import compactjob as _job
from posstate.manager import procheck as _procheck
from posstate.storage import container as _format
from posstate.storage import statefile as _statefile

KEY = bytes(range(32))


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def make(d: Path, **kw: Any) -> PositionStateManager:
    kw.setdefault("backup_interval", 0.0)
    kw.setdefault("durability", "snapshot")
    kw.setdefault("max_backups", 20)
    return PositionStateManager(StateConfig.in_dir(d, **kw), key=KEY)


def backups(d: Path) -> list[Path]:
    return sorted((d / "backups").glob("positions_*.json"))


def with_backups(d: Path, n: int, **kw: Any) -> list[Path]:
    """*n* backups taken by a manager that is then closed, its verdict file removed: a new manager has verified
    none of them (backups copied in, or a lost verdict file; tests/test_verdict_file.py covers the kept ones)."""
    with make(d, **kw) as m:
        for i in range(n):
            m.save_positions([pos("A", i + 1), pos("B", 2)])
            assert m.wait_for_backups(30)
    (d / "positions.json.verdicts").unlink(missing_ok=True)
    found = backups(d)
    assert len(found) == n
    return found


def tamper_authenticated(path: Path) -> None:
    """A changed ciphertext under a recomputed SHA-256 trailer: only the key (AES-GCM) finds it (a prune
    cannot tell it from a file under another key: kept untouched, it fills no slot)."""
    data = path.read_bytes()
    body = bytearray(data[: -_format.TRAILER_SIZE])
    body[_format.HEADER_SIZE + 5] ^= 0x01
    path.write_bytes(bytes(body) + _format.trailer_for(bytes(body)))


class InProcess:
    """Test-only: counts the full checks run in the test's (the bot's) process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        real = _backups.full_check
        spy = self

        def counted(info: Any, **kw: Any) -> Any:
            spy.paths.append(info.path)
            return real(info, **kw)

        monkeypatch.setattr(_backups, "full_check", counted)


def cache(m: PositionStateManager) -> Any:
    return _background.service(m._files).cache


def test_a_restarted_bots_first_prune_checks_the_existing_backups_in_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (tail): after a restart the prune fully checks every existing backup in one worker process
    (none in the bot's process), fills the cache from its verdicts, and the next prune checks nothing."""
    old = with_backups(tmp_path, 4)
    spy = InProcess(monkeypatch)
    with make(tmp_path) as m:
        result = m.prune_old_backups()
        c = cache(m)
        assert spy.paths == [] and c.worker_checks == 4 and c.full_checks == 4
        assert c.remote is not None and c.remote.jobs == 1
        assert len(result.kept) == 4 and not result.removed and not result.quarantined
        assert all(c.by_worker(p.name) for p in old)
        m.prune_old_backups()
        assert c.full_checks == 4 and c.remote.jobs == 1


@pytest.mark.parametrize("damage", ["authenticated", "keyless"])
def test_a_damaged_backup_is_found_and_quarantined_never_kept_over_a_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """issue 14 (tail): the newest backup changed under a valid trailer (only AES-GCM finds it: the worker,
    then this process, since only a *valid* verdict is taken from a worker) fills no slot; with a broken
    trailer it is quarantined; either way a good one fills the slot (max_backups=1) and is checked here
    before the older one is removed."""
    old = with_backups(tmp_path, 3)
    victim = old[-1]  # the newest
    if damage == "authenticated":
        tamper_authenticated(victim)
    else:
        data = bytearray(victim.read_bytes())
        data[200] ^= 0x01
        victim.write_bytes(bytes(data))
    spy = InProcess(monkeypatch)
    with make(tmp_path, max_backups=1) as m:
        result = m.prune_old_backups()
        c = cache(m)
    kept_valid = [d.backup.path for d in result.kept if d.backup.valid]
    assert kept_valid == [old[1]] and [d.backup.path for d in result.removed] == [old[0]]
    if damage == "authenticated":
        assert not result.quarantined and backups(tmp_path) == [old[1], victim]
    else:
        assert [d.backup.path for d in result.quarantined] == [victim] and backups(tmp_path) == [old[1]]
    assert c.worker_checks == 2
    assert sorted(spy.paths) == sorted([victim, old[1]])


def test_a_lying_worker_cannot_make_the_prune_remove_the_last_valid_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14 (tail): a worker that calls every backup valid (here the newest is damaged) makes the prune
    keep the damaged one and plan to remove the good ones; the prune checks the newest kept backup in its
    own process first, removes nothing, and never asks a worker again; the next prune keeps a good one."""
    old = with_backups(tmp_path, 3)
    tamper_authenticated(old[-1])
    real = _procheck.WorkerChecks.check

    def lying(self: Any, files: list[tuple[str, Path, Probe]], options: Any, *, stoppable: bool, answered: Any = None) -> Any:
        real(self, files, options, stoppable=stoppable)  # a real worker runs; its answer is replaced
        return {name: seen for name, _, seen in files}

    monkeypatch.setattr(_procheck.WorkerChecks, "check", lying)
    with make(tmp_path, max_backups=1) as m:
        with pytest.raises(PosStateError, match="disagree"):
            m.prune_old_backups()
        assert backups(tmp_path) == old
        c = cache(m)
        assert c.remote is None and not any(c.by_worker(p.name) for p in old)
        result = m.prune_old_backups()
    assert [d.backup.path for d in result.kept if d.backup.valid] == [old[1]]
    assert backups(tmp_path) == old[1:]


@pytest.mark.parametrize("step", ["check", "checked"])
def test_sigkill_of_the_check_worker_fails_the_prune_and_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """issue 14 (tail): a check worker killed (SIGKILL) before or between its files fails the prune: nothing
    removed or quarantined, no verdict cached; the next prune checks again and succeeds."""
    old = with_backups(tmp_path, 3)
    tamper_authenticated(old[0])
    with make(tmp_path, max_backups=1) as m:
        monkeypatch.setenv(_job.TEST_HOOK, f"kill@{step}")
        with pytest.raises(PosStateError, match="code -9"):
            m.prune_old_backups()
        assert backups(tmp_path) == old and len(cache(m)) == 0
        monkeypatch.delenv(_job.TEST_HOOK)
        result = m.prune_old_backups()
    assert [d.backup.path for d in result.removed] == [old[1]] and backups(tmp_path) == [old[0], old[2]]


def test_a_backup_replaced_after_its_worker_check_is_checked_again(tmp_path: Path) -> None:
    """issue 14 (tail): a worker's verdict is bound to the probe taken before the check: a backup replaced
    (renamed over) afterwards is checked fully again and found bad."""
    old = with_backups(tmp_path, 3)
    with make(tmp_path) as m:
        m.prune_old_backups()
        c = cache(m)
        assert c.worker_checks == 3
        swap = old[1].with_name(".swap")
        swap.write_bytes(old[0].read_bytes())
        tamper_authenticated(swap)
        os.replace(swap, old[1])
        result = m.prune_old_backups()
        assert c.full_checks == 4
    assert [d.backup.valid for d in result.kept] == [True, False, True]


def test_a_verdict_for_a_file_that_changed_during_the_check_is_not_taken(tmp_path: Path) -> None:
    """issue 14 (tail): a verdict whose probe is not the one the manager took before the job (the file
    changed meanwhile) is not taken: the manager checks that file itself."""
    old = with_backups(tmp_path, 2)
    checks = _procheck.WorkerChecks()
    options = _statefile.ReadOptions(keyring=None)
    from posstate.backup.verified import probe

    seen = probe(old[0])
    assert seen is not None
    stale = Probe(trailer=seen.trailer, size=seen.size, mtime_ns=seen.mtime_ns - 1, ctime_ns=seen.ctime_ns, inode=seen.inode)
    from posstate.backup import verified as _verified

    c = _verified.VerifiedCache(remote=checks)
    with make(tmp_path) as m:
        options = m._read
    found = checks.check([(old[0].name, old[0], stale)], options, stoppable=False)
    assert found == {old[0].name: seen} and found[old[0].name] != stale
    infos = _verified.check_all(tmp_path / "backups", options=options, cache=c)
    assert all(i.valid for i in infos) and c.worker_checks == 2


def test_close_kills_a_check_worker_of_the_services_own_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (tail): close() kills (SIGKILL) a check worker running the background prune's checks at once
    (here a worker that would never answer), removes nothing, and releases the state."""
    old = with_backups(tmp_path, 3)
    started = threading.Event()
    workers: list[Any] = []
    real = _procheck.Worker

    class Worker(real):  # type: ignore[misc, valid-type]
        def __init__(self, message: bytes, module: str) -> None:
            super().__init__(message, module=module)
            workers.append(self)
            started.set()

    monkeypatch.setattr(_procheck, "Worker", Worker)
    monkeypatch.setenv(_job.TEST_HOOK, "hang@check")
    m = make(tmp_path, max_backups=1)
    try:
        m.save_positions([pos("C", 3)])  # a background backup, then its prune: the worker hangs
        assert started.wait(60)
    finally:
        m.close()
    assert workers[0].proc.wait(30) == -signal.SIGKILL
    assert set(old) <= set(backups(tmp_path))


def test_without_a_worker_the_prune_checks_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 (tail): with compaction="thread", or when no worker can be started, the prune's full checks
    run in the bot's process as before."""
    old = with_backups(tmp_path, 2)
    spy = InProcess(monkeypatch)
    with make(tmp_path, compaction="thread") as m:
        m.prune_old_backups()
        assert cache(m).remote is None and cache(m).worker_checks == 0
    assert sorted(spy.paths) == old

    def no_process(*a: Any, **k: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(_procheck, "Worker", no_process)
    spy.paths.clear()
    (tmp_path / "positions.json.verdicts").unlink()  # the first manager kept its verdicts: none here
    with make(tmp_path) as m:
        m.prune_old_backups()
        assert cache(m).worker_checks == 0 and cache(m).full_checks == 2
    assert sorted(spy.paths) == old
