"""An outside review of issue 14.2 (timed backups on a background thread, the verified-backup cache), tried as an
attacker: a forked child, a wrong clock, a thread that cannot start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from posstate import PositionStateManager
from tests.test_background_backups import KEY, cfg_in, listing, pos, record, service

ROOT = Path(__file__).resolve().parents[1]

_FORK = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from tests.test_background_backups import BlockInBackground, KEY, cfg_in, listing, pos, request_backup, service
    from posstate import PositionStateManager, StateLockedError
    from posstate.storage import fileops as fs

    d, what = Path(sys.argv[1]), sys.argv[2]
    m = PositionStateManager(cfg_in(d), key=KEY)
    m.save_positions([pos("A")])
    assert m.wait_for_backups(30)
    svc = service(m)
    block = BlockInBackground("fsync")
    held, go = threading.Event(), threading.Event()

    def hold_cond():
        with svc._cond:  # as the backup thread does in _next() and at the end of _run_one()
            held.set()
            go.wait(60)

    with fs.use(block):
        request_backup(m)
        assert block.reached.wait(30)  # the backup thread holds the folder lock, mid-copy
        if what == "exit":
            threading.Thread(target=hold_cond, daemon=True).start()
            assert held.wait(30)
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a deadlock in the child ends as SIGALRM, not a hung test
            code = 0
            try:
                if what == "create":
                    m.create_backup()
                    code = 10
                elif what == "prune":
                    m.prune_old_backups()
                    code = 10
                elif what == "restore":
                    m.restore_from_backup("latest", accept_older=True)
                    code = 10
                elif what == "wait":
                    code = 0 if m.wait_for_backups() else 11
            except StateLockedError:
                code = 0
            if what == "exit":
                sys.exit(0)  # a normal exit: atexit handlers and weakref finalizers run
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        go.set()
        block.release.set()
        assert m.wait_for_backups(30)
    names = listing(d)
    m.close()
    with PositionStateManager(cfg_in(d), key=KEY) as again:
        valid = [b.valid for b in again.list_backups()]
    print(json.dumps({"status": os.waitstatus_to_exitcode(status), "backups": len(names), "valid": all(valid)}))
    """
)


@pytest.mark.parametrize("what", ["create", "prune", "restore", "wait", "exit"])
def test_forked_child_never_deadlocks_on_the_backup_threads_locks(tmp_path: Path, what: str) -> None:
    """issue 14.2 (attack): a child forked while the backup thread holds the folder lock (or its condition)
    refuses backup operations at once, its wait_for_backups() and normal exit never hang; the parent's backup completes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _FORK, str(tmp_path / "state"), what, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"status": 0, "backups": 2, "valid": True}, proc.stderr


def test_clock_stepped_back_does_not_stop_timed_backups(tmp_path: Path) -> None:
    """issue 14.2 (attack): after the clock is stepped back a day, timed backups resume after backup_interval
    (not after the day), and do not run at every save."""
    with PositionStateManager(cfg_in(tmp_path, backup_interval=600), key=KEY) as m:
        created = record(m, "backupCreated")
        svc = service(m)
        t = [time.time()]
        svc.clock = lambda: t[0]
        m.save_positions([pos("A")])
        assert m.wait_for_backups(30) and len(created) == 1
        t[0] -= 86_400  # NTP steps the clock back a day
        m.save_positions([pos("A", 2)])
        assert m.wait_for_backups(30)
        t[0] += 601
        m.save_positions([pos("A", 3)])
        assert m.wait_for_backups(30)
        n = len(created)
        assert n >= 2, "no timed backup for a day after the clock was stepped back"
        m.save_positions([pos("A", 4)])
        m.save_positions([pos("A", 5)])
        assert m.wait_for_backups(30) and len(created) == n, "a timed backup at every save"


def test_clock_stepped_back_after_a_failure_does_not_stop_retries(tmp_path: Path) -> None:
    """issue 14.2 (attack): a backup failed, then the clock was stepped back a day: the retry comes after
    backup_interval, not after the day."""
    from posstate.storage import fileops as fs
    from tests.test_background_backups import FailInBackground

    with PositionStateManager(cfg_in(tmp_path, backup_interval=600), key=KEY) as m:
        failed, created = record(m, "backupFailed"), record(m, "backupCreated")
        svc = service(m)
        t = [time.time()]
        svc.clock = lambda: t[0]
        with fs.use(FailInBackground()):
            m.save_positions([pos("A")])
            assert m.wait_for_backups(30) and len(failed) == 1
        t[0] -= 86_400
        m.save_positions([pos("A", 2)])
        assert m.wait_for_backups(30)
        t[0] += 601
        m.save_positions([pos("A", 3)])
        assert m.wait_for_backups(30)
        assert created, "no retry for a day after the clock was stepped back"


def test_a_backup_thread_that_cannot_start_never_fails_the_save_or_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.2 (attack): threading cannot start the backup thread (thread limit): the durable save still
    returns, the failure is reported, close() releases the lock, and a later request starts the thread."""
    m = PositionStateManager(cfg_in(tmp_path), key=KEY)
    failed, created = record(m, "backupFailed"), record(m, "backupCreated")

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as mp:
        mp.setattr(threading.Thread, "start", refuse)
        m.save_positions([pos("A")])  # durable: must not raise
    assert failed and not created
    service(m)._retry_at = float("-inf")  # the retry interval has passed
    m.save_positions([pos("A", 2)])
    assert m.wait_for_backups(30) and created and listing(tmp_path)
    m.close()
    PositionStateManager(cfg_in(tmp_path), key=KEY).close()  # the writer lock was released
