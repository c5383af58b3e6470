"""A prune's full checks of backups in a worker process (issue 14, ``StateConfig(compaction="process")``).

The parent side of posstate/backup/checkjob.py, on the compaction worker's plumbing (:class:`Worker` of
posstate/manager/procompaction.py: the same executable, ``-P``, environment, key-over-stdin and answer
rules). The backup layer sees it as a :class:`~posstate.backup.verified.RemoteChecks`; what it may decide
from an answer is the verified cache's and the prune's business (posstate/backup/verified.py, prune.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from posstate.backup.verified import Probe
from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError
from posstate.journal.jobpipe import MAX_MESSAGE, frame
from posstate.manager.procompaction import WORKER_TIMEOUT
from posstate.manager.workers import Worker, WorkerFailed, available
from posstate.storage import container as _format
from posstate.storage.statefile import ReadOptions

log = logging.getLogger("posstate")

_MODULE = "posstate.backup.checkjob"
#: The most files one check job names. A job's answer is read up to MAX_MESSAGE (1 MiB): one verdict is at
#: most about 330 bytes (a backup's name, 37 characters at most; its probe: the trailer in hex and four
#: integers), so 1,024 of them stay under a third of it. One job for every backup not yet verified (all of
#: them after a restart) went over the limit from about 3,500 backups, and every prune failed (session 13).
CHECK_CHUNK = 1024
#: The most bytes of paths one job names (the job itself is read up to MAX_MESSAGE too; a path may be long).
_CHUNK_PATH_BYTES = MAX_MESSAGE // 2


def chunks(files: list[tuple[str, Path, Probe]]) -> list[list[tuple[str, Path, Probe]]]:
    """*files* cut into jobs of at most CHECK_CHUNK files and _CHUNK_PATH_BYTES of paths, in order."""
    out: list[list[tuple[str, Path, Probe]]] = [[]]
    size = 0
    for item in files:
        cost = len(os.fsencode(item[1])) + 8  # its quotes, comma and escapes' slack
        if out[-1] and (len(out[-1]) >= CHECK_CHUNK or size + cost > _CHUNK_PATH_BYTES):
            out.append([])
            size = 0
        out[-1].append(item)
        size += cost
    return [c for c in out if c]


class _NoWorker(Exception):
    """No check worker could be started: the files are checked in the bot's process."""


def for_config(config: StateConfig) -> WorkerChecks | None:
    """The worker checks a manager with *config* uses (None: check in the bot's process)."""
    return WorkerChecks() if config.compaction == "process" and available() else None


def _probe(raw: Any) -> Probe | None:
    """A probe from an answer, checked field by field (None: malformed)."""
    if not isinstance(raw, list) or len(raw) != 5 or not isinstance(raw[0], str):
        return None
    if not all(type(v) is int and v >= 0 for v in raw[1:]):
        return None
    try:
        trailer = bytes.fromhex(raw[0])
    except ValueError:
        return None
    if len(trailer) != _format.TRAILER_SIZE:
        return None
    return Probe(trailer=trailer, size=raw[1], mtime_ns=raw[2], ctime_ns=raw[3], inode=raw[4])


class WorkerChecks:
    """Runs one check job at a time in a worker process; :meth:`stop` (close()) kills a stoppable one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: tuple[Worker, bool] | None = None
        self._stopped = False
        #: Jobs started (tests and the benchmark read it).
        self.jobs = 0

    def check(
        self,
        files: list[tuple[str, Path, Probe]],
        options: ReadOptions,
        *,
        stoppable: bool,
        answered: Callable[[dict[str, Probe]], None] | None = None,
    ) -> dict[str, Probe] | None:
        """One job per :func:`chunks` of *files*, one after another (each in a process of its own); *answered*
        gets each job's valid verdicts as it answers (kept when a later job fails: RemoteChecks)."""
        found: dict[str, Probe] = {}
        for part in chunks(files):
            try:
                got = self._check(part, options, stoppable=stoppable)
            except _NoWorker:  # what is not found is checked in the bot's process
                return found
            if got is None:
                return None
            found.update(got)
            if answered is not None:
                answered(got)
        return found

    def _check(self, files: list[tuple[str, Path, Probe]], options: ReadOptions, *, stoppable: bool) -> dict[str, Probe] | None:
        with self._lock:
            if self._stopped and stoppable:
                return None
        folder = files[0][1].parent
        job = {
            "paths": [str(path) for _, path, _ in files],
            "max_document_bytes": options.max_document_bytes,
            "clock_skew": options.clock_skew,
            "require_encryption": options.require_encryption,
            "parent_pid": os.getpid(),
            "nice": 19,
        }
        keys = options.keyring.worker_material() if options.keyring is not None else None
        message = frame(orjson.dumps({"job": job, "keys": keys}))
        del keys
        try:
            worker = Worker(message, module=_MODULE)
        except OSError as exc:  # no process to be had: the prune checks in this process
            log.warning("%s: could not start the backup-check worker (%s); checking in process", folder, exc)
            raise _NoWorker from None
        del message
        self.jobs += 1
        with self._lock:
            self._running = (worker, stoppable)
            if self._stopped and stoppable:
                worker.kill()
        try:
            reply = worker.result(WORKER_TIMEOUT)
        except WorkerFailed as exc:
            if worker.killed and stoppable and self._stopped:
                return None
            raise _failed(folder, str(exc)) from None
        finally:
            with self._lock:
                self._running = None
        if not reply["ok"]:
            raise _failed(folder, str(reply.get("error", "failed"))[:500])
        verdicts = reply.get("verdicts")
        if not isinstance(verdicts, list):
            raise _failed(folder, "answer is malformed")
        asked = {name: seen for name, _, seen in files}
        found: dict[str, Probe] = {}
        for v in verdicts:
            if not isinstance(v, dict) or v.get("name") not in asked or not isinstance(v.get("valid"), bool):
                raise _failed(folder, "answer is malformed")
            seen = _probe(v.get("probe"))
            if seen is None:
                raise _failed(folder, "answer is malformed")
            if v["valid"]:
                found[v["name"]] = seen
        return found

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            running = self._running
        if running is not None and running[1]:
            running[0].kill()


def _failed(folder: Path, reason: str) -> PersistenceError:
    return PersistenceError(
        folder,
        operation="backup check worker",
        reason=reason,
        outcome="no backup was removed or quarantined",
        next_step="nothing to do: the next prune checks again (compaction='thread' checks in the bot's process)",
    )
