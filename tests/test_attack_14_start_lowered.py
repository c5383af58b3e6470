"""Issue 14 attack on ``priority.start_lowered``: the start of a helper never runs on a thread at the helper's low
share (that thread holds the bot's interpreter lock), and the helper has the low share once it returns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from posstate.core import priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value is Linux's")

_WAIT = "import sys\nsys.stdin.readline()\n"


def test_the_start_never_holds_the_interpreter_lock_at_the_helpers_low_share() -> None:
    """issue 14 attack: ``Popen`` (the interpreter lock held throughout, the vforked child's exec included) runs
    on the caller's thread at the caller's share, never on a nice-19 thread a busy machine preempts while the
    bot's threads wait for that lock (measured: 155-175 ms stalls against 8 ms), and the helper has the low
    share once the call returns, its interpreter start still ahead of it."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[tuple[int, int]] = []

    def start() -> subprocess.Popen[bytes]:
        seen.append((threading.get_ident(), os.getpriority(os.PRIO_PROCESS, 0)))
        return subprocess.Popen([sys.executable, "-S", "-c", _WAIT], stdin=subprocess.PIPE)

    proc = priority.start_lowered(19, start)
    try:
        assert seen == [(threading.get_ident(), mine)]
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19  # its main thread: every later thread inherits it
    finally:
        proc.communicate(b"\n", timeout=60)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine


def test_a_ctrl_c_while_the_helper_is_lowered_leaves_no_helper_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 attack: a ``KeyboardInterrupt`` after the process started (while it is being lowered) kills and
    reaps it before the interrupt goes on: no helper is left running unowned."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _WAIT], stdin=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc

    def interrupted(nice: int, pid: int = 0) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(priority, "lower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        priority.start_lowered(19, start)
    assert len(started) == 1 and started[0].returncode == -signal.SIGKILL


def _first_statement_policy(policy: int) -> tuple[int, int]:
    """The policy a helper started (``start_lowered(19, ...)``) by a thread under *policy*, pinned to one
    processor, has at its first statement, and its nice value once started; skipped where that policy is not
    permitted."""
    probe = (
        "import os, sys\nprint(os.sched_getscheduler(0), flush=True)\nsys.stdin.readline()\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    )
    box: list[object] = []

    def run() -> None:
        try:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            os.sched_setscheduler(0, policy, os.sched_param(1))
        except PermissionError as exc:
            box.append(exc)
            return
        try:
            proc = priority.start_lowered(
                19,
                lambda: subprocess.Popen(
                    [sys.executable, "-S", "-c", probe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                ),
            )
            box.append(proc.communicate("\n", timeout=60)[0])
            box.append(os.sched_getscheduler(0))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(box[0], PermissionError):
        pytest.skip("setting a real-time policy is not permitted here (needs CAP_SYS_NICE or RLIMIT_RTPRIO)")
    if isinstance(box[0], BaseException):
        raise box[0]
    assert box[1] == policy  # the caller keeps its own policy
    got, nice = str(box[0]).split()
    return int(got), int(nice)


@pytest.mark.parametrize("policy", ["SCHED_FIFO", "SCHED_RR"])
def test_a_real_time_caller_starts_the_helper_under_the_normal_policy(policy: str) -> None:
    """issue 14 attack: a bot thread under a real-time policy (pinned to one processor) starting a helper: the
    helper's interpreter start runs under the normal policy, not the bot's (a real-time helper there kept an
    equal-priority bot thread off the processor until its first statement lowered it), at nice 19 once
    started, and the caller keeps its policy."""
    assert _first_statement_policy(getattr(os, policy)) == (os.SCHED_OTHER, 19)


@pytest.mark.parametrize("where", ["thread start", "wait"])
def test_a_ctrl_c_during_a_real_time_callers_start_leaves_no_helper_running(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """issue 14 attack: a ``KeyboardInterrupt`` while a real-time caller's start thread is being started (its
    ``start()`` waits for the thread to run: before, the thread then started the helper and nobody owned it)
    or waited for: the thread kills and reaps the helper it starts, and the interrupt goes on at once."""
    started: list[subprocess.Popen[bytes]] = []
    go = threading.Event()

    def start() -> subprocess.Popen[bytes]:
        go.wait(timeout=60)
        proc = subprocess.Popen([sys.executable, "-S", "-c", _WAIT], stdin=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc

    real_start, real_wait = threading.Thread.start, threading.Event.wait
    threads: list[threading.Thread] = []
    starting = [False]

    def recording_start(self: threading.Thread) -> None:
        threads.append(self)
        starting[0] = True
        try:
            real_start(self)
        finally:
            starting[0] = False
        if where == "thread start":
            raise KeyboardInterrupt

    def interrupted_wait(self: threading.Event, timeout: float | None = None) -> bool:
        if where == "wait" and self is not go and not starting[0]:
            raise KeyboardInterrupt
        return real_wait(self, timeout)

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", recording_start)
        m.setattr(threading.Event, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            priority._off_real_time(start)
    go.set()
    threads[0].join(timeout=60)
    assert len(started) == 1 and started[0].returncode == -signal.SIGKILL


def _autogroup(pid: int | str) -> tuple[str, int] | None:
    """(group, nice) of /proc/<pid>/autogroup: ``/autogroup-N nice K``; None without autogroup scheduling."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            group, _, nice = f.read().split()
    except (OSError, ValueError):
        return None
    return group, int(nice)


def test_the_server_process_in_its_own_session_yields_as_a_group_too() -> None:
    """issue 18 attack (14): with autogroup scheduling (``CONFIG_SCHED_AUTOGROUP``, on by default in many
    distributions) the server process's new session is a scheduling group of its own at nice 0, competing
    with the bot's whole group as an equal whatever its own nice value (measured, one processor: a nice-19
    busy child in a new session took 0.50 s of 1 s from a nice-0 bot, 0.01 s in the bot's session). Its group
    now takes the server process's nice value."""
    from posstate.serve import spawn

    mine = _autogroup("self")
    if mine is None:
        pytest.skip("this kernel schedules without autogroups (no /proc/self/autogroup)")
    nice = priority.target_nice(10)
    server = spawn.spawn(nice)
    try:
        group = _autogroup(server.pid)
        assert group is not None and group[0] != mine[0]  # a group of its own: its session's
        assert group[1] == max(nice, mine[1])
    finally:
        server.kill()
        server.communicate(timeout=60)


def test_the_group_nice_never_lowers_the_bots_own_group() -> None:
    """issue 18 attack (14): a process in the bot's own session (its scheduling group) keeps that group's nice
    value: lowering it would lower the bot (and its terminal's other processes) with it."""
    from posstate.serve import spawn

    mine = _autogroup("self")
    if mine is None:
        pytest.skip("this kernel schedules without autogroups (no /proc/self/autogroup)")
    proc = subprocess.Popen([sys.executable, "-S", "-c", _WAIT], stdin=subprocess.PIPE)
    try:
        spawn.group_nice(proc.pid, 19)
        assert _autogroup(proc.pid) == mine
        assert _autogroup("self") == mine
    finally:
        proc.communicate(b"\n", timeout=60)
