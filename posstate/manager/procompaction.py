"""Background compaction in a worker process (issue 14, ``StateConfig(compaction="process")``, the default).

The O(state) work of a compaction (decode the snapshot, replay the sealed segment, encode, compress,
encrypt, verify) runs in another interpreter, ``python -m posstate.journal.compactjob``: a pure function of
files that writes and verifies a temp file beside the state file. The bot's process does only I/O and O(1)
Python for it: start the worker (or hand the job to the one kept since the last compaction, which may
remember the document of the snapshot on disk: posstate/journal/compactjob.py ``Kept``), hand it the job and
the keys over its stdin pipe, wait for its answer on the
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

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from posstate.core.errors import PersistenceError
from posstate.core.version import __version__
from posstate.journal.compactjob import Answer, CompactJob
from posstate.journal.jobpipe import frame
from posstate.manager.commit import DurableCommit
from posstate.manager.workers import (  # noqa: F401  (the names tests and procheck use from here)
    _BOOT,
    _ENV_KEPT,
    _MODULE,
    _ROOT,
    Worker,
    WorkerFailed,
    WorkerIdle,
    _env,
    _site_dirs,
    available,
)
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

#: The longest a worker may take before the attempt fails (it is killed, and retried later; seconds).
WORKER_TIMEOUT = 600.0
#: Attempts of one job that may fail in a worker; its later attempts compact in process.
WORKER_TRIES = 2
#: How long the compaction worker waits for the next compaction, holding the document of the snapshot it
#: wrote, before it exits and gives its memory back (seconds; docs/JOURNAL.md "The kept worker").
WORKER_IDLE = 60.0


def _answer(reply: dict[str, Any], *, temp: Path, generation: int, max_size: int) -> Answer:
    """The worker's answer, checked field by field (a worker is never trusted further than its files)."""
    raw = reply.get("answer")
    if not isinstance(raw, dict) or set(raw) != {"temp_path", "checksum", "size", "generation", "positions", "kept"}:
        raise WorkerFailed("answer is malformed")
    if type(raw["kept"]) is not bool:
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
    return Answer(temp_path=str(temp), checksum=checksum, size=size, generation=generation, positions=positions, kept=raw["kept"])


def _intact(data: bytes, checksum: str) -> bool:
    """The keyless check: the trailer names *checksum* and the SHA-256 of the bytes before it matches."""
    if _format.checksum_of(data) != checksum:
        return False
    return hashlib.sha256(memoryview(data)[: -_format.TRAILER_SIZE]).hexdigest() == checksum


class ProcessCompaction(DurableCommit):
    """The worker-process attempt of a background compaction (the caller is BackgroundCompaction)."""

    _bg_cond: threading.Condition
    _kept: Worker | None  # the compaction worker kept between compactions (set up by BackgroundCompaction)

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
            idle_s=WORKER_IDLE,
        )

    def _kept_for(self, message: bytes) -> Worker:
        """The kept compaction worker, handed *message*: the last compaction's while it is alive (it may hold
        the document of the snapshot on disk), else a new one. Raises OSError when none can be started."""
        with self._bg_cond:
            old, self._kept = self._kept, None
        if old is not None and old.reuse(message):
            fresh = old
        else:
            if old is not None:
                old.discard()
            fresh = Worker(message)
        with self._bg_cond:
            self._kept = fresh
        return fresh

    def _drop_kept(self, worker: Worker | None = None) -> None:
        """Kill and reap the kept worker (*worker*: only if it is still the kept one). close(), a failure."""
        with self._bg_cond:
            old = self._kept
            if old is None or (worker is not None and old is not worker):
                return
            self._kept = None
        old.discard()

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
            reply: dict[str, Any] | None = None
            while reply is None:
                try:
                    worker = self._kept_for(message)
                except OSError as exc:  # no process to be had (the executable gone, EAGAIN, ENOMEM): compact here
                    log.warning("%s: could not start the compaction worker (%s); compacting in process", self._path, exc)
                    return None
                register(worker)
                try:
                    reply = worker.result(WORKER_TIMEOUT, keep=True)
                except WorkerIdle:  # it left just as the job was written: a fresh one takes it
                    self._drop_kept(worker)
                except WorkerFailed:
                    self._drop_kept(worker)
                    check()  # killed because the job was given up: that is not a failure
                    raise
                except BaseException:  # not the worker's failure, but it may still be working on the job: ended
                    self._drop_kept(worker)  # before its temp is removed (issue 14 attack: it wrote it after)
                    raise
                finally:
                    register(None)
            del message
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
            self._drop_kept()  # a worker that answered wrongly is not kept
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
