"""The write-ahead journal: durable updates by appending one record and syncing once.

The manager holds one :class:`Journal`. Every change goes through :meth:`Journal.append` (memory first,
then the record; on any failure memory is put back and :class:`~posstate.PersistenceError` raised).
``durability="sync"`` syncs each record before returning; ``"group"`` lets concurrent callers share one
``fdatasync`` (leader/follower, :meth:`Journal.settle`); ``"snapshot"`` records nothing and only replays a
journal an earlier session left. Compaction is a normal atomic save of the snapshot that also starts a new
journal (:meth:`Journal.begin_rotation`). docs/JOURNAL.md has the format and the crash analysis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson

from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    StateLockedError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.journal import format as jf
from posstate.journal.audit import HistoryEntry, JournalCheck, check, history
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.model.ops import Entries, Op, Undo
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs
from posstate.storage import unknown as _unknown
from posstate.storage.crypto import Keyring, key_id

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)

__all__ = ["HistoryEntry", "Journal", "JournalCheck", "check", "history", "read_records", "record_times"]


def _journal_error(path: Path, reason: str) -> CorruptStateError:
    return CorruptStateError(
        path,
        reason,
        next_step=(
            "the journal was kept as is; inspect it with `posstate validate`, "
            "or restore a backup with `posstate backups restore latest`"
        ),
        kind="journal",
    )


def read_records(
    data: bytes, *, path: Path, keyring: Keyring | None, require_encryption: bool = False
) -> tuple[jf.JournalHeader, list[tuple[jf.RawRecord, list[Op]]], jf.Scan]:
    """Parse, authenticate and validate a whole journal. Damage before the last record raises
    CorruptStateError(kind="journal"); a torn last record is reported in the returned Scan, not raised.
    With *require_encryption* (encryption on) a plaintext journal is WrongKeyError, as a plaintext state
    file is: anyone can write one, so its records are never trusted."""
    try:
        header = jf.parse_header(data)
    except jf.JournalTooNew as exc:
        # Not damage: recovering from it would drop the records a newer posstate acknowledged.
        raise UnsupportedVersionError(path, what="journal format", found=exc.found, supported=jf.VERSION) from None
    except jf.JournalProblem as exc:
        raise _journal_error(path, str(exc)) from None
    _refuse_plain(header, path, require_encryption)
    sealer = jf.Sealer(header, _key_for(header, keyring, path))
    sc = jf.scan(data, header)
    if sc.bad_offset is not None and not sc.bad_is_tail:
        seq = sc.records[-1].seq + 1 if sc.records else header.base_seq + 1
        raise _journal_error(
            path,
            f"record {seq} at byte {sc.bad_offset} is damaged ({sc.bad_reason}), not a torn last record; replay stopped there",
        )
    out: list[tuple[jf.RawRecord, list[Op]]] = []
    for rec in sc.records:
        plain = sealer.open(rec)
        if plain is None:
            # The key id matched (_key_for), so this is not another key: the record was tampered with, or
            # (version 3) spliced from another copy of this journal. Damage: a load recovers the records before it.
            raise _journal_error(
                path,
                f"record {rec.seq} at byte {rec.offset} fails authentication (tampered with, or taken from another "
                "copy of this journal); replay stopped there",
            )
        try:
            raw_ops = orjson.loads(plain)
        except orjson.JSONDecodeError:
            raise _journal_error(path, f"record {rec.seq} is not valid JSON") from None
        if type(raw_ops) is not list or not raw_ops or (rec.kind == jf.KIND_OP and len(raw_ops) != 1):
            raise _journal_error(path, f"record {rec.seq} holds no valid operation list")
        out.append((rec, [jops.from_json(j, path=path, seq=rec.seq) for j in raw_ops]))
    return header, out, sc


def replay_prefix(
    path: Path, *, keyring: Keyring | None, state: StateData, require_encryption: bool = False
) -> tuple[int, int, str]:
    """Apply to *state* the journal records that can be trusted, stopping at the first one that cannot.

    Read-only (for recovery, when the journal is damaged before its last record): returns (records applied,
    highest revision applied, what stopped the replay or ""). Nothing is applied when the journal belongs to
    another snapshot, its header cannot be read, or (*require_encryption*) it is not encrypted. A record is
    applied whole or not at all.
    """
    try:
        data = fs.read_file(path)
    except FileNotFoundError:
        return 0, 0, "no journal"
    except OSError as exc:
        return 0, 0, f"journal unreadable ({exc.strerror or exc})"
    try:
        header = jf.parse_header(data)
    except jf.JournalTooNew as exc:
        return 0, 0, str(exc)
    except jf.JournalProblem as exc:
        return 0, 0, f"journal header damaged ({exc})"
    snap = state.journal or {}
    if header.id_hex != snap.get("id"):
        return 0, 0, f"journal {header.id_hex} belongs to another snapshot"
    try:
        _refuse_plain(header, path, require_encryption)
        sealer = jf.Sealer(header, _key_for(header, keyring, path))
    except (MissingKeyError, WrongKeyError) as exc:
        return 0, 0, str(exc)
    sc = jf.scan(data, header)
    snap_seq = int(snap.get("seq", 0))
    applied = max_rev = 0
    for rec in sc.records:
        plain = sealer.open(rec)
        if plain is None:
            return applied, max_rev, f"record {rec.seq} fails authentication"
        try:
            raw_ops = orjson.loads(plain)
            if type(raw_ops) is not list or not raw_ops:
                raise ValueError("no operations")
            ops = [jops.from_json(j, path=path, seq=rec.seq) for j in raw_ops]
        except (ValueError, TypeError, CorruptStateError):
            return applied, max_rev, f"record {rec.seq} holds no valid operation list"
        if rec.seq <= snap_seq:
            continue
        for op in ops:
            jops.apply(state, {}, op)
            max_rev = max(max_rev, int(op.json["rev"]))
        applied += 1
    if sc.bad_offset is not None:
        return applied, max_rev, f"byte {sc.bad_offset}: {sc.bad_reason}"
    return applied, max_rev, ""


def _refuse_plain(header: jf.JournalHeader, path: Path, require_encryption: bool) -> None:
    if require_encryption and not header.encrypted:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, downgrade=True)


def journal_file(path: Path, legacy: Path | None, snapshot_journal: dict[str, Any] | None) -> Path:
    """The one place that decides which journal file a load of the snapshot naming *snapshot_journal* reads
    (every reader and writer asks here): *path* (``positions.json.journal``) or the old name *legacy*
    (``positions.journal``, posstate up to 0.1.0).

    Whichever file's header names the snapshot's journal id is the one: the old name only then (another state
    file of the directory, ``positions.dat``, used the same old name). If both name it, the one holding
    records past the snapshot's sequence number; if both do, neither can be chosen without losing
    acknowledged records: CorruptStateError(kind="journal") naming both files. Otherwise *path*.
    Reads headers only, and the records (keyless frames) only when both headers name the snapshot's journal.
    """
    if legacy is None or snapshot_journal is None or not fs.exists(legacy):
        return path
    want = snapshot_journal.get("id")
    if _file_id(legacy) != want:
        return path
    if _file_id(path) != want:
        return legacy  # the new name is missing, damaged, or an older journal: the old name holds the snapshot's
    snap_seq = int(snapshot_journal.get("seq", 0))
    ahead = [p for p in (path, legacy) if _last_framed_seq(p) > snap_seq]
    if len(ahead) == 2:
        raise CorruptStateError(
            path,
            f"both {path.name} and {legacy.name} are journal {want} and both hold records past the snapshot "
            f"(sequence {snap_seq}); neither can be replayed without dropping the other's",
            next_step=f"keep the one the bot last wrote and move the other ({path} or {legacy}) out of the directory",
            kind="journal",
        )
    return ahead[0] if ahead else path


def journal_files_of(path: Path, legacy: Path | None, snapshot_journals: Sequence[dict[str, Any] | None]) -> list[Path]:
    """The journal files on disk that belong to this state file, for moving aside (recovery, repair, restore):
    *path* if it exists, and the old name *legacy* when :func:`journal_file` picks it for any of
    *snapshot_journals* (only then is it ours, not another state file's)."""
    found = [path] if fs.exists(path) else []
    if legacy is not None and any(journal_file(path, legacy, j) == legacy for j in snapshot_journals if j is not None):
        found.append(legacy)
    return found


def _file_id(path: Path) -> str | None:
    """The journal id in the header of the file at *path* (None: missing, unreadable or not a journal)."""
    try:
        return _header_id(fs.read_file(path, jf.HEADER_SIZE))
    except OSError:
        return None


def _last_framed_seq(path: Path) -> int:
    """The sequence number of the last intact frame at *path* (keyless; 0 when none can be read)."""
    try:
        data = fs.read_file(path)
        header = jf.parse_header(data)
    except (OSError, jf.JournalProblem):
        return 0
    records = jf.scan(data, header).records
    return records[-1].seq if records else 0


def record_times(*paths: Path | None) -> dict[int, int]:
    """Sequence number -> time (ms) of every record the journals at *paths* frame, read-only and keyless.

    For the stale-backup guard and recovery's threshold: an acknowledged change is as new as its record. The
    times are not authenticated here (a forged later time can only make a backup look older, i.e. refuse
    more restores). Anything unreadable gives what could be read, or nothing.
    """
    times: dict[int, int] = {}
    for path in paths:  # the journal's name, then the old name (posstate up to 0.1.0), whichever exist
        if path is None:
            continue
        try:
            data = fs.read_file(path)
            header = jf.parse_header(data)
        except (OSError, jf.JournalProblem):
            continue
        for rec in jf.scan(data, header).records:
            times[rec.seq] = max(rec.time_ms, times.get(rec.seq, 0))
    return times


def _key_for(header: jf.JournalHeader, keyring: Keyring | None, path: Path) -> bytes | None:
    if not header.encrypted:
        return None
    if keyring is None:
        raise MissingKeyError(path, reason=f"the journal is encrypted (key id {header.key_id}) and no key was supplied")
    if header.passphrase != keyring.uses_passphrase:
        raise WrongKeyError(
            path, file_key_id=header.key_id, our_key_id="not a " + ("passphrase" if header.passphrase else "raw key")
        )
    key = keyring.key_for(header.salt, header.kdf_log2_n)
    ours = key_id(key)
    if ours != header.key_id:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=ours)
    return key


def _header_id(data: bytes) -> str | None:
    try:
        return jf.parse_header(data).id_hex
    except jf.JournalProblem:
        return None


def _temp_seq(data: bytes, snap_id: str | None) -> int:
    """The sequence number of the record in a journal-creation temp, counted only when the temp's header
    parses and names the snapshot's journal *snap_id* and the number is one a header may name (at most
    ``jf.MAX_BASE``); else 0. Nothing authenticates a temp (anyone can plant one): it may only keep the
    sequence moving forward within what a snapshot holds, never past it. (With a random nonce per record
    the bump is no longer what keeps a nonce unique; it keeps sequence numbers from being handed out twice.)"""
    try:
        header = jf.parse_header(data)
    except jf.JournalProblem:
        return 0
    if snap_id is None or header.id_hex != snap_id:
        return 0
    start = jf.HEADER_SIZE + header.frame_head
    if len(data) < start + 8:
        return 0
    seq = int.from_bytes(data[start : start + 8], "big")
    return seq if seq <= jf.MAX_BASE else 0


class Rotation:
    """A compaction in progress: the snapshot being written names the next journal (*header*)."""

    def __init__(self, journal: Journal, header: jf.JournalHeader | None) -> None:
        self._journal = journal
        self._header = header

    def abort(self) -> None:
        """The snapshot write failed. It may still have been renamed into place (a failed directory fsync
        or read-back), naming a journal that never started: never append to the old journal again."""
        self._journal._needs_rotation = True

    def finish(self) -> None:
        """Called once the snapshot is durable. Never raises."""
        self._journal._install(self._header)


class Journal:
    """The journal file of one state directory, owned by one manager (callers hold the manager's lock,
    except around :meth:`settle`)."""

    def __init__(
        self,
        path: Path,
        *,
        mode: Mode,
        quarantine_dir: Path,
        read_keyring: Keyring | None,
        write_keyring: Keyring | None,
        max_bytes: int,
        max_records: int,
        preallocate: int = 1024 * 1024,
        emit: Emit | None = None,
        legacy_path: Path | None = None,
        on_unknown: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.path = path
        self._legacy = legacy_path  # the old name (positions.journal): read once, never written
        self._legacy_read: Path | None = None  # replayed from the old name: retired once a snapshot holds it
        self.mode = mode
        self.active = mode != "snapshot"  # the mode never changes: a plain attribute keeps the hot path short
        self._quarantine = quarantine_dir
        self._read_keyring = read_keyring
        self._write_keyring = write_keyring
        self._max_bytes = max_bytes
        self._max_records = max_records
        self._preallocate = preallocate
        self._emit = emit
        #: Called before each record is written and before each group sync; raises (StateLockedError)
        #: when this process no longer owns the state's writer lock, so nothing more is written.
        self.guard: Callable[[], None] | None = None
        # Called (without the manager's lock) when a failed change may still be on disk; returns True if
        # that was recorded durably (docs/JOURNAL.md, "Outcome unknown").
        self._on_unknown = on_unknown
        #: (journal id, first, last sequence number) the last recover() replayed from this file, or None.
        self.replayed: tuple[str, int, int] | None = None
        #: Time (ms) of the newest record written or replayed by this manager (0: none): an acknowledged
        #: change, which the stale-backup guard counts (issue 12.11).
        self.last_time_ms = 0
        self._fd: int | None = None
        self._header: jf.JournalHeader | None = None
        self._sealer: jf.Sealer | None = None
        # The journal the snapshot on disk names but that has no file yet: created with the first record.
        self._next_header: jf.JournalHeader | None = None
        # True once the file now at self.path was replayed (or found redundant or absent), so that a durable
        # snapshot of memory makes it redundant: only then may a new journal be renamed over it. Otherwise
        # (the load failed on it) it goes to quarantine first.
        self._replace_ok = False
        self._end = 0  # byte offset just after the last record: where the next one is written
        self._alloc = 0  # the file's size: records, then the zeros written ahead (see _padding)
        self._records = 0
        self._last_seq = 0  # highest sequence number ever handed out (burned even if its write failed)
        self._needs_rotation = True
        self._compact_retry_at = 0
        self._cond = threading.Condition(threading.RLock())  # re-entrant: append() holds it around _create()
        self._written_seq = 0
        self._durable_seq = 0
        self._durable_end = 0  # byte offset just after the last durable record (group mode cuts back to it)
        self._seq_end: dict[int, int] = {}  # group mode: byte offset just after each record not yet durable
        self._syncing = False
        self._failure: tuple[int, PosStateError] | None = None
        # (lo, hi, cause): records lo < seq <= hi failed in a group sync. Kept for good: a waiter that wakes
        # after the journal was already rotated must still learn that its record failed.
        # The last item is the outcome text when the records may still be on disk (the cut failed), else None.
        self._failed_ranges: list[tuple[int, int, OSError, str | None]] = []
        self._pending: list[tuple[int, list[Undo]]] = []

    # ------------------------------------------------------------------------------------------ status
    @property
    def journal_id(self) -> str | None:
        found = self._header or self._next_header
        return found.id_hex if found is not None else None

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def size(self) -> int:
        return self._end

    @property
    def records(self) -> int:
        return self._records

    # ------------------------------------------------------------------------------------------ recovery
    def recover(self, st: StateData) -> int:
        """Replay the journal into the freshly loaded snapshot *st*; return the highest revision replayed.

        A torn last record is cut off after the journal is copied to quarantine; damage before it raises
        CorruptStateError(kind="journal"); a journal of another snapshot whose records the snapshot already
        holds is ignored (it is replaced at the next rotation).
        """
        self.drain()  # a reload must not drop records still waiting for their group sync
        self._detach()
        self._replace_ok = False
        self._legacy_read = None
        self.replayed = None
        snap = st.journal or {}
        src = journal_file(self.path, self._legacy, st.journal)
        leftover = self._sweep_temps(snap.get("id"))
        snap_seq = int(snap.get("seq", 0))
        self._last_seq = max(snap_seq, leftover)
        self._needs_rotation = True
        try:
            data = fs.read_file(src)
        except FileNotFoundError:
            self._replace_ok = True
            self._plan_file(st)
            return 0
        except OSError as exc:
            raise PersistenceError(src, operation="read journal", cause=exc) from exc
        header, records, sc = read_records(
            data, path=src, keyring=self._read_keyring, require_encryption=self._write_keyring is not None
        )
        last = records[-1][0].seq if records else header.base_seq
        if header.id_hex != snap.get("id"):
            if last > snap_seq:
                raise _journal_error(
                    self.path,
                    f"journal {header.id_hex} holds records up to {last}, but the snapshot (generation {st.generation}) "
                    f"belongs to journal {snap.get('id')} and holds only up to {snap_seq}",
                )
            self._last_seq = max(snap_seq, last, leftover)
            log.info("journal %s is older than the snapshot and fully contained in it", self.path)
            self._replace_ok = True
            self._plan_file(st)
            return 0
        max_rev = 0
        first = 0
        for rec, ops in records:
            if rec.seq <= snap_seq:
                continue
            for op in ops:
                jops.apply(st, {}, op)
                max_rev = max(max_rev, op.json["rev"])
            first = first or rec.seq
            self.last_time_ms = max(self.last_time_ms, rec.time_ms)
        if first:
            self.replayed = (header.id_hex, first, last)
        self._last_seq = max(snap_seq, last, leftover)
        self._header = header
        self._records = len(records)
        self._replace_ok = True  # replayed in full: once a snapshot holds memory, the file is redundant
        if src != self.path:
            # A file at the new name was not replayed (another journal id, or nothing past the snapshot): it
            # goes to quarantine, not under a rename, when the next journal is created.
            self._replace_ok = not fs.exists(self.path)
            # The journal under the old name: replayed, never continued (the next change compacts, and the
            # next journal has the new name); retired once the snapshot that holds it is durable (_install).
            self._legacy_read = src
            self._last_seq += sc.bad_offset is not None  # a torn record used the next number: never reuse it
            log.info("%s: journal read under its old name %s; the next save retires it", self.path, src.name)
            return max_rev
        if sc.bad_offset is not None:
            self._cut_torn_tail(data, sc)
            self._last_seq += 1  # the torn record used the next number: never reuse it (nor its nonce)
            return max_rev
        self._end, self._alloc = sc.good_end, len(data)
        # Continue this file only if no other file used a number past its end, it is sealed as this manager
        # writes (encrypted exactly when encryption is on), and its nonces are random per record (an
        # encrypted version 1 or 2 journal is replayed, then the next change compacts into a new journal).
        # A journal with no records is never continued (issue 12 review): nothing authenticates its header, and
        # its numbers would steer what the bot writes; the next change rotates to a new journal instead.
        if (
            self.active
            and records
            and self._last_seq == last
            and header.encrypted == (self._write_keyring is not None)
            and header.appendable
        ):
            try:
                self._fd = fs.open_(self.path, O_WRITE, 0o600)
            except OSError as exc:
                raise PersistenceError(self.path, operation="open journal", cause=exc) from exc
            # Version 3 chains each record to the one before: the next one follows the last good record.
            self._sealer = jf.Sealer(header, self._write_key(header), after=records[-1][0])
            self._needs_rotation = False
            self._written_seq = self._durable_seq = self._last_seq
            self._durable_end = self._end
        return max_rev

    def _plan_file(self, st: StateData) -> None:
        """The snapshot names a journal whose file is missing or is an older, redundant journal: the next
        record creates it (no compaction needed). A snapshot naming no journal needs a compaction first."""
        if not self.active or st.journal is None:
            return
        self._install(self._header_for(bytes.fromhex(st.journal["id"]), st.generation))

    def _header_for(self, journal_id: bytes | None, generation: int) -> jf.JournalHeader:
        key, salt, kid, log2_n = None, b"", None, 0
        if self._write_keyring is not None:
            key, salt = self._write_keyring.write_material()
            kid = key_id(key)
            log2_n = self._write_keyring.log2_n if salt else 0
        return jf.new_header(
            base_generation=generation,
            base_seq=self._last_seq,
            created_ms=int(time.time() * 1000),
            key_id=kid,
            salt=salt,
            kdf_log2_n=log2_n,
            journal_id=journal_id,
        )

    def _write_key(self, header: jf.JournalHeader) -> bytes | None:
        if self._write_keyring is None:
            if header.encrypted:
                self._needs_rotation = True
            return None
        if not header.encrypted:  # never a plaintext record while encryption is on
            raise WrongKeyError(self.path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
        return _key_for(header, self._write_keyring, self.path)

    def _cut_torn_tail(self, data: bytes, sc: jf.Scan) -> None:
        dest = self._quarantine_copy(data, label="torn")
        try:
            fd = fs.open_(self.path, O_RDWR, 0o600)
            try:
                fs.ftruncate(fd, sc.good_end)
                fs.fdatasync(fd)
            finally:
                fs.close(fd)
        except OSError as exc:
            raise PersistenceError(self.path, operation="cut torn journal record", cause=exc) from exc
        self._end = self._alloc = sc.good_end
        log.warning(
            "%s: cut a torn last record (%d bytes at %d: %s); copy kept at %s",
            self.path,
            sc.torn_bytes,
            sc.good_end,
            sc.bad_reason,
            dest,
        )
        if self._emit is not None:
            self._emit(
                "stateRepaired",
                {
                    "path": str(self.path),
                    "reason": f"torn last journal record cut ({sc.bad_reason})",
                    "quarantined": str(dest),
                    "bytes_cut": len(data) - sc.good_end,
                },
            )

    def _quarantine_copy(self, data: bytes, *, label: str) -> Path:
        try:
            fs.ensure_dir(self._quarantine)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for attempt in range(1000):
                dest = self._quarantine / f"{self.path.name}.{stamp}.{label}{'' if attempt == 0 else f'.{attempt}'}"
                try:
                    _atomic.write_new_file(dest, data)
                    return dest
                except _atomic.WriteFailed as wf:
                    if not isinstance(wf.cause, FileExistsError):
                        raise wf.cause from wf
            raise FileExistsError(17, "no free quarantine name", str(self._quarantine))
        except OSError as exc:
            raise PersistenceError(self.path, operation="copy journal to quarantine", cause=exc) from exc

    def _sweep_temps(self, snap_id: str | None = None) -> int:
        """Set aside temps of a journal creation a crash interrupted (quarantine; empty ones are deleted).

        Returns the highest sequence number such a temp holds under the journal id the snapshot names
        (*snap_id*; bounded, see :func:`_temp_seq`), so the re-created journal starts after it. Temps of the
        old journal name are touched only when their header names *snap_id* (others may be another state file's).
        """
        try:
            names = fs.listdir(self.path.parent)
        except OSError:
            return 0
        highest = 0
        for name in names:
            legacy = self._legacy is not None and _atomic.is_temp_of(name, self._legacy)
            if not (_atomic.is_temp_of(name, self.path) or legacy):
                continue
            tmp = self.path.parent / name
            try:
                data = fs.read_file(tmp)
                if legacy and (len(data) < jf.HEADER_SIZE or _header_id(data) != snap_id):
                    continue
                if len(data) <= jf.HEADER_SIZE:
                    fs.unlink(tmp)
                    continue
                highest = max(highest, _temp_seq(data, snap_id))
                _atomic.move_aside(tmp, self._quarantine, label="leftover")
            except OSError as exc:
                raise PersistenceError(tmp, operation="clean up leftover journal temp", cause=exc) from exc
        return highest

    # ------------------------------------------------------------------------------------------ changes
    def prepare(self, st: StateData, entries: Entries, *, compact: Callable[[], object]) -> None:
        """Before a change: undo records a failed group sync left in memory, and compact when due."""
        if not self.active:
            return
        if self._failure is not None:  # same test as rollback()'s fast path, without the call
            self.rollback(st, entries)
        must = self._needs_rotation or (self._fd is None and self._next_header is None)
        due = self._end >= self._max_bytes or self._records >= self._max_records
        if not must and not (due and self._records >= self._compact_retry_at):
            return
        try:
            compact()
        except (PosStateError, OSError) as exc:
            if must or self._needs_rotation:
                raise
            self._compact_retry_at = self._records + max(16, self._max_records // 10)
            log.warning("%s: journal compaction failed, still appending (%s)", self.path, exc)

    def append_now(self, st: StateData, entries: Entries, op: Op) -> bool:
        """``durability="sync"``'s common case in one call: nothing to compact or roll back, a journal open.
        Apply *op* to memory and make its record durable, all or nothing; False (nothing done) when the
        general path (:meth:`prepare`, then :meth:`append`) is needed.

        The same work as that path, in fewer calls: after each blocking ``fdatasync`` the processor's caches
        are cold, and then every Python call costs several times what it costs warm (docs/JOURNAL.md).
        """
        if (
            self.mode != "sync"
            or self._needs_rotation
            or self._fd is None
            or self._sealer is None
            or self._next_header is not None
            or self._end >= self._max_bytes
            or self._records >= self._max_records
        ):
            return False
        undo = jops.apply(st, entries, op)
        try:
            self._write_record(jf.KIND_OP, orjson.dumps([op.json]))
        except BaseException:
            jops.undo(st, entries, undo)
            raise
        return True

    def append(self, st: StateData, entries: Entries, ops: Sequence[Op]) -> int | None:
        """Apply *ops* to memory and record them as one record; all or nothing. Returns the sequence
        number to :meth:`settle` on in group mode, else None (sync mode returns once the record is durable)."""
        undos = [jops.apply(st, entries, ops[0])] if len(ops) == 1 else [jops.apply(st, entries, op) for op in ops]
        if not self.active:
            return None
        try:
            if self.mode == "group":
                # Under the group lock: a failed group sync (which cuts the file back and marks the journal
                # for rotation under the same lock) can never interleave with this write.
                with self._cond:
                    seq = self._write(ops)
                    self._written_seq = seq
                    self._seq_end[seq] = self._end
                    self._pending.append((seq, undos))
                return seq
            self._write(ops)
        except BaseException:
            for u in reversed(undos):
                jops.undo(st, entries, u)
            raise
        return None

    def _write(self, ops: Sequence[Op]) -> int:
        if self._next_header is not None and not self._needs_rotation:
            return self._create(ops)
        fd, sealer, header = self._fd, self._sealer, self._header
        if fd is None or sealer is None or header is None or self._needs_rotation:
            raise PersistenceError(self.path, operation="journal append", reason="no usable journal (the last rotation failed)")
        if len(ops) == 1:
            return self._write_record(jf.KIND_OP, orjson.dumps([ops[0].json]))
        return self._write_record(jf.KIND_TRANSACTION, orjson.dumps([op.json for op in ops]))

    def _write_record(self, kind: int, payload: bytes) -> int:
        """Frame *payload* as the next record and write it at the end of the records (sync mode: and sync).
        The caller checked that a journal is open and usable."""
        fd, sealer, header = self._fd, self._sealer, self._header
        assert fd is not None and sealer is not None and header is not None
        if self.guard is not None:
            self.guard()
        seq = self._last_seq = self._last_seq + 1
        now_ms = int(time.time() * 1000)
        frame = sealer.frame(seq=seq, generation=header.base_generation, time_ms=now_ms, kind=kind, payload=payload)
        end = self._end
        new_end = end + len(frame)
        alloc = self._alloc
        if new_end > alloc:  # past the zeros written ahead: write more along with this record
            pad = self._padding(alloc)
            alloc = new_end + pad
            frame += bytes(pad)
        step = "journal write"
        wrote = 0  # bytes of the frame the first write call took: a call that fails writes nothing
        try:
            wrote = fs.pwrite(fd, frame, end)
            if wrote != len(frame):
                fs.pwrite_all(fd, frame[wrote:], end + wrote)
            if self.mode == "sync":
                step = "journal fdatasync"
                fs.fdatasync(fd)
        except OSError as exc:
            # The record is gone for sure if no byte of it was written, or once the cut is durable.
            if self._fail_file() or wrote <= 0:
                raise PersistenceError(self.path, operation=step, cause=exc) from exc
            raise self._unknown_error(step, exc, seq, seq) from exc
        self._end = new_end
        self._alloc = alloc
        self._records += 1
        self.last_time_ms = now_ms
        return seq

    def _padding(self, alloc: int) -> int:
        """How many zero bytes to write after a record that goes past the file's end.

        A record that overwrites bytes already on disk makes ``fdatasync`` flush only that data: the file's
        size and block map do not change, so the file system has no metadata to commit (on ext4 that saves
        the journal commit: about a third of an append's cost on the reference machine, docs/JOURNAL.md).
        The space grows geometrically, 64 KiB first and then the file's size again, at most
        ``journal_preallocate`` bytes at a time; 0 turns it off (every record then grows the file).
        """
        return min(self._preallocate, max(_FIRST_PAD, alloc))

    def _create(self, ops: Sequence[Op]) -> int:
        """Create the journal the snapshot names, holding its header and this first record: a fsynced temp
        renamed over the old (redundant) journal, then the directory fsynced."""
        header = self._next_header
        assert header is not None
        if self.guard is not None:
            self.guard()
        if header.base_seq != self._last_seq:  # numbers burned by failed attempts are skipped, never reused
            header = self._header_for(header.journal_id, header.base_generation)
            self._next_header = header
        sealer = jf.Sealer(header, self._write_key(header))
        seq = self._last_seq + 1
        self._last_seq = seq
        payload = orjson.dumps([op.json for op in ops])
        kind = jf.KIND_OP if len(ops) == 1 else jf.KIND_TRANSACTION
        now_ms = int(time.time() * 1000)
        frame = sealer.frame(seq=seq, generation=header.base_generation, time_ms=now_ms, kind=kind, payload=payload)
        committed = False
        try:
            if not self._replace_ok and fs.exists(self.path):
                dest = _atomic.move_aside(self.path, self._quarantine, label="replaced")
                log.warning("%s: journal not known to be folded into the snapshot; kept at %s", self.path, dest)
            self._replace_ok = True
            pad = self._padding(0)
            tmp = _atomic.write_temp(self.path, header.raw + frame + bytes(pad))
            _atomic.commit(tmp, self.path)
            committed = True
            fd = fs.open_(self.path, O_WRITE, 0o600)
        except _atomic.WriteFailed as wf:
            if wf.renamed:  # the new journal, holding this record, is in place: it may survive
                raise self._unknown_error(f"create journal ({wf.step})", wf.cause, seq, seq, header) from wf.cause
            raise PersistenceError(self.path, operation=f"create journal ({wf.step})", cause=wf.cause) from wf.cause
        except OSError as exc:
            if committed:  # the new journal, holding this record, is durably in place
                raise self._unknown_error("open new journal", exc, seq, seq, header) from exc
            raise PersistenceError(self.path, operation="open new journal", cause=exc) from exc
        self._detach()
        self._fd, self._header, self._sealer = fd, header, sealer
        self._next_header = None
        self._needs_rotation = False
        self._end = jf.HEADER_SIZE + len(frame)
        self._alloc = self._end + pad
        self._records = 1
        self.last_time_ms = now_ms
        with self._cond:
            self._written_seq = self._durable_seq = seq
            self._durable_end = self._end
        return seq

    def _fail_file(self) -> bool:
        """After a failed write or sync the file's tail is unknown: cut it back if we can, and never
        append to this journal again (the next change rotates; a failed fsync is never just retried).
        Returns True only when the cut is durable (truncated and synced): the failed record is gone."""
        self._needs_rotation = True
        self._alloc = self._end
        return self._cut(self._fd, self._end)

    @staticmethod
    def _cut(fd: int | None, end: int) -> bool:
        if fd is None:
            return False
        try:
            fs.ftruncate(fd, end)
            fs.fdatasync(fd)
        except OSError:
            return False
        return True

    def _unknown_error(
        self, step: str, cause: OSError, lo: int, hi: int, header: jf.JournalHeader | None = None
    ) -> PersistenceError:
        """Records *lo*..*hi* failed but may be on disk: record that (marker file) and say so."""
        outcome = self._unknown_outcome(lo, hi, header)
        err = PersistenceError(self.path, operation=step, cause=cause, outcome=outcome, outcome_unknown=True)
        err.__cause__ = cause
        return err

    def _unknown_outcome(self, lo: int, hi: int, header: jf.JournalHeader | None = None) -> str:
        found = header or self._header
        journal_id = found.id_hex if found is not None else None
        span = f"record {lo}" if lo == hi else f"records {lo}-{hi}"
        durable = False
        if self._on_unknown is not None:
            durable = self._on_unknown(
                _unknown.journal_entry(journal_id=journal_id, seq_lo=lo, seq_hi=hi, operation=f"journal {span}")
            )
        where = (
            "recorded for the next load to report"
            if durable
            else "recorded in this process only: a reopen in this process reports it, after a restart it will not be reported"
        )
        return (
            f"the outcome is unknown: journal {span} may be on disk (it could not be undone there) while memory "
            f"keeps the old value ({where})"
        )

    def settle(self, seq: int | None, rollback: Callable[[], None]) -> None:
        """Group mode: return once record *seq* is durable. One caller (the leader) syncs for everyone
        written so far; the others wait. On failure every record not yet durable is rolled back in memory
        (*rollback* takes the manager's lock) and PersistenceError raised."""
        if seq is None:
            return
        while True:
            err: PosStateError | None = None
            with self._cond:
                while True:
                    hit = next((r for r in self._failed_ranges if r[0] < seq <= r[1]), None)
                    if hit is not None:
                        failed, outcome = hit[2], hit[3]
                        if isinstance(failed, StateLockedError):
                            err = failed  # the lock was lost before the sync: say so, not "the disk failed"
                            break
                        op = "journal fdatasync (group commit)"
                        if outcome is None:
                            err = PersistenceError(self.path, operation=op, cause=failed)
                        else:
                            err = PersistenceError(self.path, operation=op, cause=failed, outcome=outcome, outcome_unknown=True)
                        err.__cause__ = failed
                        break
                    if self._durable_seq >= seq:
                        return
                    if not self._syncing:
                        break
                    self._cond.wait()
                if err is None:
                    self._syncing = True
                    target, fd = self._written_seq, self._fd
            if err is not None:
                rollback()
                raise err
            self._sync_as_leader(target, fd)

    def _sync_as_leader(self, target: int, fd: int | None) -> None:
        cause: OSError | None = None
        try:
            if fd is None:
                raise OSError(9, "journal closed")
            if self.guard is not None:
                self.guard()
            fs.fdatasync(fd)
        except OSError as exc:  # StateLockedError too (a TimeoutError): the lock was lost before the sync
            cause = exc
        with self._cond:
            self._syncing = False
            if cause is None:
                if target > self._durable_seq:
                    self._durable_seq = target
                    self._durable_end = self._seq_end.get(target, self._durable_end)
                self._seq_end = {k: v for k, v in self._seq_end.items() if k > self._durable_seq}
                self._pending = [p for p in self._pending if p[0] > self._durable_seq]
            else:
                self._needs_rotation = True
                lo, hi = self._durable_seq, self._written_seq
                failure: PosStateError
                outcome: str | None = None
                if isinstance(cause, StateLockedError):
                    # A lost lock leaves the file alone: the next writer may already be appending to it.
                    failure = cause
                else:
                    # Cut the records that never became durable off the file, so nothing (a later drain, the
                    # close, a reload) can make them durable or replay them: their callers were told they
                    # failed. A failed sync is never just retried; the next change starts a new journal. If
                    # the cut cannot be made durable, every one of those records may be on disk: outcome unknown.
                    if not self._cut(fd, self._durable_end):
                        outcome = self._unknown_outcome(lo + 1, hi)
                    if outcome is None:
                        failure = PersistenceError(self.path, operation="journal fdatasync", cause=cause)
                    else:
                        failure = PersistenceError(
                            self.path, operation="journal fdatasync", cause=cause, outcome=outcome, outcome_unknown=True
                        )
                    failure.__cause__ = cause
                self._failure = (lo, failure)
                self._failed_ranges.append((lo, hi, cause, outcome))
                self._end = self._alloc = self._durable_end
                self._written_seq = self._durable_seq
                self._seq_end = {}
            self._cond.notify_all()

    def rollback(self, st: StateData, entries: Entries) -> None:
        """Undo, newest first, every change whose group sync failed (caller holds the manager lock)."""
        if self._failure is None:  # fast path; a failure set right after this is caught by settle()
            return
        with self._cond:
            if self._failure is None:
                return
            floor = self._failure[0]
            failed = [p for p in self._pending if p[0] > floor]
            self._pending = [p for p in self._pending if p[0] <= floor]
        for _, undos in reversed(failed):
            for u in reversed(undos):
                jops.undo(st, entries, u)
        if failed:  # other threads saw these changes at their generation: a rollback is a change too (12.10)
            st.generation += 1

    def drain(self) -> None:
        """Make every record written so far durable (group mode), before a snapshot copies memory."""
        if self.mode != "group":
            return
        while True:
            with self._cond:
                while self._syncing:
                    self._cond.wait()
                if self._failure is not None and any(p[0] > self._failure[0] for p in self._pending):
                    raise self._failure[1]
                if self._durable_seq >= self._written_seq:
                    return
                self._syncing = True
                target, fd = self._written_seq, self._fd
            self._sync_as_leader(target, fd)

    # ------------------------------------------------------------------------------------------ rotation
    def begin_rotation(self, st: StateData) -> Rotation | None:
        """Called by the save path with the snapshot about to be written (generation already set).

        Journal modes: record a new journal id and the last sequence number in the snapshot; no file is
        written here (the first record after the save creates the journal, so a save costs no extra sync).
        Snapshot mode: if a journal from an earlier session was replayed, record it as folded in (it is
        removed once the snapshot is durable).
        """
        if not self.active:
            if self._header is None:
                return None
            st.journal = {"id": self._header.id_hex, "seq": self._last_seq}
            return Rotation(self, None)
        self.drain()
        header = self._header_for(None, st.generation)
        st.journal = {"id": header.id_hex, "seq": self._last_seq}
        return Rotation(self, header)

    def _install(self, header: jf.JournalHeader | None) -> None:
        """The snapshot naming *header* is durable: the old journal is redundant; the next record creates
        the new one. Snapshot mode (*header* None): delete the replayed journal the snapshot now holds."""
        self._retire_legacy()
        if header is None:
            try:
                fs.unlink(self.path)
                fs.fsync_dir(self.path.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("%s: could not remove the folded-in journal (%s); it is skipped on load", self.path, exc)
            self._detach()
            return
        self._detach()
        self._next_header = header
        self._needs_rotation = False
        self._compact_retry_at = 0
        with self._cond:
            self._written_seq = self._durable_seq = self._last_seq
            self._durable_end = 0
            self._seq_end = {}
            self._failure = None
            self._pending = []

    def _retire_legacy(self) -> None:
        """A durable snapshot holds the journal read under the old name: move it to quarantine (kept, not
        deleted). Never raises: left in place it is harmless (its id is no longer the snapshot's)."""
        old, self._legacy_read = self._legacy_read, None
        if old is None:
            return
        try:
            dest = _atomic.move_aside(old, self._quarantine, label="old-name")
        except FileNotFoundError:
            return  # already set aside (a restore or a repair moved it)
        except OSError as exc:
            log.warning("%s: could not retire the journal under its old name (%s); it is ignored on load", old, exc)
            return
        log.info("%s: journal under its old name is held by the snapshot; kept at %s", old, dest)

    def _detach(self) -> None:
        fd, self._fd = self._fd, None
        self._header = self._sealer = self._next_header = None
        self._needs_rotation = True
        self._end = self._alloc = self._records = 0
        if fd is not None:
            with contextlib.suppress(OSError):
                fs.close(fd)

    @property
    def failed(self) -> bool:
        """A group sync failed since the last rotation (the next change, or close, compacts)."""
        return self._failure is not None

    def close(self) -> None:
        try:
            self.drain()
        except PersistenceError as exc:
            log.warning("%s: journal sync at close failed (%s)", self.path, exc)
        self._detach()
