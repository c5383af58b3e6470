"""Starting the server process of serve/process.py: its command and environment, and the handshake (the
first frame in, one JSON line out) within a deadline, whatever the process does (exits, answers garbage,
never answers, never reads), and without SIGPIPE killing a bot that restored its default action."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import site
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from posstate.core import priority
from posstate.core.errors import ServeError
from posstate.journal.jobpipe import no_sigpipe
from posstate.storage import fileops as fs

#: The pipe's size asked of Linux (F_SETPIPE_SZ); the default is 64 KiB.
PIPE_BYTES = 1024 * 1024
#: Environment variables the server process never inherits (docs/SECURITY.md: it gets no key).
SECRET_ENV = ("POSSTATE_KEY", "POSSTATE_KEY_FILE", "POSSTATE_PASSPHRASE")
#: All the server process inherits (and ``LC_*``): it talks to the network, so it gets none of the bot's
#: other secrets (a replica's AWS credentials, an exchange's API key in the environment).
KEPT_ENV = frozenset({"PATH", "PYTHONPATH", "PYTHONHOME", "LANG", "TZ", "TMPDIR", "HOME", "SYSTEMROOT"})
#: The longest answer line read from the server process (its port, or why it could not bind).
MAX_REPLY = 64 * 1024
_FALLBACK = "serve in process with process=False"
#: ``python -m posstate.serve.child`` without the working directory on sys.path: ``-m`` (and ``-c``) put it
#: first, and a ``json.py`` or ``uvicorn.py`` someone else wrote in the bot's working directory (its state
#: directory, say) would run in the server process; the boot (core/priority.py) drops it before anything is
#: imported. (The working directory itself stays the bot's: a StateConfig may hold relative paths.)
_MAIN = "from posstate.serve.child import main\nsys.exit(main())\n"


def command(nice: int) -> str:
    """The server process's ``-c`` program: the working directory off sys.path, then *nice* and the shortest
    scheduler slice (core/priority.py), before anything is imported, then the child's ``main``."""
    return priority.boot(nice) + _MAIN


def spawn(nice: int) -> subprocess.Popen[bytes]:
    """``python -m posstate.serve.child`` (:func:`command`, at *nice*) in a new session (a Ctrl-C meant for the bot's
    terminal does not stop it), with no descriptor of the bot's but its pipes, and without the key variables."""
    if getattr(sys, "frozen", False) or not sys.executable:
        # PyInstaller and the like: sys.executable is the bot itself, and `-m` would start a second bot
        raise ServeError(
            "this program has no Python interpreter to start the server process with (a frozen application: "
            "its executable is the program itself)",
            next_step=_FALLBACK,
        )
    env = child_env(os.environ, str(Path(__file__).resolve().parents[2]), _site_dirs())
    try:
        proc = priority.start_lowered(  # at *nice* once started: the interpreter's start runs low too
            nice,
            lambda: subprocess.Popen(
                [sys.executable, "-c", command(nice)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,
                env=env,
            ),
        )
    except OSError as exc:
        raise ServeError(f"cannot start the server process ({exc.strerror or exc})", next_step=_FALLBACK) from None
    group_nice(proc.pid, nice)
    return proc


def group_nice(pid: int, nice: int) -> None:
    """The scheduling group of the process *pid*, in a session of its own, given nice *nice* (never a higher
    share than this process's group). With autogroup scheduling (Linux ``CONFIG_SCHED_AUTOGROUP``, on by
    default in many distributions) each session is a group that shares the processor with the other groups as
    an equal whatever its processes' nice values: the server process, at nice 10 in its new session, took half
    of a busy processor from the bot (18 attack, found in the 14 attack). Best effort: nothing where there is
    no ``/proc/<pid>/autogroup``."""
    try:
        mine, theirs = _autogroup("self"), _autogroup(str(int(pid)))
        if mine[0] == theirs[0]:
            return  # the same group (not a session of its own): never lower the bot's own group
        fd = fs.open_(f"/proc/{int(pid)}/autogroup", os.O_WRONLY)
        try:
            fs.write(fd, str(max(int(nice), mine[1])).encode())
        finally:
            fs.close(fd)
    except (OSError, ValueError, IndexError):
        pass


def _autogroup(pid: str) -> tuple[bytes, int]:
    """(name, nice) of ``/proc/<pid>/autogroup``: ``/autogroup-N nice K`` (a size of 0: not ``read_file``)."""
    fd = fs.open_(f"/proc/{pid}/autogroup", os.O_RDONLY)
    try:
        name, _, nice = fs.pread(fd, 256, 0).split()
    finally:
        fs.close(fd)
    return name, int(nice)


def child_env(environ: Mapping[str, str], root: str, site_dirs: Collection[str]) -> dict[str, str]:
    """The server process's environment: the few variables of :data:`KEPT_ENV` from *environ* (never a key
    variable), and the folder holding this
    ``posstate`` (*root*) first on PYTHONPATH, so it runs the bot's code, unless *root* is a site-packages
    folder, on the path already: first on PYTHONPATH it would come before the standard library, and a stray
    ``pathlib.py`` or ``enum.py`` installed there from PyPI would replace the standard one in the server
    process only. Of the bot's PYTHONPATH only absolute folders are passed on: an empty entry (``export
    PYTHONPATH=$PYTHONPATH:/opt/bot`` with none set) or a relative one names the working directory, the one
    :func:`command` keeps off sys.path (a ``sitecustomize.py`` there would run before the program; 18 attack)."""
    env = {k: v for k, v in environ.items() if k not in SECRET_ENV and (k in KEPT_ENV or k.startswith("LC_"))}
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
    if os.path.normcase(os.path.realpath(root)) not in {os.path.normcase(os.path.realpath(d)) for d in site_dirs}:
        paths.insert(0, root)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    with contextlib.suppress(Exception):
        dirs.append(site.getusersitepackages())
    return dirs


def block_sigpipe() -> None:
    """For a thread that only writes pipes (the feeder): SIGPIPE blocked for its whole life."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})


def handshake(proc: subprocess.Popen[bytes], init: bytes, *, timeout: float) -> int:
    """Write the first frame *init* to the server process and read its one JSON line, within *timeout*
    seconds in all; the port it bound, or ServeError (the caller kills the process). The pipe to it is left
    non-blocking: from now on the feeder never waits for it."""
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the default pipe size
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    os.set_blocking(wfd, False)
    os.set_blocking(rfd, False)
    deadline = time.monotonic() + timeout
    rest, line, ended = memoryview(init), b"", False
    # poll(), not select(): a bot with a thousand sockets open has pipes numbered above FD_SETSIZE
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    poller.register(wfd, select.POLLOUT)
    with no_sigpipe():
        while b"\n" not in line and not ended and len(line) <= MAX_REPLY:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not rest:
                with contextlib.suppress(KeyError):
                    poller.unregister(wfd)
            events = dict(poller.poll(max(1, int(left * 1000))))
            readable, writable = events.get(rfd, 0), events.get(wfd, 0)
            if writable:
                try:
                    rest = rest[os.write(wfd, rest) :]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # it exited: its exit code says why
                    rest = rest[:0]
            if readable:
                with contextlib.suppress(BlockingIOError):
                    chunk = os.read(rfd, 4096)
                    ended = not chunk
                    line += chunk
    reply = _parse(line.partition(b"\n")[0]) if b"\n" in line else None
    if reply is not None and "port" in reply and not rest:  # bound, and it read the whole first frame
        proc.stdout.close()  # nothing more comes this way (the server process writes to stderr)
        return int(reply["port"])
    if reply is not None and "reason" in reply:
        message, reason = str(reply.get("message", "")), str(reply["reason"])
        raise ServeError(reason, next_step=message[len(reason) + 2 :] or "see the log for the cause")
    code = None
    if ended or b"\n" in line:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(min(5.0, max(timeout, 0.1)))
    if code is not None:
        what = f"exited with code {code} while starting"
    elif b"\n" in line or len(line) > MAX_REPLY:
        what = f"answered something other than its port ({len(line)} bytes) while starting"
    elif line:
        what = f"wrote {len(line)} bytes but no line within {timeout:g} s of starting"
    else:
        what = f"did not answer within {timeout:g} s of starting"
    raise ServeError(f"the server process {what}", next_step=f"see its error output (stderr) for the cause, or {_FALLBACK}")


def _parse(line: bytes) -> dict[str, Any] | None:
    """The answer if it is one: ``{"port": N}`` (0 < N < 65536) or ``{"reason": str, ...}``."""
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    if not isinstance(reply, dict):
        return None
    port = reply.get("port")
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return {"port": port}
    if isinstance(reply.get("reason"), str):
        return reply
    return None
