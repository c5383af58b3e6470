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
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from posstate.core.errors import (
    PersistenceError,
    PosStateError,
)
from posstate.journal import format as jf
from posstate.journal import records as _records
from posstate.journal.base import O_WRITE, Emit, Mode
from posstate.journal.files import blank_file, next_path
from posstate.journal.recover import JournalRecover
from posstate.journal.rotation import Rotation
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.model.ops import Entries, Op
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)

__all__ = ["Emit", "Journal", "Mode", "Rotation"]


class Journal(JournalRecover):
    """The journal file of one state directory, owned by one manager (callers hold the manager's lock,
    except around :meth:`settle`).

    The append path lives here; posstate/journal/base.py describes the rest of the chain."""

    def prepare(
        self, st: StateData, entries: Entries, *, compact: Callable[[], object], rotate: Callable[[], object] | None = None
    ) -> None:
        """Before a change: undo records a failed group sync left in memory, and compact when due.

        With *rotate* (the manager's background compaction, issue 14) a due compaction only rotates to a new
        segment here (O(1)) and the snapshot is written by another thread; while that one is pending no second
        rotation happens (the current segment keeps growing). *compact* (a snapshot on this thread) is left
        for a journal that cannot be appended to (after a failed write or sync)."""
        if not self.active:
            return
        if self._failure is not None:  # same test as rollback()'s fast path, without the call
            self.rollback(st, entries)
        if self._records >= self._spare_at or self._end >= self._spare_bytes_at:
            self.want_spare()  # half a threshold: the next segment's file is prepared in the background
        must = self._needs_rotation or (self._fd is None and self._next_header is None)
        due = self._end >= self._max_bytes or self._records >= self._max_records
        wanted = self.rotation_wanted and rotate is not None  # a due timed backup asked (issue 14.2)
        if wanted and not (must or due) and not self.spare_ready and self.spare_error is None:
            self.want_spare()  # the wish rotates at a later change, once the segment's file is ready (14.3)
            wanted = not self._spare_busy
        if not must and not (due and self._records >= self._compact_retry_at) and not wanted:
            return
        if not must and rotate is not None:
            if not self.rotating and self._next_header is None:
                rotate()
                self._first_pending = self.rotating  # this change writes the new segment's first record
            elif self.rotating:  # the pending rotation's snapshot is the one a wish waits for: no second one
                self.rotation_wanted = False
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
            or ((self._end >= self._max_bytes or self._records >= self._max_records) and not self.rotating)
            or self.rotation_wanted
            or self._records >= self._spare_at
            or self._end >= self._spare_bytes_at
        ):
            return False
        if self._pre is not None:
            self.remember(st, entries, op)
        undo = jops.apply(st, entries, op)
        try:
            self._write_record(jf.KIND_OP, orjson.dumps([op.json]))  # records.encode([op]), one call fewer
        except BaseException:
            jops.undo(st, entries, undo)
            raise
        return True

    def append(self, st: StateData, entries: Entries, ops: Sequence[Op]) -> int | None:
        """Apply *ops* to memory and record them as one record; all or nothing. Returns the sequence
        number to :meth:`settle` on in group mode, else None (sync mode returns once the record is durable)."""
        if self._pre is not None:
            for op in ops:
                self.remember(st, entries, op)
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

    def remember(self, st: StateData, entries: Entries, op: Op) -> None:
        """While a background compaction builds its view of the state at the rotation point: keep what *op*
        is about to change, as it is now (the first change of each key only). O(1); called before *op* is
        applied (the manager's lock held). The view is memory copied later, with these put back."""
        pre = self._pre
        if pre is None:
            return
        j = op.json
        if j["op"] in (jops.SET_POSITION, jops.DELETE_POSITION):
            key = op.position.key if op.position is not None else (j["symbol"], j["side"])
            tag: tuple[str, Any] = ("p", key)
            if tag not in pre:
                pre[tag] = (
                    "p",
                    key,
                    st.positions.get(key),
                    st.position_revs.get(key),
                    entries.get(key),
                    st.position_tombstones.get(key),
                )
            return
        if j["op"] == jops.SET_BOT_METADATA:  # issue 15.7: the bot's own data, one value for the whole state
            if ("b", None) not in pre:
                pre[("b", None)] = ("b", st.bot_metadata, st.bot_metadata_rev)
            return
        sym = j["symbol"]
        if ("m", sym) not in pre:
            pre[("m", sym)] = ("m", sym, st.metadata.get(sym), st.metadata_revs.get(sym), st.metadata_tombstones.get(sym))

    def _write(self, ops: Sequence[Op]) -> int:
        if self._next_header is not None and not self._needs_rotation:
            return self._create(ops)
        fd, sealer, header = self._fd, self._sealer, self._header
        if fd is None or sealer is None or header is None or self._needs_rotation:
            raise PersistenceError(self.path, operation="journal append", reason="no usable journal (the last rotation failed)")
        return self._write_record(*_records.encode(ops))

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

    def _create(self, ops: Sequence[Op]) -> int:
        """:meth:`_create_locked` under the group lock; then (a rotation's first record, written or failed)
        the background compaction waiting in ``wait_segment_start`` may go on."""
        with self._cond:
            seq = 0
            try:
                seq = self._create_locked(ops)
            finally:
                if self._first_pending:
                    self._segment_started(seq)
            return seq

    def _create_locked(self, ops: Sequence[Op]) -> int:
        """Start the journal (or segment) the snapshot or rotation names with this first record: in the spare
        prepared ahead of time when there is one (:meth:`_adopt`), else a fsynced temp renamed over the old
        (redundant) journal, then the directory fsynced. Under the group lock: a background compaction
        retires a segment (renames it) only between two creations."""
        header = self._next_header
        assert header is not None
        if self.guard is not None:
            self.guard()
        if header.base_seq != self._last_seq:  # numbers burned by failed attempts are skipped, never reused
            prev = self._header.journal_id if header.prev_link and self._header is not None else None
            header = self._header_for(header.journal_id, header.base_generation, prev)
            self._next_header = header
        target = self._target
        sealer = jf.Sealer(header, self._write_key(header))
        seq = self._last_seq + 1
        self._last_seq = seq
        kind, payload = _records.encode(ops)
        now_ms = int(time.time() * 1000)
        frame = sealer.frame(seq=seq, generation=header.base_generation, time_ms=now_ms, kind=kind, payload=payload)
        spare = self._take_spare()
        if spare is not None:
            return self._adopt(spare, header, sealer, frame, seq, now_ms)
        committed = False
        try:
            if (target != self.path or not self._replace_ok) and fs.exists(target) and not blank_file(target):
                dest = _atomic.move_aside(target, self._quarantine, label="replaced")
                log.warning("%s: journal not known to be folded into the snapshot; kept at %s", target, dest)
            if target == self.path:
                self._replace_ok = True
            pad = self._padding(0)
            tmp = _atomic.write_temp(target, header.raw + frame + bytes(pad))
            _atomic.commit(tmp, target)
            committed = True
            fd = fs.open_(target, O_WRITE, 0o600)
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
        self._arm_spare()
        return seq

    def _adopt(
        self, spare: tuple[int, int], header: jf.JournalHeader, sealer: jf.Sealer, frame: bytes, seq: int, now_ms: int
    ) -> int:
        """The new segment starts in the spare (posstate/journal/spare.py): its header and this first record in
        one ``pwrite`` at offset 0, then (sync mode) one ``fdatasync``; group mode leaves the sync to the group.
        No file is created, renamed or synced on this thread. The caller holds the group lock.

        After a save the segment belongs under the journal's own name: it starts in ``.next`` (which the
        snapshot's id leads a load to) and the spare's thread renames it (``_promote``)."""
        fd, alloc = spare
        data = header.raw + frame
        if len(data) > alloc:
            pad = self._padding(alloc)
            alloc = len(data) + pad
            data += bytes(pad)
        step = "journal write"
        wrote = 0
        try:
            wrote = fs.pwrite(fd, data, 0)
            if wrote != len(data):
                fs.pwrite_all(fd, data[wrote:], wrote)
            if self.mode == "sync":
                step = "journal fdatasync"
                fs.fdatasync(fd)
        except OSError as exc:
            cut = self._cut(fd, 0)  # back to an empty file: blank, no header, nothing a reader takes for a segment
            with contextlib.suppress(OSError):
                fs.close(fd)
            if cut or wrote <= 0:
                raise PersistenceError(self.path, operation=f"start journal segment ({step})", cause=exc) from exc
            raise self._unknown_error(f"start journal segment ({step})", exc, seq, seq, header) from exc
        nxt = next_path(self.path)
        promote = self._target != nxt  # after a save: the segment moves to the journal's own name later
        self._detach()
        self._fd, self._header, self._sealer = fd, header, sealer
        self._next_header = None
        self._needs_rotation = False
        self._target = nxt
        self._promote = promote
        self._promote_seq = seq
        self._end = jf.HEADER_SIZE + len(frame)
        self._alloc = alloc
        self._records = 1
        self.last_time_ms = now_ms
        if self.mode == "sync":
            self._written_seq = self._durable_seq = seq
            self._durable_end = self._end
        else:
            # A failed group sync cuts back to the header (a journal with no record: never continued, and what
            # the snapshot's id names stays a journal file, not an empty one).
            self._durable_end = jf.HEADER_SIZE
        self._arm_spare()
        if promote:
            self.want_spare()
        return seq
