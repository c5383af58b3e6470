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
    "import os, sys\nsys.stdin.readline()\nprint(os.getpriority(os.PRIO_PROCESS, 0))\n"
    "p = '/proc/thread-self/sched'\n"
    "lines = open(p).readlines() if os.path.exists(p) else []\n"
    "print(next((l.split(':')[1].strip() for l in lines if l.startswith('se.slice')), 'none'))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's nice value is Linux's")
def test_a_helper_started_lowered_has_the_low_share_once_started() -> None:
    """issue 14: ``start_lowered`` gives the process the low share as soon as ``Popen`` returns, so even a
    program that never lowers itself (no boot) runs its interpreter start and ``site`` at it (this one waits
    for a line first: what it prints is its share once the call returned), and the caller keeps its share."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    proc = priority.start_lowered(
        19,
        lambda: subprocess.Popen([sys.executable, "-S", "-c", _PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
    )
    out, _ = proc.communicate("\n", timeout=60)
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


def test_the_compaction_worker_and_the_server_process_are_lowered_as_they_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 14: the compaction (and backup-check) worker is given nice 19 and the server process the bot's
    nice + 10 by ``start_lowered`` as soon as each is started, before their boot (traced: a worker's
    interpreter start at the bot's priority made the bot's thread wait for a processor)."""
    from posstate.manager import procompaction

    real = priority.lower
    seen: list[tuple[int, int]] = []

    def recording(nice: int, pid: int = 0) -> bool:
        seen.append((nice, pid))
        return real(nice, pid)

    monkeypatch.setattr(priority, "lower", recording)
    worker = procompaction.Worker(b"", module="posstate.core.version")
    worker.kill()
    worker.proc.communicate(timeout=60)
    server = spawn.spawn(priority.target_nice(10))
    server.kill()
    server.communicate(timeout=60)
    assert seen == [(19, worker.proc.pid), (priority.target_nice(10), server.pid)]
