"""Loading a journal: replay its records onto the freshly loaded snapshot, cut a torn tail, set leftover
temps aside, and plan the file the next record goes to.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from posstate.core.errors import (
    PersistenceError,
)
from posstate.journal import format as jf
from posstate.journal.files import _header_id, _temp_seq, gap_after_missing, next_path, segment_chain
from posstate.journal.records import _journal_error, read_records
from posstate.journal.rotation import JournalRotation
from posstate.journal.spare import NEVER
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)


class JournalRecover(JournalRotation):
    """recover(): the journal half of a load."""

    def recover(self, st: StateData) -> int:
        """Replay the journal into the freshly loaded snapshot *st*; return the highest revision replayed.

        A torn last record is cut off after the journal is copied to quarantine; damage before it raises
        CorruptStateError(kind="journal"); a journal of another snapshot whose records the snapshot already
        holds is ignored (it is replaced at the next rotation).
        """
        self.drain()  # a reload must not drop records still waiting for their group sync
        self._drop_spare(unlink=False)  # a blank ``.next`` is no segment: the load ignores it
        self._promote = self._first_pending = False
        self._spare_at = self._spare_bytes_at = NEVER
        self._detach()
        self._replace_ok = False
        self._legacy_read = None
        self.replayed = None
        self._target = self.path
        self.rotating = False
        self._pre = None
        self.fold_needed = False
        self.fold_seen = 0
        snap = st.journal or {}
        chain = segment_chain(self.path, self._legacy, st.journal)
        src = chain[0]
        leftover = self._sweep_temps(snap.get("id"))
        snap_seq = int(snap.get("seq", 0))
        self._last_seq = max(snap_seq, leftover)
        self._needs_rotation = True
        if len(chain) > 1 or src == next_path(self.path):
            return self._recover_chain(st, chain, snap, snap_seq)
        try:
            data = fs.read_file(src)
        except FileNotFoundError:
            self._replace_ok = True
            self._plan_file(st)
            return 0
        except OSError as exc:
            raise PersistenceError(src, operation="read journal", cause=exc) from exc
        folds: list[tuple[int, int]] = []
        header, records, sc = read_records(
            data, path=src, keyring=self._read_keyring, require_encryption=self._write_keyring is not None, folds=folds
        )
        last = records[-1][0].seq if records else header.base_seq
        self._saw_folds(folds, snap_seq)
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
        max_rev, first = self._apply_after(st, records, snap_seq, max_rev, first)
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
            self._arm_spare()
        return max_rev

    def _recover_chain(self, st: StateData, chain: list[Path], snap: dict[str, Any], snap_seq: int) -> int:
        """Replay the segments of a rotation whose background compaction did not finish (or finished but did
        not rename the new segment yet), in order: *chain* is one or two files (journal/files.py
        segment_chain). The load then folds memory into a snapshot (``fold_needed``), which makes every
        segment redundant. A torn record is cut only at the end of the last segment; anywhere else it is damage."""
        max_rev = 0
        first = 0
        prev_last: int | None = None
        ours = missing = False
        replayed_here = False
        for i, src in enumerate(chain):
            try:
                data = fs.read_file(src)
            except FileNotFoundError:
                if i == 0:
                    ours = missing = True  # the snapshot's journal has no file: its successor is ours
                    prev_last = snap_seq
                    continue
                raise PersistenceError(src, operation="read journal segment", cause=FileNotFoundError(2, "missing")) from None
            except OSError as exc:
                raise PersistenceError(src, operation="read journal", cause=exc) from exc
            folds: list[tuple[int, int]] = []
            header, records, sc = read_records(
                data, path=src, keyring=self._read_keyring, require_encryption=self._write_keyring is not None, folds=folds
            )
            last = records[-1][0].seq if records else header.base_seq
            self._saw_folds(folds, snap_seq)
            if missing and i == 1 and (gap := gap_after_missing(snap, src, header.base_seq)) is not None:
                raise _journal_error(src, gap)  # never replayed over the hole: recovery reports what is lost
            ours = ours or header.id_hex == snap.get("id")
            if not ours and last > snap_seq:
                raise _journal_error(
                    src,
                    f"journal {header.id_hex} holds records up to {last}, but the snapshot (generation {st.generation}) "
                    f"belongs to journal {snap.get('id')} and holds only up to {snap_seq}",
                )
            if prev_last is not None and header.base_seq < prev_last and last > snap_seq:
                raise _journal_error(
                    src,
                    f"segment {header.id_hex} starts after record {header.base_seq}, "
                    f"before the end of the one it follows ({prev_last})",
                )
            if sc.bad_offset is not None and i < len(chain) - 1:
                raise _journal_error(
                    src, f"record at byte {sc.bad_offset} is damaged ({sc.bad_reason}) and a later segment follows"
                )
            max_rev, first = self._apply_after(st, records, snap_seq, max_rev, first)
            if first:
                self.replayed = (header.id_hex, first, last)
            prev_last = last
            self._last_seq = max(self._last_seq, last)
            if sc.bad_offset is not None:
                self._cut_torn_tail(data, sc, src)
                self._last_seq += 1  # the torn record used the next number: never reuse it
            replayed_here = replayed_here or src == self.path
        # Every file read is held by memory now; the load folds it into a snapshot, then the next record
        # creates a new journal over the old name and the ``.next`` segment is removed (_install).
        self._replace_ok = replayed_here or not fs.exists(self.path)
        self.fold_needed = self.active
        log.info("%s: replayed %d journal segments of an unfinished compaction; the load folds them", self.path, len(chain))
        return max_rev

    def _saw_folds(self, folds: list[tuple[int, int]], snap_seq: int) -> None:
        """Fold records past the snapshot (its .bak put back over it by hand): the generations they name were
        durable saves; no later number may name another content (issue 15.4), so the load keeps them seen."""
        self.fold_seen = max([self.fold_seen] + [g for q, g in folds if q > snap_seq])

    def _apply_after(self, st: StateData, records: Any, snap_seq: int, max_rev: int, first: int) -> tuple[int, int]:
        """Apply to *st* the records after the snapshot's sequence number *snap_seq*; returns the highest
        revision seen and the first sequence number applied (each carried over from *max_rev*, *first*)."""
        for rec, ops in records:
            if rec.seq <= snap_seq or not ops:  # not ops: a fold record, no change (journal/fold.py)
                continue
            for op in ops:
                jops.apply(st, {}, op)
                max_rev = max(max_rev, op.json["rev"])
            first = first or rec.seq
            self.last_time_ms = max(self.last_time_ms, rec.time_ms)
        return max_rev, first

    def _plan_file(self, st: StateData) -> None:
        """The snapshot names a journal whose file is missing or is an older, redundant journal: the next
        record creates it (no compaction needed). A snapshot naming no journal needs a compaction first."""
        if not self.active or st.journal is None:
            return
        self._install(self._header_for(bytes.fromhex(st.journal["id"]), st.generation))

    def _cut_torn_tail(self, data: bytes, sc: jf.Scan, path: Path | None = None) -> None:
        path = self.path if path is None else path
        dest = self._quarantine_copy(data, label="torn")
        try:
            fd = fs.open_(path, O_RDWR, 0o600)
            try:
                fs.ftruncate(fd, sc.good_end)
                fs.fdatasync(fd)
            finally:
                fs.close(fd)
        except OSError as exc:
            raise PersistenceError(path, operation="cut torn journal record", cause=exc) from exc
        self._end = self._alloc = sc.good_end
        log.warning(
            "%s: cut a torn last record (%d bytes at %d: %s); copy kept at %s",
            path,
            sc.torn_bytes,
            sc.good_end,
            sc.bad_reason,
            dest,
        )
        if self._emit is not None:
            self._emit(
                "stateRepaired",
                {
                    "path": str(path),
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
            if not (_atomic.is_temp_of(name, self.path) or _atomic.is_temp_of(name, next_path(self.path)) or legacy):
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
