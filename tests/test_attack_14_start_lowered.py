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
