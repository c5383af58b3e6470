"""Rotation: a compaction (an atomic snapshot save) starts a new journal that the snapshot names."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from posstate.core.errors import (
    PersistenceError,
    PosStateError,
)
from posstate.journal import fold as _fold
from posstate.journal import format as jf
from posstate.journal.files import next_path
from posstate.journal.spare import JournalSpare
from posstate.model.document import StateData
from posstate.model.ops import Undo
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)


class Rotation:
    """A compaction in progress: the snapshot being written names the next journal (*header*). With
    *fold_seq*, the journal it folds in gets a fold record of that number once it is durable (journal/fold.py):
    the save hands over the document it encodes (:meth:`observe`) for the record's digest."""

    def __init__(
        self, journal: JournalRotation, header: jf.JournalHeader | None, *, fold_seq: int = 0, generation: int = 0
    ) -> None:
        self._journal = journal
        self._header = header
        self._fold_seq = fold_seq
        self._generation = generation
        self._digest: str | None = None

    @property
    def wants_document(self) -> bool:
        """True when :meth:`observe` should be given the document the snapshot is encoded from."""
        return self._fold_seq > 0

    def observe(self, doc: dict[str, Any]) -> None:
        """The document the snapshot is encoded from (``build_document``): its digest goes into the fold record."""
        self._digest = _fold.content_digest(doc)

    def abort(self) -> None:
        """The snapshot write failed. It may still have been renamed into place (a failed directory fsync
        or read-back), naming a journal that never started: never append to the old journal again."""
        self._journal._needs_rotation = True

    def finish(self) -> None:
        """Called once the snapshot is durable. Never raises."""
        if self._fold_seq and self._digest is not None:
            self._journal._write_fold(self._fold_seq, self._generation, self._digest)
        self._journal._install(self._header)


class JournalRotation(JournalSpare):
    """begin_rotation / install of the next journal, and close."""

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
        fold_seq = 0
        if self._can_fold():
            # The fold record's number is handed out now, so the snapshot holds it (every record of the old
            # journal stays at or below the snapshot's sequence number) and the next journal starts after it.
            fold_seq = self._last_seq = self._last_seq + 1
        header = self._header_for(None, st.generation)
        st.journal = {"id": header.id_hex, "seq": self._last_seq}
        return Rotation(self, header, fold_seq=fold_seq, generation=st.generation)

    def _can_fold(self) -> bool:
        """May a fold record be appended to the open journal after this save? Only to a journal this manager
        appends to and that nothing made unusable (a failed write or sync, a group sync failure), that is the
        journal's own file (not a ``.next`` segment, which the save removes) and whose records are chained."""
        header = self._header
        return (
            self._fd is not None
            and self._sealer is not None
            and header is not None
            and header.appendable
            and not self._needs_rotation
            and self._next_header is None
            and self._target == self.path
            and not self.rotating
            and self._failure is None
        )

    def _write_fold(self, seq: int, generation: int, digest: str) -> None:
        """Append the fold record *seq* (journal/fold.py), without a sync of its own: a save costs the syncs
        it did before, and the page cache writes the record back within seconds. Never raises: without the
        record (a failed write, or a power cut before the write-back, leaves none or a torn tail, which readers
        cut) a recovery only counts the save as lost, as before: the error is on the safe side."""
        fd, sealer, header = self._fd, self._sealer, self._header
        if fd is None or sealer is None or header is None:
            return
        try:
            with self._cond:
                if self.guard is not None:
                    self.guard()
                frame = sealer.frame(
                    seq=seq,
                    generation=header.base_generation,
                    time_ms=int(time.time() * 1000),
                    kind=jf.KIND_FOLD,
                    payload=_fold.encode_fold(generation, digest),
                )
                fs.pwrite_all(fd, frame, self._end)
        except (OSError, PosStateError) as exc:
            log.warning("%s: could not write the fold record of generation %s (%s)", self.path, generation, exc)

    def rotate(self, generation: int) -> dict[str, Any] | None:
        """Start a new segment (issue 14): the next record starts ``<journal>.next`` (in the spare prepared
        ahead of time, else it creates the file), whose header links to the current segment, and pre-images
        of every key changed from now on are kept (:meth:`remember`).
        Returns the ``journal`` entry of the snapshot that will hold everything up to here (it names the new
        segment and the last sequence number written), or None when a rotation cannot start now: one is
        pending, no segment is open, the live segment still waits for its rename, or (group mode) records
        still wait for their sync (never synced here: the caller holds the manager's lock, and the next change
        tries again). O(1), no I/O. If the spare's thread is preparing ``.next`` it waits for it (so that the
        name has one writer at a time), asking it to stop after its step in flight: a few metadata
        operations, a read of at most ``BLANK_MAX`` (only of a leftover), at most one step of zeros
        (``SPARE_STEP``) and the syncs the segment's creation here would cost."""
        if (
            self.rotating
            or self._fd is None
            or self._header is None
            or self._needs_rotation
            or self._next_header is not None
            or self._promote
        ):
            return None
        with self._cond:
            # A spare being prepared (started at half the threshold): it stops after its step in flight.
            self._spare_wait_locked()
            if self.mode == "group" and (self._syncing or self._written_seq > self._durable_seq or self._failure is not None):
                return None
        header = self._header_for(None, generation, prev_id=self._header.journal_id)
        self._next_header = header
        self._target = next_path(self.path)
        self.rotating = True
        self.rotation_wanted = False
        self._pre = {}
        return {"id": header.id_hex, "seq": self._last_seq}

    def stop_capture(self) -> list[Undo]:
        """The pre-images kept since the rotation (the background compaction's view is built: stop keeping)."""
        pre, self._pre = self._pre, None
        return list(pre.values()) if pre is not None else []

    def retire_segment(self) -> None:
        """The snapshot holding the old segment is durable: the new segment takes the journal's name (the old
        one, now redundant, is replaced in one rename, then the directory is synced). Raises OSError; until
        it succeeds a load follows the chain, and no new rotation starts."""
        nxt = next_path(self.path)
        with self._cond:  # _create() runs under it too: the segment is never renamed while being created
            if self._target == nxt:
                if self._next_header is not None:
                    # No record since the rotation: the segment has no file yet. The snapshot names it and
                    # holds the old one, so it is created under the journal's own name, over the old one
                    # (in the spare if one is ready, then renamed: posstate/journal/spare.py).
                    self._target = self.path
                    self._replace_ok = True
                    self.rotating = False
                    self._arm_spare()
                    return
                # A segment started in the spare has its header on disk only once its first record's
                # (group) sync returned: renamed before that, a power loss could leave a blank file under
                # the journal's name (issue 14.3). Raises if not; the compaction retries.
                self._header_durable_or_raise(nxt)
                if self._target == nxt:  # (re-checked: the wait let go of the lock)
                    if fs.exists(nxt):
                        fs.replace(nxt, self.path)
                    self._target = self.path
                    self._replace_ok = True
        fs.fsync_dir(self.path.parent)
        self.rotating = False
        self._arm_spare()  # ``.next`` is free again: the next segment's spare is wanted from half a threshold

    def cancel_rotation(self) -> None:
        """A pending background compaction is given up (a save of memory, a load, close): stop capturing.
        The segments stay as they are: a snapshot of memory makes them redundant (_install), a load replays them."""
        self._pre = None
        self.rotating = False

    def _install(self, header: jf.JournalHeader | None) -> None:
        """The snapshot naming *header* is durable: the old journal is redundant; the next record creates
        the new one. Snapshot mode (*header* None): delete the replayed journal the snapshot now holds."""
        self.rotation_wanted = False  # a snapshot of memory holds what a wanted rotation would have
        self._retire_legacy()
        self._retire_next()
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
        self._arm_spare()
        with self._cond:
            self._written_seq = self._durable_seq = self._last_seq
            self._durable_end = 0
            self._seq_end = {}
            self._failure = None
            self._pending = []

    def _retire_next(self) -> None:
        """A durable snapshot of memory holds every segment: remove a ``.next`` segment (never raises; left in
        place it is harmless: its records are all at or below the snapshot's sequence number)."""
        self._spare_settle()
        self._target = self.path
        self.rotating = False
        self._promote = False
        self._pre = None
        if self._spare_fd is not None:
            return  # ``.next`` is the blank spare this journal prepared (kept for the next segment): no segment
        nxt = next_path(self.path)
        try:
            if fs.exists(nxt):
                fs.unlink(nxt)
                fs.fsync_dir(self.path.parent)
        except OSError as exc:
            log.warning("%s: could not remove the folded-in segment (%s); it is skipped on load", nxt, exc)

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

    def close(self) -> None:
        try:
            self.drain()
        except PersistenceError as exc:
            log.warning("%s: journal sync at close failed (%s)", self.path, exc)
        with self._cond:
            self._spare_closed = True  # no new step of the spare's thread starts
            self._cond.notify_all()  # (a rename waiting for a group sync gives up)
        self._drop_spare(unlink=True)
        self._detach()
