"""Issue 14 (session 13): the worker processes, hardened. A worker's memory is not readable by another process
of the same user (``PR_SET_DUMPABLE`` 0, Linux), a kept worker that left idle is reaped and its pipes closed
without waiting for the next compaction, a kept worker stopped while it waits is replaced rather than handed a
job it would never answer, and a prune's checks of thousands of backups fit the answer's limit. Real worker
processes throughout; nothing here sleeps to wait for another thread or asserts a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")

#: Run in a child: it gives up CAP_SYS_PTRACE (for good: bounding, permitted and effective sets; nothing to
#: give up when not root), starts a worker, waits until the worker's main() began (it ignores SIGINT after its
#: first steps: posstate/journal/jobpipe.py prepare_process), then tries to open the worker's memory as any
#: other process of the same user would.
_READER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if os.geteuid() == 0:
    assert libc.prctl(24, 19, 0, 0, 0) == 0  # PR_CAPBSET_DROP CAP_SYS_PTRACE: the worker is started without it
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    assert libc.capget(hdr, data) == 0
    data[0] &= ~(1 << 19)
    data[1] &= ~(1 << 19)
    assert libc.capset(hdr, data) == 0
from posstate.manager.workers import Worker
w = Worker(b"", module=sys.argv[1])
status = f"/proc/{w.proc.pid}/status"
try:
    while True:
        assert w.proc.poll() is None, "the worker exited"
        with open(status) as f:
            ignored = int(next(x for x in f.read().splitlines() if x.startswith("SigIgn:")).split()[1], 16)
        if ignored & (1 << (signal.SIGINT - 1)):
            break
        os.sched_yield()
    try:
        os.close(os.open(f"/proc/{w.proc.pid}/mem", os.O_RDONLY))
        print("readable")
    except PermissionError:
        print("denied")
finally:
    w.discard()
"""


@linux_only
@pytest.mark.parametrize("module", ["posstate.journal.compactjob", "posstate.backup.checkjob"], ids=["compaction", "check"])
def test_another_process_of_the_same_user_cannot_read_a_workers_memory(module: str) -> None:
    """issue 14 (session 13, point 1): a worker holds the key (a kept one, freed copies of it for as long as it
    lives): it makes itself not dumpable before it reads its job, so /proc/<pid>/mem is closed to every process
    of the same user without CAP_SYS_PTRACE (and no core file is written, whatever handles cores)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _READER, module], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "denied"
