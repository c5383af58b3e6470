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

Run as ``python -m posstate.journal.compactjob``: framed JSON jobs on stdin, one after another while the
manager keeps it (each with the key material, which is never in argv, the environment or a file, and not
referenced once its job is answered), one framed JSON answer per job on stdout (posstate/journal/jobpipe.py).
Nothing secret is ever written to stdout or stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from posstate.core.errors import PosStateError, WrongKeyError
from posstate.journal.jobpipe import (
    MAX_MESSAGE,
    Inbox,
    answer,
    failure,
    frame,
    parse_job,
    prepare_process,
    read_job,
    yield_processor,
)
from posstate.journal.records import read_records
from posstate.model import ops as jops
from posstate.model.state import SCHEMA_VERSION, SCHEMA_VERSION_PLAIN, utc_text
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

# Names other workers and the manager import from here (posstate/journal/jobpipe.py holds them now).
__all__ = ["MAX_MESSAGE", "Answer", "CompactJob", "Kept", "Refused", "compact", "frame", "prepare_process", "read_job"]
_failure, _yield_processor = failure, yield_processor
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
    idle_s: float = 0.0  # a kept worker waits this long for its next job, then exits (0: after this job)


@dataclass(frozen=True, slots=True)
class Answer:
    """The worker's answer: the fsynced, verified temp file and what the manager checks before installing it."""

    temp_path: str
    checksum: str
    size: int
    generation: int
    positions: int
    kept: bool = False  # started from the document this (kept) worker remembered, not from the file


class Kept:
    """What a kept worker remembers between jobs: the document of the last snapshot it wrote, by that file's
    trailer checksum (the SHA-256 of its bytes). A state file on disk with that checksum, whose bytes hash to
    it, is byte for byte the file this worker encoded from that document: its next job starts from the
    document instead of decrypting, decompressing and parsing the file again. Taken out before it is changed,
    put back only once a new snapshot is written and verified: a job that fails or refuses leaves nothing."""

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple[str, str, bool, dict[str, Any]] | None = None

    def take(self, state_path: str, checksum: str, *, encrypted: bool) -> dict[str, Any] | None:
        entry, self._entry = self._entry, None
        if entry is None or entry[:2] != (state_path, checksum) or (encrypted and not entry[2]):
            return None
        return entry[3]

    def put(self, state_path: str, checksum: str, *, encrypted: bool, doc: dict[str, Any]) -> None:
        self._entry = (state_path, checksum, encrypted, doc)


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


def _parse(raw: bytes, job: CompactJob, keyring: Keyring | None, state_path: Path) -> dict[str, Any]:
    """The document of the state file's bytes: authenticated and decompressed, parsed, not re-validated (bytes
    the manager encoded from validated memory)."""
    header, payload = _codec.decode(raw, keyring=keyring, path=state_path, max_document_bytes=job.max_document_bytes)
    if job.encrypt and not header.encrypted:
        raise WrongKeyError(state_path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
    doc = orjson.loads(payload)
    del payload
    if not isinstance(doc, dict) or header.position_count != len(doc.get("positions", ())):
        raise Refused("the state file does not hold the document its header describes")
    return doc


def compact(job: CompactJob, keyring: Keyring | None, kept: Kept | None = None) -> Answer:
    """Snapshot + sealed segment -> a verified temp file holding the state at the rotation (raises Refused).

    The snapshot is never validated again nor turned into Positions: its bytes must carry a checksum the
    manager wrote or loaded from validated memory (SHA-256 of the whole file, checked against the bytes),
    and with encryption on AES-GCM authenticates them under the key, so they are that validated document.
    The segment's records are authenticated and validated one by one (journal/records.py) and replayed on
    the parsed document; the result is encoded from it (no Position is built), and read back as an
    in-process save reads back its file: the same bytes, and they decode (manager/commit.py). With *kept*
    (a kept worker), the document of a state file this worker wrote itself is not read again (:class:`Kept`),
    and the new snapshot's document is remembered."""
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
        checksum = _format.checksum_of(raw)
        if checksum not in job.expected_checksums:
            raise Refused("the state file is not the one the manager wrote or loaded")
        doc = kept.take(job.state_path, checksum, encrypted=job.encrypt) if kept is not None else None
        remembered = doc is not None
        if doc is None:
            doc = _parse(raw, job, keyring, state_path)
        del raw
    except (PosStateError, orjson.JSONDecodeError) as exc:
        raise Refused(f"the state file does not load ({exc})") from exc
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
    if kept is not None:
        kept.put(job.state_path, encoded.checksum, encrypted=job.encrypt, doc=doc)
    del doc
    return Answer(
        temp_path=str(tmp),
        checksum=encoded.checksum,
        size=len(encoded.data),
        generation=job.generation,
        positions=positions,
        kept=remembered,
    )


def _run(raw: bytes, kept: Kept) -> tuple[dict[str, Any], float]:
    """One job: its answer, and how long to wait for the next one (0: exit)."""
    idle = 0.0
    try:
        raw_job, keyring = parse_job(raw)
        job = CompactJob(**raw_job)
        idle = job.idle_s
        _hook("start")
        with _faults(job):
            done = compact(job, keyring, kept)
        return {"ok": True, "answer": asdict(done)}, idle
    except Refused as exc:
        return {"ok": False, "refused": str(exc)}, idle
    except Exception as exc:  # every failure is one line of the answer; the manager retries
        return {"ok": False, "error": _failure(exc)}, idle


def main() -> int:
    """Jobs one after another, each answered, while the manager keeps this worker (the job's ``idle_s``):
    exits at an end of file, when the manager is gone, or after ``idle_s`` seconds without a job
    (posstate/journal/jobpipe.py)."""
    prepare_process()
    _yield_processor(19)  # the boot lowered it already where it could; never raised again
    inbox, kept, idle = Inbox(sys.stdin.fileno(), _started_by), Kept(), 600.0
    while True:
        try:
            raw = inbox.next(idle)
        except ValueError as exc:  # not a framed job: the stream cannot be trusted past it
            answer({"ok": False, "error": str(exc)})
            return 0
        if isinstance(raw, int):
            return raw
        out, idle = _run(raw, kept)
        del raw  # the job's bytes hold its keys: not kept while this worker waits for the next job
        if not answer(out):
            return 3  # the manager is gone: it will sweep the temp
        if idle <= 0:
            return 0


if __name__ == "__main__":
    sys.exit(main())
