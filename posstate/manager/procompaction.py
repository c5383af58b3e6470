"""Background compaction in a worker process (issue 14, ``StateConfig(compaction="process")``, the default).

The O(state) work of a compaction (decode the snapshot, replay the sealed segment, encode, compress,
encrypt, verify) runs in a fresh interpreter, ``python -m posstate.journal.compactjob``: a pure function of
files that writes and verifies a temp file beside the state file. The bot's process does only I/O and O(1)
Python for it: spawn the worker, hand it the job and the keys over its stdin pipe, wait for its answer on the
background thread, then install the temp with the same steps as every save (check the file in place, keep
it as ``.bak``, rename, fsync the directory, a keyless read-back of the trailer's SHA-256) and retire the
sealed segment. Never ``fork()``: the bot has threads, and a forked child would share the key's nonce state
(docs/SECURITY.md, T4).

A worker that refuses (the files are not what the rotation describes), or cannot be started, makes the
attempt compact in process as ``compaction="thread"`` does. A worker that dies, times out, answers garbage or
too much, or whose temp file is not what it answered, fails the attempt: reported (``error`` event, log) and
retried like any other.
A save, a load or close() that gives the job up kills the worker (SIGKILL) and removes its temp; a temp left
by a killed manager is set aside by the next open's sweep (docs/JOURNAL.md, "Background compaction").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import site
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from posstate.core import priority
from posstate.core.errors import PersistenceError
from posstate.core.version import __version__
from posstate.journal.compactjob import MAX_MESSAGE, TEST_HOOK, Answer, CompactJob, frame
from posstate.manager.commit import DurableCommit
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

#: The longest a worker may take before the attempt fails (it is killed, and retried later; seconds).
WORKER_TIMEOUT = 600.0
#: Attempts of one job that may fail in a worker; its later attempts compact in process.
WORKER_TRIES = 2
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


class WorkerFailed(Exception):
    """The worker did not produce a usable answer (its reason, never its stderr)."""


class Worker:
    """One worker process running one job; :meth:`kill` from any thread ends it at once."""

    def __init__(self, message: bytes, module: str | None = None) -> None:
        module = module or _MODULE
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        cmd = [sys.executable, *safe_path, "-c", _BOOT, module]
        self._message = message
        self.killed = False
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

    def result(self, timeout: float) -> dict[str, Any]:
        """The worker's answer (a dict), or WorkerFailed; waits at most *timeout* seconds, then kills it."""
        try:
            out, err = self.proc.communicate(self._message, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.communicate()
            raise WorkerFailed(f"no answer within {timeout:.0f} s (killed)") from None
        finally:
            self._message = b""
        code = self.proc.returncode
        if self.killed:
            raise WorkerFailed("killed")
        if code != 0:
            # Its stderr is captured and only counted: a traceback there is never echoed into a log or event.
            raise WorkerFailed(f"exited with code {code} ({len(err)} bytes on stderr, not shown)")
        if len(out) > MAX_MESSAGE:
            raise WorkerFailed(f"answer of {len(out)} bytes is too large")
        try:
            reply = orjson.loads(out)
        except orjson.JSONDecodeError:
            raise WorkerFailed("answer is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise WorkerFailed("answer has no verdict")
        return reply

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(OSError):  # already gone
            self.proc.kill()


def _answer(reply: dict[str, Any], *, temp: Path, generation: int, max_size: int) -> Answer:
    """The worker's answer, checked field by field (a worker is never trusted further than its files)."""
    raw = reply.get("answer")
    if not isinstance(raw, dict) or set(raw) != {"temp_path", "checksum", "size", "generation", "positions"}:
        raise WorkerFailed("answer is malformed")
    checksum, size, positions = raw["checksum"], raw["size"], raw["positions"]
    if raw["temp_path"] != str(temp):
        raise WorkerFailed("answer names another temp file")
    if not (isinstance(checksum, str) and len(checksum) == 64 and all(c in "0123456789abcdef" for c in checksum)):
        raise WorkerFailed("answer has no checksum")
    if type(size) is not int or not 0 < size <= max_size or type(positions) is not int or positions < 0:
        raise WorkerFailed("answer has an impossible size or count")
    if raw["generation"] != generation:
        raise WorkerFailed("answer is for another generation")
    return Answer(temp_path=str(temp), checksum=checksum, size=size, generation=generation, positions=positions)


def _intact(data: bytes, checksum: str) -> bool:
    """The keyless check: the trailer names *checksum* and the SHA-256 of the bytes before it matches."""
    if _format.checksum_of(data) != checksum:
        return False
    return hashlib.sha256(memoryview(data)[: -_format.TRAILER_SIZE]).hexdigest() == checksum


class ProcessCompaction(DurableCommit):
    """The worker-process attempt of a background compaction (the caller is BackgroundCompaction)."""

    def _proc_enabled(self) -> bool:
        return self.config.compaction == "process" and available()

    def _proc_job(self, generation: int, journal: dict[str, Any], sealed: str, temp: Path) -> CompactJob:
        import socket

        cfg = self.config
        return CompactJob(
            state_path=str(self._path),
            journal_path=str(cfg.journal_path),
            temp_path=str(temp),
            expected_checksums=sorted(c for c in self._expected_on_disk if c is not None),
            segment_id=sealed,
            last_seq=int(journal["seq"]),
            generation=generation,
            journal=dict(journal),
            written_at_ms=int(time.time() * 1000),
            writer={"host": socket.gethostname()[:255], "pid": os.getpid(), "version": __version__},
            tombstone_floor=self._files.tombstone_floor,
            compression_level=cfg.compression_level if cfg.compression else None,
            encrypt=self._write_keyring is not None,
            max_document_bytes=cfg.max_document_bytes,
            clock_skew=cfg.clock_skew,
            parent_pid=os.getpid(),
        )

    def _proc_attempt(
        self, job: Any, check: Callable[[], None], register: Callable[[Worker | None], None]
    ) -> tuple[StateData, int, int] | None:
        """One attempt through a worker: (state for the after-save hook, positions, bytes) once installed and
        the segment retired, or None when the worker refused (the caller compacts in process). *check*
        raises when the job was given up; *register* publishes the running worker so that it can be killed."""
        if job.sealed is None or not any(c is not None for c in self._expected_on_disk):
            return None  # no file the worker could start from: compact in process
        temp = _atomic.temp_name(self._path)
        spec = self._proc_job(job.generation, job.journal, job.sealed, temp)
        keys = self._keyring.worker_material() if self._keyring is not None else None
        try:
            message = frame(orjson.dumps({"job": asdict(spec), "keys": keys}))
            del keys
            try:
                worker = Worker(message)
            except OSError as exc:  # no process to be had (the executable gone, EAGAIN, ENOMEM): compact here
                log.warning("%s: could not start the compaction worker (%s); compacting in process", self._path, exc)
                return None
            del message
            register(worker)
            try:
                reply = worker.result(WORKER_TIMEOUT)
            except WorkerFailed:
                check()  # killed because the job was given up: that is not a failure
                raise
            finally:
                register(None)
            check()
            if not reply["ok"]:
                if isinstance(reply.get("refused"), str):
                    log.info("%s: the compaction worker refused (%s); compacting in process", self._path, reply["refused"])
                    return None
                raise WorkerFailed(str(reply.get("error", "failed"))[:500])
            answer = _answer(reply, temp=temp, generation=job.generation, max_size=self._read.max_file_bytes)
            if answer.positions != job.positions:  # the header's count is checked against the answer at install
                raise WorkerFailed(
                    f"its snapshot holds {answer.positions} positions, memory held {job.positions} at the rotation"
                )
            self._writer_lock.check()
            self._proc_install(temp, answer)
        except WorkerFailed as exc:
            _atomic.quiet_unlink(temp)
            # Whatever made this worker fail (it cannot import posstate in a fresh interpreter, an OOM killer
            # takes it every time, sys.executable is no Python) may well make the next one fail too: after
            # WORKER_TRIES, the retries of this job compact in process, so the journal is always compacted
            # (issue 14 attack: before, the job was retried through a worker for ever).
            job.proc_failed += 1
            raise PersistenceError(
                self._path,
                operation="background compaction worker",
                reason=str(exc),
                outcome="the state file and the journal segments are intact",
                next_step="nothing to do: it is retried (compaction='thread' compacts in the bot's process)",
            ) from None
        except BaseException:
            _atomic.quiet_unlink(temp)  # killed, given up or failed before the rename: never left behind
            raise
        self._expected_on_disk = {answer.checksum}
        check()
        self._journal.retire_segment()
        self._journal.stop_capture()  # the pre-images were kept in case the worker refused: not needed now
        st = StateData(generation=answer.generation, journal=dict(job.journal))
        return st, answer.positions, answer.size

    def _proc_install(self, temp: Path, answer: Answer) -> None:
        """Install the worker's temp file as the state file: the steps of every save, with keyless checks."""
        data = fs.read_file(temp, max_size=self._read.max_file_bytes)
        try:
            header = _format.parse_header(data)
        except _format.FormatProblem:
            header = None
        if (
            len(data) != answer.size
            or not _intact(data, answer.checksum)
            or header is None
            or header.generation != answer.generation
            or header.position_count != answer.positions
        ):
            raise WorkerFailed("its temp file is not the file it answered with (changed or planted)")
        del data

        def read_back() -> None:
            back = fs.read_file(self._path, max_size=self._read.max_file_bytes)
            if len(back) != answer.size or not _intact(back, answer.checksum):
                raise OSError(5, "file read back differs from what the compaction worker wrote")

        self._install_file(lambda: temp, answer.checksum, read_back)
