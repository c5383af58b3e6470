"""The bot's side of its worker processes (issue 14): start one (``subprocess``, never ``fork()``: the bot has
threads, and a forked child would share the key's nonce state), hand it a framed job over its stdin pipe and
read its framed answer (posstate/journal/jobpipe.py), kill it from any thread, keep it between jobs.

Used by the compaction worker (posstate/manager/procompaction.py, kept between compactions) and the
backup-check worker (posstate/manager/procheck.py, one job each).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import site
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import orjson

from posstate.core import priority
from posstate.journal.compactjob import TEST_HOOK
from posstate.journal.jobpipe import IDLE_EXIT, MAX_MESSAGE, no_sigpipe, take_frame
from posstate.manager import idlewatch
from posstate.storage import fileops as fs

_MODULE = "posstate.journal.compactjob"
#: The worker's first statements, before it imports anything: nice 19 and the shortest scheduler slice
#: (core/priority.py says why), then the module runs as ``python -m`` would run it. On every Python: on 3.10
#: (no ``-P``) the boot itself drops the working directory from sys.path.
_BOOT = priority.boot(19) + "import runpy\nrunpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)\n"
#: The folder that holds the posstate package the manager runs: the worker imports the same code from it.
_ROOT = Path(__file__).resolve().parents[2]
#: Passed on to the worker when set (no key variable is: the keys go over the pipe).
_ENV_KEPT = ("PATH", "PYTHONHOME", "SYSTEMROOT", "LANG", "LC_ALL", "TMPDIR", TEST_HOOK)


def available() -> bool:
    """A Python executable to start the worker with (not in an embedded or frozen interpreter)."""
    return bool(sys.executable) and not getattr(sys, "frozen", False) and os.path.isfile(sys.executable)


def _site_dirs() -> set[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    with contextlib.suppress(Exception):
        dirs.append(site.getusersitepackages())
    return {os.path.realpath(d) for d in dirs}


def _env() -> dict[str, str]:
    """The worker's whole environment: what it needs to start and import posstate, and nothing else. The
    folder holding this posstate goes first on PYTHONPATH (the worker runs the bot's code), unless it is a
    site-packages folder, already on the path: first, it would come before the standard library, and a stray
    ``pathlib.py`` installed there would replace the standard one in the process that holds the key."""
    root = [] if os.path.realpath(_ROOT) in _site_dirs() else [str(_ROOT)]
    paths = root + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for name in _ENV_KEPT:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def stopped(pid: int) -> bool:
    """Linux: the process is stopped (SIGSTOP, SIGTSTP, a debugger's trace stop): a job handed to it would be
    answered only once it is resumed, and its attempt would wait the whole timeout (600 s). Its state is read
    from ``/proc/<pid>/stat`` (the field after the command's closing parenthesis; the command may hold any
    character). False when unknown (not Linux, no ``/proc``): then only the timeout notices."""
    try:
        fd = fs.open_(f"/proc/{pid}/stat", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        raw = fs.pread(fd, 4096, 0)
    except OSError:
        return False
    finally:
        fs.close(fd)
    return raw[raw.rfind(b")") + 2 :][:1] in (b"T", b"t")


#: Seconds without a byte from a worker with a job before its state is read again (:func:`stopped`).
_STOP_CHECK = 1.0


class WorkerFailed(Exception):
    """The worker did not produce a usable answer (its reason, never its stderr)."""


class WorkerIdle(WorkerFailed):
    """A kept worker left (its idle time passed) just as a job was written: no answer, start a fresh one."""


class _Stopped(WorkerFailed):
    """The worker was found stopped twice in a row while its job waited for an answer."""


def _reap(proc: subprocess.Popen[bytes], owner: int) -> None:
    """A worker whose handle is dropped, or at the bot's exit: SIGKILL and reaped. Never from a process the
    bot forked (the worker is its parent's: a child must not kill it)."""
    if os.getpid() != owner:
        return
    idlewatch.forget(proc)  # before its pipes are closed (their numbers may be reused at once)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class Worker:
    """One worker process: :meth:`result` hands it a job and reads its framed answer (posstate/journal/
    jobpipe.py). Kept (``result(keep=True)``), it waits for the next job (:meth:`reuse`). :meth:`kill` from any
    thread ends it at once."""

    def __init__(self, message: bytes, module: str | None = None) -> None:
        module = module or _MODULE
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        cmd = [sys.executable, *safe_path, "-c", _BOOT, module]
        self._message = message
        self.killed = False
        self.jobs = 0  # jobs handed to this process
        # discard() while another thread is in result(): the pipes are closed by that thread once it is done
        # with them, never under it (issue 14 attack: a descriptor number closed under a select is reused).
        self._guard = threading.Lock()
        self._reading = False
        self._discarded = False
        self._left = False  # reaped by the watcher after it left while it waited (idlewatch.py)
        self._token = 0  # the jobs handed over by reuse(): the watcher's event for an older one is stale
        env = _env()
        # Given nice 19 as soon as it is started (core/priority.py): the interpreter's start runs low too.
        self.proc = priority.start_lowered(
            19,
            lambda: subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=str(_ROOT),
                close_fds=True,
            ),
        )
        self._reaper = weakref.finalize(self, _reap, self.proc, os.getpid())

    def reuse(self, message: bytes) -> bool:
        """Hand the next job to this kept process: False when it is gone (killed, failed, or left idle) or
        stopped (SIGSTOP while it waited: the caller discards it, and SIGKILL ends a stopped process too).
        A process not yet reaped keeps its pid: the state read is this worker's."""
        with self._guard:
            self._token += 1
            gone = self._discarded
        idlewatch.forget(self.proc)
        if gone or self.killed or self.proc.poll() is not None or stopped(self.proc.pid):
            return False
        self._message = message
        return True

    def result(self, timeout: float, *, keep: bool = False) -> dict[str, Any]:
        """The worker's answer (a dict), or WorkerFailed; waits at most *timeout* seconds, then kills it. Not
        *keep*: its stdin is closed after the job and it must exit with status 0."""
        with self._guard:
            if self._discarded:
                self._message = b""  # (it holds the job's keys)
                raise WorkerIdle("left while it waited") if self._left else WorkerFailed("killed")
            self._reading = True
        answered = False
        try:
            reply = self._result(timeout, keep=keep)
            answered = True
            return reply
        finally:
            with self._guard:
                self._reading = False
                reap = self._discarded
                if answered and keep and not reap:  # it waits for its next job: reaped if it leaves meanwhile
                    idlewatch.watch(self, self.proc, self._token)
            if reap:
                self._reaper()

    def left_idle(self, token: int) -> None:
        """The watcher (posstate/manager/idlewatch.py) saw this kept worker's stdout readable while it waited:
        it exited (idle, killed) or wrote out of turn. Reaped (killed first if it is still running after a
        short wait) and its pipes closed, unless a job was handed to it since (*token*) or it is in use."""
        with self._guard:
            if token != self._token or self._reading or self._discarded:
                return
            self._discarded = self._left = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # it is exiting: its status (IDLE_EXIT) is kept
        self.kill()
        self._reaper()

    def _result(self, timeout: float, *, keep: bool) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        message, self._message = self._message, b""
        self.jobs += 1
        try:
            # SIGPIPE blocked: a bot that set it back to its default action is not ended by a worker gone as its
            # job is written (issue 14 attack); the write fails with EPIPE, and the worker's exit says why.
            with no_sigpipe():
                body, err = _exchange(self.proc, message, deadline, close_after=not keep)
        except subprocess.TimeoutExpired:
            self.kill()
            raise WorkerFailed(f"no answer within {timeout:.0f} s (killed)") from None
        except _Stopped as exc:  # a kept one: replaced like one that left idle (a fresh one is never retried)
            self.kill()
            raise (WorkerIdle if self.jobs > 1 else WorkerFailed)(f"{exc} (killed)") from None
        finally:
            del message
        if self.killed:
            raise WorkerFailed("killed")
        if body is None or not keep:
            try:
                code = self.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise WorkerFailed(f"did not exit within {timeout:.0f} s (killed)") from None
            if self.killed:
                raise WorkerFailed("killed")
            if body is None and code == IDLE_EXIT and self.jobs > 1:
                raise WorkerIdle("left idle as its job was written")
            if code != 0 or body is None:
                # Its stderr is captured and only counted: a traceback there is never echoed into a log or event.
                raise WorkerFailed(f"exited with code {code} ({err} bytes on stderr, not shown)")
        if len(body) > MAX_MESSAGE:
            raise WorkerFailed(f"answer of {len(body)} bytes is too large")
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WorkerFailed("answer is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise WorkerFailed("answer has no verdict")
        return reply

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(OSError):  # already gone
            self.proc.kill()

    def discard(self) -> None:
        """Killed, and reaped now (a kept worker no longer wanted: close(), a failure); if another thread is in
        :meth:`result`, by that thread as it returns (its pipes are closed only once it is done with them)."""
        self.kill()
        with self._guard:
            self._discarded = True
            if self._reading:
                return
        self._reaper()


def _exchange(proc: subprocess.Popen[bytes], message: bytes, deadline: float, *, close_after: bool) -> tuple[bytes | None, int]:
    """Write *message* down the worker's stdin and read one framed answer from its stdout, counting (never
    keeping) what it writes on stderr. Returns (the answer's body, or None when the worker closed its stdout
    first or sent no framed message, and the bytes seen on stderr). Raises subprocess.TimeoutExpired."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    for fd in (out_fd, err_fd, in_fd):
        os.set_blocking(fd, False)
    pending, buf, err = memoryview(message), bytearray(), 0
    still = 0  # the consecutive quiet seconds the worker was found stopped
    with selectors.DefaultSelector() as sel:
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        if pending:
            sel.register(in_fd, selectors.EVENT_WRITE)
        elif close_after:
            proc.stdin.close()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            ready = sel.select(min(left, _STOP_CHECK))
            if not ready:
                # Stopped with its job (SIGSTOP just after reuse() found it running, a debugger): it would
                # answer only once resumed, the job waiting the whole timeout (issue 14 attack, session 13).
                # Twice in a row: a stop of the bot's whole process group resumed by one SIGCONT is not one.
                # Its pid is its own: it is reaped only once this exchange is over.
                still = still + 1 if stopped(proc.pid) else 0
                if still >= 2:
                    raise _Stopped("stopped (SIGSTOP or a debugger) with its job")
                continue
            for key, _ in ready:
                fd = key.fd
                if fd == in_fd:
                    try:
                        pending = pending[os.write(in_fd, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the worker is gone (EPIPE): its exit says why
                        pending = pending[len(pending) :]
                    if not pending:
                        sel.unregister(in_fd)
                        if close_after:
                            proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if fd == err_fd:
                    err += len(chunk)
                    if not chunk:
                        sel.unregister(err_fd)
                    continue
                if not chunk:
                    return None, err
                buf += chunk
                try:
                    body = take_frame(buf)
                except ValueError as exc:  # not framed, or too long to read: nothing past it can be trusted
                    text = str(exc)
                    raise WorkerFailed(f"answer {text[8:]}" if text.startswith("message ") else "answer is not JSON") from None
                if body is not None:
                    return body, err
