"""Issue 18 attack on the helpers' boot (core/priority.py): the server process's and the workers' first
statements. A helper never runs code planted in the bot's working directory, never keeps a real-time policy
inherited from the bot, and boots the same way on every supported Python."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from posstate.core import priority
from posstate.manager import procompaction
from posstate.serve import spawn

ROOT = Path(__file__).resolve().parent.parent
LINUX = sys.platform.startswith("linux")


def _plant(folder: Path) -> Path:
    """Modules the boot or the interpreter's start would import, each leaving a mark when it runs."""
    marker = folder / "ran"
    for name in ("ctypes", "platform", "struct", "runpy", "sitecustomize", "usercustomize"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + ' ')\n")
    return marker


@pytest.mark.parametrize(
    "pythonpath",
    [
        pytest.param(":{other}", id="leading-empty-entry"),
        pytest.param("{other}::{other}", id="empty-entry-between"),
        pytest.param(".", id="dot"),
        pytest.param("./", id="dot-slash"),
    ],
)
def test_a_pythonpath_entry_meaning_the_working_directory_never_runs_planted_code_in_the_server_process(
    tmp_path: Path, pythonpath: str
) -> None:
    """issue 18 attack: ``export PYTHONPATH=$PYTHONPATH:/opt/bot`` with PYTHONPATH unset leaves an empty entry,
    which Python reads as the working directory (the bot's, its state directory say): a ``ctypes.py`` or
    ``sitecustomize.py`` planted there ran in the server process before (the program only dropped the ``''``
    that ``-c`` puts first)."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    marker = _plant(work)
    environ = {**os.environ, "PYTHONPATH": pythonpath.format(other=other)}
    env = spawn.child_env(environ, str(ROOT), [])
    out = subprocess.run([sys.executable, "-c", spawn.command(10)], cwd=work, env=env, input=b"", capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert not marker.exists(), marker.read_text()
    assert str(other) in env["PYTHONPATH"].split(os.pathsep) or pythonpath in (".", "./")


def _fake_fifo(machine: str, *, can_leave: bool = True, setpriority_fails: bool = False) -> str:
    """A prefix for a ``-c`` program: the process believes it runs under SCHED_FIFO (no privilege needed), on
    *machine*; leaving the policy works or is refused."""
    code = [
        "import os, platform",
        "_state = [os.SCHED_FIFO]",
        "os.sched_getscheduler = lambda pid: _state[0]",
        f"platform.machine = lambda: {machine!r}",
    ]
    if can_leave:
        code.append("def _set(pid, policy, param):\n    _state[0] = policy")
    else:
        code.append("def _set(pid, policy, param):\n    raise PermissionError(1, 'denied')")
        code.append("import ctypes\nctypes.CDLL = None")  # the raw syscall is refused too
    code.append("os.sched_setscheduler = _set")
    if setpriority_fails:
        code.append("def _deny(*args):\n    raise PermissionError(1, 'denied')\nos.setpriority = _deny")
    return "\n".join(code) + "\n"


@pytest.mark.skipif(not LINUX, reason="Linux scheduling policies")
@pytest.mark.parametrize(
    ("machine", "setpriority_fails"),
    [
        pytest.param("riscv64", False, id="no-syscall-number"),
        pytest.param("ppc64le", True, id="no-syscall-number-and-setpriority-refused"),
        pytest.param("x86_64", True, id="setpriority-refused"),
    ],
)
def test_a_real_time_bot_never_gives_its_helper_a_real_time_policy(machine: str, setpriority_fails: bool) -> None:
    """issue 18 attack: a bot under SCHED_FIFO/RR gives its helpers (server process, workers) the normal policy
    on every machine: before, the boot left the real-time policy alone where it had no ``sched_setattr`` number
    (32-bit builds, riscv64, ppc64le, s390x ...) or when ``setpriority`` failed first (a container's seccomp),
    and a helper spinning at a real-time priority can keep the bot off its processor."""
    probe = "print(_state[0])\n"
    code = _fake_fifo(machine, setpriority_fails=setpriority_fails) + priority.boot(19) + probe
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(os.SCHED_OTHER)]


@pytest.mark.skipif(not LINUX, reason="Linux scheduling policies")
def test_a_helper_that_cannot_leave_a_real_time_policy_refuses_to_run() -> None:
    """issue 18 attack: where neither ``sched_setscheduler`` nor ``sched_setattr`` lets the helper leave the
    bot's real-time policy, the boot ends the process (exit 1, the reason on stderr) before it imports
    anything: the server process then fails its start (``ServeError``), a worker its attempt (the bot
    compacts in process); before, the helper ran on at a real-time priority."""
    code = _fake_fifo("x86_64", can_leave=False) + priority.boot(19) + "print('ran')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "ran" not in out.stdout
    assert "real-time" in out.stderr


def _can_fifo() -> bool:
    code = "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n"
    return LINUX and subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _can_fifo(), reason="setting SCHED_FIFO needs CAP_SYS_NICE or an RLIMIT_RTPRIO")
@pytest.mark.parametrize("machine", [pytest.param(None, id="this-machine"), pytest.param("riscv64", id="no-syscall")])
def test_a_real_fifo_bots_server_process_runs_under_the_normal_policy(machine: str | None) -> None:
    """issue 18 attack: the same with a real SCHED_FIFO parent and the server process's own program."""
    fake = f"import platform\nplatform.machine = lambda: {machine!r}\n" if machine else ""
    program = spawn.command(10).replace("from posstate.serve.child import main\nsys.exit(main())\n", "")
    probe = "import os\nprint(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))\n"
    code = "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n" + fake + program + probe
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(os.SCHED_OTHER), "10"]


def test_on_python_3_10_the_worker_boots_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 18 attack (14): on Python 3.10 (no ``-P``) the worker ran ``python -m`` without the boot: its
    interpreter start and imports at the bot's priority, a real-time policy kept. It now runs the boot there
    too, the working directory dropped from ``sys.path`` by the program itself."""
    seen: list[list[str]] = []

    class _Popen:
        pid = 0  # no process: nothing to lower
        stdin = stdout = stderr = None

        def __init__(self, cmd: list[str], **kwargs: Any) -> None:
            seen.append(cmd)

        def kill(self) -> None:  # the worker handle's reaper, when it is dropped
            pass

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", _Popen)
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    procompaction.Worker(b"")
    monkeypatch.undo()
    cmd = seen[0]
    assert "-P" not in cmd
    assert cmd[1:] == ["-c", procompaction._BOOT, procompaction._MODULE]


def _python_3_10() -> str | None:
    """A Python 3.10 that runs (on PATH, or one pyenv installed)."""
    found = [shutil.which("python3.10"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))]
    for exe in filter(None, found):
        if subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


@pytest.mark.skipif(not LINUX or _python_3_10() is None, reason="no Python 3.10 (on PATH or under ~/.pyenv)")
def test_the_worker_boot_runs_on_a_real_python_3_10(tmp_path: Path) -> None:
    """issue 18 attack (14): the boot is Python 3.10 source, and on 3.10 the probe module runs as
    ``__main__`` at nice 19, and a ``runpy.py`` in the worker's working directory is never imported."""
    (tmp_path / "probe_nice.py").write_text("import os\nprint(os.getpriority(os.PRIO_PROCESS, 0), __name__)\n")
    work = tmp_path / "work"
    work.mkdir()
    marker = _plant(work)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [str(_python_3_10()), "-c", procompaction._BOOT, "probe_nice"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["19", "__main__"]
    assert not marker.exists()


def test_no_virtual_environment_is_tracked() -> None:
    """issue 18 attack: the commit of the boot added ``.venv``, a symbolic link to one machine's absolute
    path, to the repository (``.gitignore``'s ``.venv/`` matches only a directory): a fresh clone got a
    dangling link where CI creates its virtual environment."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--", ".venv"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert ".venv" in (ROOT / ".gitignore").read_text().split()
