"""How long a benchmark's calls waited for a processor: the run-queue wait of the calling thread (Linux
``/proc/thread-self/schedstat``), read around each timed call, so a slow call can be told apart as waiting on
the disk or on the scheduler. Shared by bench_serve.py (issue 18) and bench_tail.py (issue 14)."""

from __future__ import annotations

import os
import statistics

from bench_journal import pct


class RunQueue:
    """Milliseconds the calling thread has waited for a processor so far (Linux ``/proc/thread-self/schedstat``,
    its second field; 0.0 where there is none): the part of a slow call spent runnable but not running. Create
    it on the thread it measures."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        return int(os.pread(self._fd, 256, 0).split()[1]) / 1e6

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def queued_report(took: list[float], queued: list[float], share: float = 0.01, what: str = "writes") -> str:
    """The run-queue wait of the calls: its percentile at 1 - *share*, and its median and total among the slowest
    *share* of the calls (*took* and *queued* in the same unit and order)."""
    q = 1 - share
    cut = pct(took, q)
    slow = [(w, t) for w, t in zip(queued, took, strict=True) if t >= cut]
    label = f"p{q * 100:g}"
    return (
        f"waited for a processor: {label} {pct(queued, q):.3f} ms, slowest {share * 100:g}% of {what} median "
        f"{statistics.median(w for w, _ in slow):.3f} ms ({sum(w for w, _ in slow) / sum(t for _, t in slow):.0%} of their time)"
    )
