"""Session 13 attack on the glue between the verdict file, the chunked worker checks and the prune."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backup_links import linked_backups


def test_a_local_check_stopped_after_the_workers_answer_keeps_every_worker_verdict(tmp_path: Path) -> None:
    """issue 14.2 attack (session 13 glue): the worker answered every job, then close() stopped the prune in the
    first file it checks here (one the worker did not find valid); the worker's verdicts for the files listed
    after it were thrown away with the stop (a bot restarted then checked them all again in the worker)."""
    from posstate.backup import verified as _verified
    from posstate.backup.closing import ChecksStopped

    folder, options = linked_backups(tmp_path, 5)
    first = os.listdir(folder)[0]  # check_all's order: the first file listed is the one checked here
    answered_all: list[bool] = []

    class Remote:
        def check(
            self,
            files: list[tuple[str, Path, _verified.Probe]],
            options: Any,
            *,
            stoppable: bool,
            answered: Callable[[dict[str, _verified.Probe]], None] | None = None,
        ) -> dict[str, _verified.Probe]:
            found = {name: seen for name, _path, seen in files if name != first}
            if answered is not None:
                answered(found)
            answered_all.append(True)
            return found

        def stop(self) -> None:
            pass

    def pause() -> None:
        if answered_all:
            raise ChecksStopped

    cache = _verified.VerifiedCache(pause, remote=Remote())
    with pytest.raises(ChecksStopped):
        _verified.check_all(folder, options=options, cache=cache)
    named = [n for n in os.listdir(folder) if n != first]
    assert all(cache.lookup(n, _verified.probe(folder / n)) is not None for n in named)  # before: none of them
    assert all(cache.by_worker(n) for n in named)
    assert cache.lookup(first, _verified.probe(folder / first)) is None


def test_a_verdict_file_read_that_raised_is_read_again_not_set_aside_as_planted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack (session 13 glue): reading the verdict file raised something other than OSError (a
    MemoryError in the passphrase's key derivation, a KeyboardInterrupt); the cache counted the file as read,
    so the next prune's write found a file this manager 'never read' and moved the bot's own file to quarantine
    as planted (an error event, every verdict lost). The next prune reads it again and trusts it."""
    from test_verdict_file import KEY, cfg_in, with_backups

    from posstate import PositionStateManager
    from posstate.backup import ledger as _ledger

    with_backups(tmp_path, 3)
    verdicts = _ledger.verdicts_path(cfg_in(tmp_path))
    before = verdicts.read_bytes()
    real = _ledger.VerdictFile._mac_key
    calls: list[int] = []

    def mac_key(self: Any, salt: bytes, log2_n: int) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError
        return real(self, salt, log2_n)

    monkeypatch.setattr(_ledger.VerdictFile, "_mac_key", mac_key)
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), key=KEY) as m:
        errors: list[dict[str, Any]] = []
        m.on("error", errors.append)
        with pytest.raises(MemoryError):
            m.prune_old_backups()
        m.prune_old_backups()
        assert errors == []  # before: "changed since this manager read or wrote it; moved to quarantine"
    quarantine = tmp_path / "quarantine"
    assert not (quarantine.exists() and any("verdicts" in n for n in os.listdir(quarantine)))
    assert verdicts.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_of_a_bot_never_prunes_nor_writes_the_verdict_file(tmp_path: Path) -> None:
    """issue 14.2 attack (session 13 glue): a child forked from a bot (no exec) calls prune_old_backups, real
    and dry run: both are refused (the manager is the parent's) and the parent's verdict file is untouched."""
    from test_verdict_file import KEY, cfg_in, with_backups

    from posstate import PositionStateManager, StateLockedError
    from posstate.backup import ledger as _ledger

    with_backups(tmp_path, 3)  # the manager below (max_backups=1): a prune would remove two backups
    verdicts = _ledger.verdicts_path(cfg_in(tmp_path))
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9, max_backups=1), key=KEY) as m:
        m.load_positions()
        before = (verdicts.read_bytes(), os.stat(verdicts).st_ino, os.stat(verdicts).st_mtime_ns)
        backups = sorted(os.listdir(tmp_path / "backups"))
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            for dry_run in (True, False):
                try:
                    m.prune_old_backups(dry_run=dry_run)
                    code = 1
                except StateLockedError:
                    pass
                except BaseException:
                    code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (verdicts.read_bytes(), os.stat(verdicts).st_ino, os.stat(verdicts).st_mtime_ns) == before
        assert sorted(os.listdir(tmp_path / "backups")) == backups
        assert len(m.prune_old_backups().removed) == 2  # the parent's prune does remove them
    assert not [n for n in os.listdir(tmp_path) if n.startswith(verdicts.name) and n != verdicts.name]


def test_a_prune_left_running_by_close_never_writes_the_next_bots_verdict_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack (session 13 glue): close() gave up waiting for a background prune stuck in a file
    operation and released the writer lock; the next bot wrote its verdict file; when the old prune went on, it
    was stopped (ChecksStopped) and its keep() moved the new bot's file to quarantine as planted and wrote its
    own. A prune left running by close() writes no verdict file."""
    import threading

    from test_verdict_file import KEY, cfg_in, pos, with_backups

    from posstate import PositionStateManager
    from posstate.backup import background as _background
    from posstate.backup import backups as _backups
    from posstate.backup import ledger as _ledger

    with_backups(tmp_path, 2)
    verdicts = _ledger.verdicts_path(cfg_in(tmp_path))
    real = _backups.inspect_file
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    def inspect_file(*a: Any, **kw: Any) -> Any:
        if armed.is_set() and threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(_backups, "inspect_file", inspect_file)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.05)
    old = PositionStateManager(cfg_in(tmp_path), key=KEY)
    old.load_positions()
    svc = _background.service(old._files)
    old.prune_old_backups()
    one = sorted((tmp_path / "backups").glob("positions_*.json"))[0]
    os.link(one, one.with_name(f"{one.name[:-5]}_9.json"))  # a backup no check has seen: the prune checks it
    armed.set()
    old.save_positions([pos("B", 1)])  # a timed backup (interval 0), then its prune: stuck in inspect_file
    assert entered.wait(60)
    thread = svc._thread
    old.close()  # gives up waiting (its deadline passed), releases the writer lock
    armed.clear()
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), key=KEY) as new:
        errors: list[dict[str, Any]] = []
        new.on("error", errors.append)
        new.load_positions()
        new.prune_old_backups()
        mine = verdicts.read_bytes()
        release.set()
        assert thread is not None
        thread.join(60)
        assert not thread.is_alive()
        assert verdicts.read_bytes() == mine  # before: the old prune quarantined it and wrote its own
        new.prune_old_backups()
        assert errors == []
    quarantine = tmp_path / "quarantine"
    assert not (quarantine.exists() and any("verdicts" in n for n in os.listdir(quarantine)))


def test_read_only_commands_and_a_refused_prune_never_write_the_verdict_file(tmp_path: Path) -> None:
    """issue 14.2 attack (session 13 glue): validate, backups verify, backups list and a dry-run prune (the bot
    stopped), and backups prune while the bot runs (refused), with a passphrase: none of them writes, replaces
    or quarantines the verdict file."""
    from test_attack_14_verdicts import PASS, with_backups
    from test_cli import run
    from test_verdict_file import cfg_in

    from posstate import PositionStateManager
    from posstate.backup import ledger as _ledger

    with_backups(tmp_path, 3, passphrase=PASS)
    verdicts = _ledger.verdicts_path(cfg_in(tmp_path))

    def seen() -> tuple[bytes, int, int]:
        st = os.stat(verdicts)
        return verdicts.read_bytes(), st.st_ino, st.st_mtime_ns

    before = seen()
    env: dict[str, str | None] = {"POSSTATE_PASSPHRASE": PASS}
    base = ["--state-dir", str(tmp_path)]
    for args in (["validate"], ["backups", "verify"], ["backups", "list"], ["backups", "prune", "--dry-run"]):
        r = run(base + args, env=env)
        assert r.exit_code == 0, (args, r.stderr)
        assert seen() == before, args
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), passphrase=PASS) as m:
        m.load_positions()
        r = run([*base, "backups", "prune", "--yes"], env=env)
        assert r.exit_code != 0 and "Error:" in r.stderr
        assert seen() == before
    assert not (tmp_path / "quarantine").exists() or not os.listdir(tmp_path / "quarantine")


def test_a_prune_left_running_by_close_removes_no_backup_after_the_lock_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack (session 13 glue): close() gave up waiting for a background prune stuck in a file
    operation (every verdict cached: no check left for close() to stop) and released the writer lock; the
    prune then went on and removed backups, a write without the writer lock while the next bot runs."""
    import threading

    from test_verdict_file import KEY, cfg_in, pos, with_backups

    from posstate import PositionStateManager
    from posstate.backup import background as _background
    from posstate.backup import verified as _verified

    with_backups(tmp_path, 3)
    real = _verified.probe
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()

    def probe(path: Path) -> Any:
        if armed.is_set() and threading.current_thread() is not threading.main_thread():
            armed.clear()
            entered.set()
            release.wait(60)
        return real(path)

    monkeypatch.setattr(_verified, "probe", probe)
    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.05)
    old = PositionStateManager(cfg_in(tmp_path, max_backups=2), key=KEY)
    old.load_positions()
    svc = _background.service(old._files)
    armed.set()
    old.save_positions([pos("B", 1)])  # a timed backup (interval 0), then its prune: stuck in probe
    assert entered.wait(60)
    thread = svc._thread
    old.close()  # gives up waiting (its deadline passed), releases the writer lock
    folder = tmp_path / "backups"
    left = sorted(os.listdir(folder))
    assert len(left) > 2  # the prune would remove some
    release.set()
    assert thread is not None
    thread.join(60)
    assert not thread.is_alive()
    assert sorted(os.listdir(folder)) == left  # before: the old prune removed backups after close()
