"""The processor share of posstate's helper processes (compaction and backup-check workers, the server process):
the bot's threads come first.

Traced on a 2-core machine (issue 14): a bot's thread woken from its ``fdatasync`` waited 3-5 ms for a
processor while a helper process finished its scheduler slice, at nice 19 as well (the scheduler lets a running
task finish its slice before a woken one preempts it). So a helper takes a low share (its nice value) *and*, on
Linux 6.12 and later, the shortest slice (0.1 ms, ``sched_setattr``; older kernels ignore the request and keep
their default), from its first statement: :func:`boot` is that statement, as source code run by ``python -c``
before anything is imported (the interpreter start and imports cost about 0.1 s of processor time), and
:func:`start_lowered` gives the helper that share from outside as soon as it is started, so the interpreter's own
start (before its first statement) runs at it too.

An operator's ``SCHED_BATCH`` or ``SCHED_IDLE`` policy stays; any other policy becomes the normal one (never a
real-time one inherited from the bot: a helper that cannot leave it ends instead). Everything else is best
effort: where it is not permitted or not supported, the helper runs at the share it inherited. Standard library
only: the boot runs before posstate is importable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import threading
from collections.abc import Callable
from types import CodeType
from typing import Any, TypeVar

__all__ = ["SLICE_NS", "boot", "lower", "start_lowered", "target_nice"]

_P = TypeVar("_P", bound="subprocess.Popen[Any]")

#: The scheduler slice asked for (nanoseconds): the shortest Linux accepts.
SLICE_NS = 100_000

#: The one copy of the code (NICE, SLICE and PID are set by whoever runs it; PID 0 is the calling thread, any
#: other the process or thread of that number). ``sched_setattr`` sets the nice value
#: too (``sched_nice``), so both come from the one call where it works, and ``setpriority`` covers the rest.
#: Each step stands alone: a refused ``setpriority`` (a container's seccomp) must not skip leaving a
#: real-time policy, and ``sched_setscheduler`` leaves it where the raw call has no number (32-bit, riscv64,
#: ppc64le, s390x ...). ``_stuck`` ends true only when the process is still real-time after both.
_CODE = """import os, sys
try:
    os.setpriority(os.PRIO_PROCESS, PID, max(NICE, os.getpriority(os.PRIO_PROCESS, PID)))
except Exception:
    pass
_rt = ()
try:
    _rt = (os.SCHED_FIFO, os.SCHED_RR)
    if os.sched_getscheduler(PID) in _rt:
        os.sched_setscheduler(PID, os.SCHED_OTHER, os.sched_param(0))
except Exception:
    pass
try:
    import ctypes, platform, struct
    _nr = {"x86_64": 314, "aarch64": 274}.get(platform.machine()) if struct.calcsize("P") == 8 else None
    _pol = os.sched_getscheduler(PID)
    _pol = _pol if _pol in (os.SCHED_BATCH, os.SCHED_IDLE) else os.SCHED_OTHER
    if sys.platform.startswith("linux") and _nr:
        _nice = os.getpriority(os.PRIO_PROCESS, PID)
        _attr = ctypes.create_string_buffer(struct.pack("=IIQiIQQQII", 56, _pol, 0, _nice, 0, SLICE, 0, 0, 0, 0))
        ctypes.CDLL(None).syscall(ctypes.c_long(_nr), ctypes.c_long(PID), _attr, ctypes.c_uint(0))
except Exception:
    pass
try:
    _stuck = os.sched_getscheduler(PID) in _rt
except Exception:
    _stuck = False
"""
#: A helper's first statement: ``python -c`` (on Python 3.10, where ``-P`` is missing) puts the working
#: directory first on sys.path, and a ``ctypes.py`` or ``struct.py`` someone wrote there (the bot's working
#: directory may be its state directory) would run in the helper; never in :func:`lower` (a running process).
_PATH = "import sys\nif sys.path and sys.path[0] == '': del sys.path[0]\n"
#: A helper that could not leave the bot's real-time policy ends (exit 1) before it imports anything.
_REFUSE = """if _stuck:
    sys.exit("posstate: this helper process cannot leave the bot's real-time scheduling policy and does not run at a "
             "real-time priority beside it; start the bot with `chrt --reset-on-fork`, or allow sched_setscheduler")
"""


@functools.cache
def _compiled() -> CodeType:
    """:data:`_CODE` compiled once: compiling it took 0.23 ms of the 0.35 ms a helper ran at the bot's share
    between its ``exec`` and :func:`start_lowered` lowering it."""
    return compile(_CODE, "<posstate.core.priority>", "exec")


# What lower() imports and compiles, paid at import (about 2 ms) rather than by the first helper's start, on a
# thread of the bot holding the interpreter lock (issue 14 attack: 2.8 ms for the first lower() of a pid).
with contextlib.suppress(ImportError):
    import ctypes  # noqa: F401
    import platform  # noqa: F401
_compiled()


def target_nice(added: int) -> int:
    """The nice value *added* above this process's own (at most 19, the lowest share)."""
    try:
        return min(19, os.getpriority(os.PRIO_PROCESS, 0) + added)
    except (AttributeError, OSError):  # not on a Unix
        return min(19, added)


def boot(nice: int) -> str:
    """Source code that gives the process running it nice *nice* (never a higher share than it has), the normal
    policy in place of a real-time one (or ends it) and the shortest slice, with the working directory off
    sys.path first; the first statements of a helper's ``python -c``."""
    return f"NICE, SLICE, PID = {int(nice)}, {SLICE_NS}, 0\n" + _PATH + _CODE + _REFUSE


def lower(nice: int, pid: int = 0) -> bool:
    """What :func:`boot` does, for a process already running (a benchmark's clients, say; *pid* 0: the calling
    thread's), or for the helper *pid* just started. On Linux the nice value, the policy and the slice are a
    thread's (a *pid* names its main thread): the threads it starts later inherit them; call it before starting
    any. False when the thread is still under a real-time policy (it could not leave it)."""
    names: dict[str, object] = {"NICE": int(nice), "SLICE": SLICE_NS, "PID": int(pid)}
    exec(_compiled(), names)  # noqa: S102 - a constant of this module
    return not names["_stuck"]


def start_lowered(nice: int, start: Callable[[], _P]) -> _P:
    """``start()`` (which starts a helper process, its ``Popen``) on the calling thread, then the helper given
    nice *nice*, the normal policy and the shortest slice (:func:`lower` of its pid) at once, from outside:
    its interpreter start, ``site`` and ``.pth`` imports run at the low share, not only what follows its boot
    (traced at 100,000 positions, issue 14: 6 ms of the 65 ms the slowest ``"sync"`` calls waited for a
    processor were spent behind workers still at the bot's priority, before their boot). What ``start()`` raises is
    raised here; an interrupt (``KeyboardInterrupt``) after the start kills and reaps the helper first.

    Never from a thread lowered first (issue 14 attack): ``Popen`` holds the bot's interpreter lock throughout,
    the vforked child's ``exec`` included, and a nice-19 thread that a busy machine preempts there keeps every
    thread of the bot waiting for that lock (measured, one processor shared with a busy process: stalls of
    155-175 ms of the bot's thread against 8 ms with the start at the caller's share). The instants between
    the child's ``exec`` and the return of ``Popen`` run at the caller's share. A caller under a real-time
    policy (``SCHED_FIFO``, ``SCHED_RR``) starts it from a short-lived thread that left that policy first (at
    the caller's nice): a helper started real-time kept an equal-priority bot thread off its processor until
    its boot ran (issue 14 attack); where no thread can start, from the calling thread."""
    proc = _off_real_time(start) if _real_time() else start()
    try:
        if proc.pid > 0:  # never 0 (that would lower the caller's own thread for good)
            lower(nice, proc.pid)
    except BaseException:
        _discard(proc)
        raise
    return proc


def _real_time() -> bool:
    """The calling thread is under a real-time policy."""
    try:
        return os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR)
    except (AttributeError, OSError):  # not on Linux
        return False


def _off_real_time(start: Callable[[], _P]) -> _P:
    """``start()`` on a short-lived thread under the normal policy (the calling thread's nice); an interrupt of
    the caller (``KeyboardInterrupt`` at any point, the thread's start included) leaves the thread to kill and
    reap what it starts (it is not a daemon: the interpreter's exit waits for it)."""
    lock = threading.Lock()
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            proc = start()
        except BaseException as exc:  # handed to the caller's thread and raised there
            box["error"] = exc
        else:
            with lock:
                box["proc"] = proc
                gone = "abandoned" in box
            if gone:
                _discard(proc)
        finally:
            done.set()

    def abandon() -> None:
        with lock:
            box["abandoned"] = True
            proc = box.get("proc")
        if proc is not None:
            _discard(proc)

    thread = threading.Thread(target=run, name="posstate-start-helper")
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (interpreter shutdown, a thread limit): at the caller's policy
        return start()
    except BaseException:
        abandon()
        raise
    try:
        done.wait()
    except BaseException:
        abandon()
        raise
    if "error" in box:
        raise box["error"]
    return box["proc"]  # type: ignore[no-any-return]


def _discard(proc: subprocess.Popen[Any]) -> None:
    with proc, contextlib.suppress(OSError):  # its pipes closed, and reaped
        proc.kill()
