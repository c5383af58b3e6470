"""The processor share of posstate's helper processes (core/priority.py): the server process of ``serve()``
takes nice +10 and the shortest scheduler slice before it imports its web stack (issue 18), as the compaction
workers do (issue 14); every thread it starts inherits both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posstate import AccountStateStore
from posstate.core import priority
from posstate.serve import spawn
from tests.serve_support import require

ROOT = Path(__file__).resolve().parent.parent
_RELEASE = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2]) if hasattr(os, "uname") else ()
LINUX_6_12 = sys.platform.startswith("linux") and _RELEASE >= (6, 12)


def _slice(path: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("se.slice")), None)
    except OSError:
        return None


def test_a_planted_module_in_the_working_directory_never_runs_in_the_server_process(tmp_path: Path) -> None:
    """issue 18: the server process's program drops the working directory from sys.path *before* the boot
    imports ctypes, platform and struct: a ``ctypes.py`` planted in the bot's working directory (its state
    directory, say) is never imported by the server process."""
    marker = tmp_path / "ran"
    for name in ("ctypes", "platform", "struct"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    env = spawn.child_env(os.environ, str(ROOT), [])
    out = subprocess.run(
        [sys.executable, "-c", spawn.command(10)], cwd=tmp_path, env=env, input=b"", capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert not marker.exists()


def test_the_boot_never_raises_the_share_of_a_process_already_lower(tmp_path: Path) -> None:
    """A bot run at nice 15 gets a server process at 19 (its own + 10, at most 19), and a boot asking for
    less than the process has never lowers its nice value (it could not without privilege, and must not try)."""
    probe = "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    code = "import os, subprocess, sys\nos.nice(15)\nfrom posstate.core import priority\n"
    code += "print(priority.target_nice(10), flush=True)\n"
    code += "subprocess.run([sys.executable, '-c', priority.boot(5) + " + repr(probe) + "])\n"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["19", "15"]


def test_lower_gives_the_calling_process_the_nice_value_and_the_slice() -> None:
    """``priority.lower`` (used by a benchmark's clients) is the boot for a process already running."""
    code = "from posstate.core import priority\npriority.lower(7)\nimport os\nprint(os.getpriority(os.PRIO_PROCESS, 0))\n"
    code += "print(next((l.split(':')[1].strip() for l in open('/proc/thread-self/sched') if l.startswith('se.slice')), 'none')"
    code += " if os.path.exists('/proc/thread-self/sched') else 'none')\n"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nice, slice_ns = out.stdout.split()
    assert nice == "7"
    if LINUX_6_12 and slice_ns != "none":
        assert slice_ns == str(priority.SLICE_NS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_thread_of_the_server_process_runs_at_nice_10_with_the_shortest_slice() -> None:
    """issue 18: the server process (its event loop and the thread reading the bot's pipe included) runs at
    the bot's nice + 10 and, on Linux 6.12+, a 0.1 ms slice: a bot's thread woken from its ``fdatasync``
    preempts it (before, its imports of the web stack ran at the bot's own priority)."""
    require("starlette", "uvicorn", "prometheus_client")
    store = AccountStateStore()
    with store.serve(port=0) as server:
        pid = server.pid  # type: ignore[attr-defined]
        tasks = os.listdir(f"/proc/{pid}/task")
        assert len(tasks) >= 2  # the reader and the server's own thread(s)
        for tid in tasks:
            assert os.getpriority(os.PRIO_PROCESS, int(tid)) == priority.target_nice(10)
            if LINUX_6_12:
                seen = _slice(f"/proc/{pid}/task/{tid}/sched")
                assert seen in (None, str(priority.SLICE_NS))


_PROBE = (
    "import os\nprint(os.getpriority(os.PRIO_PROCESS, 0))\n"
    "p = '/proc/thread-self/sched'\n"
    "lines = open(p).readlines() if os.path.exists(p) else []\n"
    "print(next((l.split(':')[1].strip() for l in lines if l.startswith('se.slice')), 'none'))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value is Linux's")
def test_a_helper_started_lowered_has_the_low_share_from_its_first_instruction() -> None:
    """issue 14: ``start_lowered`` starts the process from a thread already at the low share, so even a
    program that never lowers itself (no boot) runs at it from its first instruction (the interpreter's start,
    ``site``), and the caller's own thread keeps its share."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    proc = priority.start_lowered(
        19, lambda: subprocess.Popen([sys.executable, "-S", "-c", _PROBE], stdout=subprocess.PIPE, text=True)
    )
    out, _ = proc.communicate(timeout=60)
    nice, slice_ns = out.split()
    assert nice == "19"
    if LINUX_6_12 and slice_ns != "none":
        assert slice_ns == str(priority.SLICE_NS)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine


def test_start_lowered_raises_what_the_start_raised_on_the_callers_thread() -> None:
    """issue 14: a start that fails (no such executable) raises its own exception to the caller, which turns it
    into its error (``ServeError``, a failed worker attempt)."""

    def start() -> subprocess.Popen[bytes]:
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/python")

    with pytest.raises(FileNotFoundError):
        priority.start_lowered(19, start)


def test_start_lowered_runs_on_the_calling_thread_where_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14: at interpreter shutdown (no new thread) or off Linux (where ``setpriority`` would lower the
    whole bot), the start runs on the calling thread, unlowered: the helper's boot still lowers it."""
    import threading

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    caller = threading.get_ident()

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    ran_on: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        ran_on.append(threading.get_ident())
        return subprocess.Popen([sys.executable, "-c", ""])

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        priority.start_lowered(19, start).wait(timeout=60)
    with monkeypatch.context() as m:
        m.setattr(sys, "platform", "darwin")
        priority.start_lowered(19, start).wait(timeout=60)
    assert ran_on == [caller, caller]
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value is Linux's")
def test_the_compaction_worker_and_the_server_process_are_started_from_a_lowered_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 14: the compaction (and backup-check) worker is started by a thread at nice 19 and the server
    process by one at the bot's nice + 10: what the child inherits before its first instruction (traced: a
    worker's interpreter start at the bot's priority made the bot's thread wait for a processor)."""
    from posstate.manager import procompaction

    real = subprocess.Popen
    seen: list[int] = []

    def recording(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))  # the starting thread's: what the child inherits
        return real(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", recording)
    worker = procompaction.Worker(b"", module="posstate.core.version")
    worker.kill()
    worker.proc.communicate(timeout=60)
    server = spawn.spawn(priority.target_nice(10))
    server.kill()
    server.communicate(timeout=60)
    assert seen == [19, priority.target_nice(10)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thread start is Linux's")
def test_an_interrupted_start_leaves_no_helper_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14: a Ctrl-C (``KeyboardInterrupt``) while ``serve()`` waits for the start of its server process:
    the process the start thread still created is killed and reaped, never left running unowned (it is in a
    session of its own: the terminal's Ctrl-C never reaches it)."""
    import signal
    import threading

    started: list[subprocess.Popen[bytes]] = []
    real_join = threading.Thread.join

    def interrupted(self: threading.Thread, timeout: float | None = None) -> None:
        real_join(self, timeout)
        if self.name == "posstate-start-helper" and not started[1:]:
            started.append(started[0])  # interrupt once
            raise KeyboardInterrupt

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        started.append(proc)
        return proc

    monkeypatch.setattr(threading.Thread, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        priority.start_lowered(19, start)
    assert started[0].returncode == -signal.SIGKILL
