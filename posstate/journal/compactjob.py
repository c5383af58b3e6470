"""The compaction worker (issue 14): the O(state) half of a background compaction, in a process of its own,
as a pure function of files.

At a rotation the old segment is sealed: every record up to the rotation's sequence number S is durable in
it, and the snapshot on disk names it. This worker reads that snapshot (authenticated, not validated again:
see :func:`compact`) and that segment (every record validated), checks that the replay ends exactly at S in
the segment the rotation named (else it *refuses*, and the manager compacts in its own process instead),
stamps what the manager's job says (generation, journal entry, writer, written_at, tombstone floor), encodes
with the write key (fresh random nonces: this is a new interpreter, never a fork), writes an fsynced temp
file beside the state file, reads it back (the same bytes, and they decode) and answers with the temp's
name, trailer checksum, size and counts. It never renames, deletes or cuts anything but its own temp:
installing the snapshot is the manager's (posstate/manager/procompaction.py, docs/JOURNAL.md "Background
compaction").

Run as ``python -m posstate.journal.compactjob``: one JSON job on stdin (with the key material, which is
never in argv, the environment or a file), one JSON answer on stdout. Nothing secret is ever written to
stdout or stderr.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from posstate.core.errors import PosStateError, WrongKeyError
from posstate.journal.records import read_records
from posstate.model import ops as jops
from posstate.model.state import SCHEMA_VERSION, SCHEMA_VERSION_PLAIN, utc_text
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

#: The largest job or answer read from a pipe (bytes); anything longer is refused, never parsed.
MAX_MESSAGE = 1024 * 1024
#: TEST ONLY: ``<action>@<step>`` makes the worker SIGKILL itself (``kill``), hang until killed (``hang``),
#: answer garbage (``garbage``), wait until its manager is gone (``orphan``) or flip a byte of its temp file
#: (``flip``, at ``written`` only) at a step (``start``, ``read``, ``encoded``, ``written``, ``verified``; the
#: backup-check worker, posstate/backup/checkjob.py: ``check`` before its first file, ``checked`` after each).
#: The manager passes it to the worker only when it is set in its own environment (tests set it).
TEST_HOOK = "POSSTATE_TEST_COMPACT_WORKER"


class Refused(Exception):
    """The files are not what the rotation describes: the manager compacts in process instead."""


@dataclass(frozen=True, slots=True)
class CompactJob:
    """What the manager asks for: the files, the rotation they must end at, and what to stamp."""

    state_path: str
    journal_path: str
    temp_path: str
    expected_checksums: list[str]  # trailer checksums the state file may have (what the manager wrote or loaded)
    segment_id: str  # the sealed segment (the journal id the snapshot on disk names)
    last_seq: int  # S: the last record of the sealed segment
    generation: int
    journal: dict[str, Any]  # the new snapshot's journal entry (the new segment, S)
    written_at_ms: int
    writer: dict[str, Any]
    tombstone_floor: int | None
    compression_level: int | None
    encrypt: bool
    max_document_bytes: int
    clock_skew: float
    parent_pid: int
    nice: int = 19


@dataclass(frozen=True, slots=True)
class Answer:
    """The worker's answer: the fsynced, verified temp file and what the manager checks before installing it."""

    temp_path: str
    checksum: str
    size: int
    generation: int
    positions: int


#: The process that started this worker (its manager): the test hook's ``orphan`` waits until it is gone.
_started_by = os.getppid()


def _hook(step: str, path: Path | None = None) -> None:
    spec = os.environ.get(TEST_HOOK, "")
    action, _, at = spec.partition("@")
    if at != step:
        return
    if action == "flip" and path is not None:  # one byte of the temp file changed on disk after its write
        size = len(fs.read_file(path, max_size=None))
        fd = fs.open_(path, os.O_RDWR)
        try:
            fs.pwrite_all(fd, bytes([fs.pread(fd, 1, size // 2)[0] ^ 0x01]), size // 2)
        finally:
            fs.close(fd)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        signal.pause()  # until the manager's timeout (or a save, load or close) kills this process
    if action == "orphan":
        for _ in range(12000):  # at most about 2 minutes
            if os.getppid() != _started_by:  # (not the parent at this step: it may be gone already)
                return
            time.sleep(0.01)
    if action == "garbage":
        sys.stdout.buffer.write(b"\x00not json")
        sys.stdout.flush()
        os._exit(0)


class _FaultyOps(fs.FileOps):
    """Tests only (``fault@<op>:<errno>`` in TEST_HOOK): the worker's own write, fsync or read-back of its
    temp fails with *errno*, as a full or failing disk would make it fail."""

    def __init__(self, op: str, errno: int, temp: str) -> None:
        self.op, self.errno, self.temp = op, errno, temp

    def _fail(self) -> None:
        raise OSError(self.errno, os.strerror(self.errno))

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.op == "write":
            self._fail()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.op == "fsync":
            self._fail()
        super().fsync(fd)

    def read_file(self, path: fs.StrPath, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        if self.op == "readback" and str(path) == self.temp:
            self._fail()
        return super().read_file(path, limit, max_size=max_size)


def _faults(job: CompactJob) -> contextlib.AbstractContextManager[object]:
    """The file operations the compaction runs under: the real ones, or under TEST_HOOK ``fault@op:errno``
    (op: write, fsync or readback) ones that fail there."""
    action, _, at = os.environ.get(TEST_HOOK, "").partition("@")
    if action != "fault":
        return contextlib.nullcontext()
    op, _, errno = at.partition(":")
    return fs.use(_FaultyOps(op, int(errno), job.temp_path))


def _orphaned(job: CompactJob, tmp: Path | None = None) -> None:
    """The manager died (SIGKILL): nobody will install the snapshot. Remove the temp and stop."""
    if os.getppid() != job.parent_pid:
        if tmp is not None:
            _atomic.quiet_unlink(tmp)
        os._exit(3)


def _replay(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """Apply one validated journal operation to a snapshot's document, as :func:`posstate.model.ops.apply`
    applies it to a StateData (the same dict semantics: a changed key keeps its place, a new one goes last)."""
    name, rev = op["op"], op["rev"]
    tombs = doc["tombstones"]
    if name == jops.SET_POSITION:
        p = op["position"]
        text = f"{p['symbol']}|{p['side']}"
        doc["positions"][text] = {"rev": rev, "position": p}
        tombs["positions"].pop(text, None)
    elif name == jops.DELETE_POSITION:
        text = f"{op['symbol']}|{op['side']}"
        doc["positions"].pop(text, None)
        tombs["positions"][text] = rev
    elif name == jops.SET_BOT_METADATA:
        doc["bot_metadata"] = {"rev": rev, "data": op["data"]}
    elif name == jops.SET_METADATA:
        doc["symbol_metadata"][op["symbol"]] = {"rev": rev, "data": op["data"]}
        tombs["symbol_metadata"].pop(op["symbol"], None)
    else:
        doc["symbol_metadata"].pop(op["symbol"], None)
        tombs["symbol_metadata"][op["symbol"]] = rev


def _stamp(doc: dict[str, Any], job: CompactJob) -> dict[str, Any]:
    """The new snapshot's document: what the job stamps, old tombstones dropped, keys in the order
    :func:`posstate.model.document.build_document` writes them."""
    if job.tombstone_floor is not None:  # as merge.drop_old_tombstones does on a StateData
        for kind in ("positions", "symbol_metadata"):
            old = doc["tombstones"][kind]
            doc["tombstones"][kind] = {k: r for k, r in old.items() if r > job.tombstone_floor}
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION if doc.get("bot_metadata") is not None else SCHEMA_VERSION_PLAIN,
        "generation": job.generation,
        "written_at": utc_text(job.written_at_ms),
        "writer": dict(job.writer),
    }
    if doc.get("account") is not None:
        out["account"] = doc["account"]
    out["positions"] = doc["positions"]
    out["symbol_metadata"] = doc["symbol_metadata"]
    out["tombstones"] = doc["tombstones"]
    out["journal"] = dict(job.journal)
    if doc.get("bot_metadata") is not None:
        out["bot_metadata"] = doc["bot_metadata"]
    return out


def compact(job: CompactJob, keyring: Keyring | None) -> Answer:
    """Snapshot + sealed segment -> a verified temp file holding the state at the rotation (raises Refused).

    The snapshot is never validated again nor turned into Positions: its bytes must carry a checksum the
    manager wrote or loaded from validated memory (SHA-256 of the whole file, checked against the bytes),
    and with encryption on AES-GCM authenticates them under the key, so they are that validated document.
    The segment's records are authenticated and validated one by one (journal/records.py) and replayed on
    the parsed document; the result is encoded from it (no Position is built), and read back as an
    in-process save reads back its file: the same bytes, and they decode (manager/commit.py)."""
    options = _statefile.ReadOptions(
        keyring=keyring,
        max_document_bytes=job.max_document_bytes,
        clock_skew=job.clock_skew,
        require_encryption=job.encrypt,
    )
    state_path = Path(job.state_path)
    try:
        raw = _statefile.read_bytes(state_path, max_size=options.max_file_bytes)
        _codec.inspect(raw, path=state_path)  # the trailer's SHA-256 holds for these bytes
        if _format.checksum_of(raw) not in job.expected_checksums:
            raise Refused("the state file is not the one the manager wrote or loaded")
        header, payload = _codec.decode(raw, keyring=keyring, path=state_path, max_document_bytes=job.max_document_bytes)
        if job.encrypt and not header.encrypted:
            raise WrongKeyError(state_path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
        del raw
        doc = orjson.loads(payload)  # bytes the manager encoded from validated memory: parsed, not re-validated
        del payload
    except (PosStateError, orjson.JSONDecodeError) as exc:
        raise Refused(f"the state file does not load ({exc})") from exc
    if not isinstance(doc, dict) or header.position_count != len(doc.get("positions", ())):
        raise Refused("the state file does not hold the document its header describes")
    snap = doc.get("journal") or {}
    if snap.get("id") != job.segment_id:
        raise Refused("the snapshot on disk does not name the sealed segment")
    snap_seq = int(snap.get("seq", 0))
    jpath = Path(job.journal_path)
    data = fs.read_file(jpath, max_size=options.max_file_bytes)
    try:
        jheader, records, sc = read_records(data, path=jpath, keyring=keyring, require_encryption=job.encrypt)
    except PosStateError as exc:
        raise Refused(f"the sealed segment does not read ({exc})") from exc
    if jheader.id_hex != job.segment_id:
        raise Refused("the journal file is not the sealed segment")
    if sc.bad_offset is not None:
        raise Refused("the sealed segment has a torn tail")
    last = records[-1][0].seq if records else jheader.base_seq
    if last != job.last_seq:
        raise Refused(f"the sealed segment ends at record {last}, the rotation at {job.last_seq}")
    expect = snap_seq + 1
    for rec, ops in records:
        if rec.seq <= snap_seq:
            continue
        if rec.seq != expect:
            raise Refused(f"record {expect} is missing from the sealed segment")
        expect += 1
        for op in ops:  # a fold record has none (journal/fold.py)
            _replay(doc, op.json)
    if expect - 1 != job.last_seq:
        raise Refused("the snapshot on disk is past the rotation")
    del records, data
    _hook("read")
    _orphaned(job)
    doc = _stamp(doc, job)
    positions = len(doc["positions"])
    encoded = _codec.encode(
        orjson.dumps(doc),
        generation=job.generation,
        written_at_ms=job.written_at_ms,
        position_count=positions,
        compression_level=job.compression_level,
        keyring=keyring if job.encrypt else None,
        schema_version=doc["schema_version"],
    )
    del doc
    _hook("encoded")
    _orphaned(job)
    tmp = Path(job.temp_path)
    _atomic.write_temp(state_path, encoded.data, name=tmp)
    try:
        _hook("written", tmp)
        back = fs.read_file(tmp, max_size=options.max_file_bytes)
        if back != encoded.data:
            raise OSError(5, "temp file read back differs from what was written")
        try:  # AES-GCM and zstd, as an in-process save checks its file (manager/commit.py, _verify_written)
            _codec.decode(back, keyring=keyring, path=tmp, max_document_bytes=job.max_document_bytes)
        except PosStateError as exc:
            raise OSError(5, f"temp file read back does not decode ({exc})") from exc
        del back
        _hook("verified")
        _orphaned(job, tmp)
    except BaseException:
        _atomic.quiet_unlink(tmp)
        raise
    return Answer(
        temp_path=str(tmp),
        checksum=encoded.checksum,
        size=len(encoded.data),
        generation=job.generation,
        positions=positions,
    )


def frame(body: bytes) -> bytes:
    """A job as it goes down the worker's stdin: its length in decimal and a newline, then its bytes."""
    return b"%d\n" % len(body) + body


def read_message(stream: BinaryIO) -> bytes:
    """The job :func:`frame` wrote, read by its length: never until an end of file, which a copy of the pipe's
    write end (in a process the bot forked meanwhile) would hold off until that process exits. Longer than
    MAX_MESSAGE: MAX_MESSAGE + 1 bytes (refused)."""
    head = stream.readline(24)
    if not head.endswith(b"\n") or not head[:-1].isdigit():
        return b""
    size = int(head[:-1])
    return stream.read(min(size, MAX_MESSAGE + 1))


def _failure(exc: BaseException) -> str:
    """A message for the manager's log: a posstate error's own text (never secret), else the type and errno."""
    if isinstance(exc, PosStateError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} (errno {exc.errno}: {exc.strerror})"
    return type(exc).__name__


def _yield_processor(nice: int) -> None:
    """The bot's threads come first: the worker runs at *nice* (19: the lowest share; a bot's thread waking from
    its ``fdatasync`` preempts it). Never ``SCHED_IDLE``: on a machine kept busy by other processes an idle-class
    worker may never run, and the journal would grow while the compaction it waits for starves."""
    if not nice:
        return
    with contextlib.suppress(OSError):
        os.nice(nice)


def _no_core() -> None:
    """This process will hold the key: a crash must never write it to a core file (its working directory is
    the package's folder; issue 14 attack). Before the job is read."""
    try:
        import resource
    except ImportError:  # not on a Unix
        return
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _oom_first() -> None:
    """This process holds a second copy of the state: under a memory limit the kernel's OOM killer must take
    it (its attempt fails and the compaction is retried, in the bot's process after WORKER_TRIES), never the
    bot. Linux: a process may always raise its own ``oom_score_adj``; elsewhere nothing to do."""
    with contextlib.suppress(OSError):
        fd = fs.open_("/proc/self/oom_score_adj", os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fs.write_all(fd, b"1000")
        finally:
            fs.close(fd)


def prepare_process() -> None:
    """A worker's first steps, before it reads a key: no core file, the OOM killer's first choice, deaf to a
    Ctrl-C meant for the bot (the bot decides; close() kills it), the collector off (one pass over the data)."""
    _no_core()
    _oom_first()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()


def read_job(stream: BinaryIO) -> tuple[dict[str, Any], Keyring | None]:
    """The job and the keys from the bot's pipe (raises on anything else: the answer says it failed)."""
    raw = read_message(stream)
    if len(raw) > MAX_MESSAGE:
        raise ValueError("job too large")
    msg = orjson.loads(raw)
    job, material = dict(msg["job"]), msg.get("keys")
    del raw, msg
    return job, Keyring.from_worker_material(material) if material is not None else None


def main() -> int:
    prepare_process()
    out: dict[str, Any]
    try:
        raw_job, keyring = read_job(sys.stdin.buffer)
        job = CompactJob(**raw_job)
        _yield_processor(job.nice)
        _hook("start")
        with _faults(job):
            answer = compact(job, keyring)
        out = {"ok": True, "answer": asdict(answer)}
    except Refused as exc:
        out = {"ok": False, "refused": str(exc)}
    except Exception as exc:  # every failure is one line of the answer; the manager retries
        out = {"ok": False, "error": _failure(exc)}
    try:
        sys.stdout.buffer.write(orjson.dumps(out))
        sys.stdout.flush()
    except BrokenPipeError:  # the manager is gone: it will sweep the temp
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
