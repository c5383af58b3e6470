"""A worker (compaction, backup checks) takes the lowest processor share from its first statement (issue 14):
its interpreter start and imports, about 0.1 s of processor time per job, no longer run at the bot's priority,
where the scheduler let them keep a processor for a whole slice while the bot's thread, woken from its
``fdatasync``, waited (3-5 ms, traced).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posstate.manager import procompaction


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the boot needs python -P (3.11+); older ones run -m")
def test_the_worker_is_at_nice_19_before_it_imports_anything(tmp_path: Path) -> None:
    """issue 14: the module the worker runs sees niceness 19 (and, on Linux 6.12+, a 0.1 ms scheduler slice) at
    import time, and runs as ``__main__``."""
    (tmp_path / "probe_nice.py").write_text(
        "import os, sys\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), __name__, sys.argv[0].endswith('probe_nice.py'))\n"
        "try:\n"
        "    print(next(l.split(':')[1].strip() for l in open('/proc/self/sched') if l.startswith('se.slice')))\n"
        "except (OSError, StopIteration):\n"
        "    print('none')\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-P", "-c", procompaction._BOOT, "probe_nice"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    first, slice_ns = out.stdout.splitlines()
    assert first.split() == ["19", "__main__", "True"]
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    if sys.platform.startswith("linux") and release >= (6, 12) and slice_ns != "none":
        assert slice_ns == "100000"  # the shortest slice: a woken bot thread preempts it at once


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.version_info < (3, 11), reason="Linux scheduling policies")
def test_an_operators_batch_policy_stays_for_the_worker(tmp_path: Path) -> None:
    """issue 14 (review): a bot run under SCHED_BATCH (or SCHED_IDLE) keeps that policy for its worker; the
    boot lowers the priority, it never raises the worker to the normal policy."""
    (tmp_path / "probe_policy.py").write_text("import os\nprint(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}
    outer = (
        "import os, sys\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
        "os.execv(sys.executable, [sys.executable, '-P', '-c', sys.argv[1], 'probe_policy'])\n"
    )
    out = subprocess.run([sys.executable, "-c", outer, procompaction._BOOT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(os.SCHED_BATCH), "19"]
