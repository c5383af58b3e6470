"""The spare segment (issue 14.3): ``<journal>.next`` created, zero-filled and made durable ahead of time on a
background thread, so that the first record of a new segment costs one ``pwrite`` + ``fdatasync`` like any other.

Creating a journal file costs an ``open(O_CREAT)``, its first bytes, an ``fsync`` of the file and one of the
directory: 5-8 ms, on the caller's thread with the manager's lock held (every group thread waits). Instead,
once the open journal holds half of either threshold (``journal_max_records``, ``journal_max_bytes``), a
thread (``posstate-compact-spare-...``) creates ``.next`` holding nothing but zeros (the header's 96 bytes and
room for the next segment's records, at most 4 MiB, synced in steps; right after a save the first stretch,
grown in place at half a threshold), fsyncs it and the directory, and keeps it open. The rotation then
adopts it: the first record writes the segment's header and itself at offset 0 in one ``pwrite`` (the header
is made only then: its id, base sequence number, generation and key are those of the rotation).

A spare is *blank*: every byte zero (:func:`posstate.journal.files.is_blank`). No header parses, so every
reader that looks for a segment sees none (a load, validate, history, recovery, the replica shipper, serve);
nothing in it was ever acknowledged (a record's ``fdatasync`` also made the header durable, written by the same
``pwrite``). A crash at any step of the preparation leaves no file, or a blank one (any length): harmless,
removed by the next preparation. docs/JOURNAL.md, "The spare segment", has the lifecycle and the crash analysis.

After a save (the journal the snapshot names is created under its own name) the first record goes into the
spare too, and the thread then renames it over the journal's name (``_promote``), as a background compaction
does with its segment; until then a load follows the snapshot's id to ``.next`` and no rotation starts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from posstate.core.errors import PersistenceError, PosStateError
from posstate.journal import format as jf
from posstate.journal.files import SPARE_ZEROS_MAX, blank_file, next_path
from posstate.journal.groupsync import JournalGroupSync
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

#: The spare is prepared once the open journal holds 1/SPARE_FRACTION of either threshold.
SPARE_FRACTION = 2
#: "Never" for the record and byte marks (no spare wanted until something re-arms them).
NEVER = 1 << 62
#: The thread that prepares the spare. It starts with the background compaction's prefix: the reliability
#: harness counts it with the background work, never with the caller's operations.
SPARE_THREAD = "posstate-compact-spare"
#: How long a background compaction waits for the change that rotated to write its record (seconds).
SEGMENT_START_WAIT = 0.05
#: How long the spare's thread waits for the group sync of the first record before it renames the segment
#: after a save (seconds); then it gives up and tries again later (``error`` event).
PROMOTE_WAIT = 30.0
_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see JournalSpare._padding)
#: The spare's zeros are written and synced this many bytes at a time.
SPARE_STEP = 256 * 1024


class JournalSpare(JournalGroupSync):
    """The spare ``.next`` segment: prepared by a background thread, adopted by the first record of a segment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spare_fd: int | None = None  # open on the blank, durable ``.next`` this journal prepared
        self._spare_size = 0
        self._spare_target = 0  # the size of the spare for the next segment (set by want_spare)
        self._spare_busy = False  # the thread is preparing (or promoting)
        # A caller waits for the preparation in flight (a rotation, a save, a load, close): its thread stops
        # writing zeros after the step in flight and publishes the shorter spare (issue 14 attack).
        self._spare_stop = False
        self._spare_closed = False
        # True while the live journal is ``.next`` and no compaction will rename it (the first record after a
        # save adopted the spare): the thread renames it over the journal's name; no rotation meanwhile.
        self._promote = False
        #: Record count and byte offset of the open journal at which a spare is wanted (NEVER: not now).
        self._spare_at = NEVER
        self._spare_bytes_at = NEVER
        #: The last preparation's failure (None: none yet, or it succeeded since): tests and status read it.
        self.spare_error: BaseException | None = None
        # The change that rotated has not written its record (the new segment's first) yet; then the
        # sequence number of that record (group mode: the background waits for its sync too).
        self._first_pending = False
        self._first_seq = 0
        self._spare_made = False  # this journal created a spare file (close removes a blank one it left)
        self._promote_seq = 0  # the first record of a segment started in the spare (renamed only once durable)

    def _detach(self) -> None:
        self._promote_seq = 0  # the next segment's header is durable unless it too starts in a spare
        super()._detach()

    # ------------------------------------------------------------------------- the caller's side (O(1))
    def _arm_spare(self, retry: bool = False) -> None:
        """Want a spare once the open journal holds half of a threshold (*retry*: after a failure, a while on)."""
        if not self.active:
            return
        if retry:
            self._spare_at = self._records + max(16, self._max_records // 10)
            self._spare_bytes_at = NEVER
            return
        self._spare_at = max(1, self._max_records // SPARE_FRACTION)
        self._spare_bytes_at = max(1, self._max_bytes // SPARE_FRACTION)

    def _spare_wanted(self) -> bool:
        return self._records >= self._spare_at or self._end >= self._spare_bytes_at

    def _spare_eligible(self, held: bool = False) -> bool:
        """May ``.next`` be (re)made a spare now? Only while the live journal is the file at the journal's name
        and nothing else holds ``.next``: no rotation, no segment waiting for its rename, no spare yet (*held*:
        may the spare this journal holds be grown now, under the same conditions)."""
        return (
            self.active
            and not self._spare_closed
            and (self._spare_fd is not None) == held
            and self._fd is not None
            and self._header is not None
            and self._next_header is None
            and not self._needs_rotation
            and self._target == self.path
            and not self.rotating
            and not self._promote
        )

    def want_spare(self) -> None:
        """The open journal passed half a threshold (or a segment waits for its rename): start the thread
        that prepares the spare. O(1); the caller holds the manager's lock. Never raises."""
        self._spare_at = self._spare_bytes_at = NEVER
        # Sized here, at the record that asked, not when the thread runs: the same changes always make the
        # same spare (the crash harness replays the background's steps one by one).
        target = jf.HEADER_SIZE + self._spare_zeros(self._end, self._records)
        short = self._spare_eligible(held=True) and self._spare_size < target
        if not (self._promote or self._spare_eligible() or short):
            return
        with self._cond:
            if self._spare_busy or self._spare_closed:
                return
            self._spare_busy = True
            self._spare_target = target
        try:
            threading.Thread(target=self._spare_run, name=f"{SPARE_THREAD}-{self.path.name}", daemon=True).start()
        except RuntimeError as exc:  # no thread can be started (interpreter shutting down, resources)
            with self._cond:
                self._spare_busy = False
                self._cond.notify_all()
            log.warning("%s: could not start the spare segment's thread (%s)", self.path, exc)

    def wait_spare(self, timeout: float | None = None) -> bool:
        """Wait until no preparation is in flight (at most *timeout* seconds). True when none is."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._spare_busy, timeout)

    def wait_segment_start(self, timeout: float | None = None) -> None:
        """The background compaction's first step: wait (at most *timeout* seconds, default
        :data:`SEGMENT_START_WAIT`; none when the compaction was not started by a change) until the change that
        rotated has written the new segment's first record and (group mode) its sync returned. That record
        is then one ``pwrite`` + ``fdatasync`` that competes with nothing the compaction starts (its first
        slices hold the interpreter lock; for a small state its own fsync comes at once)."""

        def started() -> bool:
            if self._first_pending:
                return False
            return self.mode != "group" or self._failure is not None or self._durable_seq >= self._first_seq

        with self._cond:
            self._cond.wait_for(started, SEGMENT_START_WAIT if timeout is None else timeout)

    def _segment_started(self, seq: int) -> None:
        """The rotation's first record was written (or its write failed: *seq* 0). Caller holds ``_cond``."""
        self._first_pending = False
        self._first_seq = seq
        self._cond.notify_all()

    @property
    def spare_ready(self) -> bool:
        """A blank, durable ``.next`` is prepared and held open for the next segment."""
        return self._spare_fd is not None

    def _take_spare(self) -> tuple[int, int] | None:
        """The spare for the segment about to start (caller holds ``_cond``), or None. It is used only while
        ``.next`` is still the file this journal prepared (two ``stat`` calls, no sync)."""
        fd = self._spare_fd
        if fd is None or self._spare_busy:
            return None
        self._spare_fd = None
        try:
            a, b = fs.fstat(fd), fs.lstat(next_path(self.path))
            same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_size == self._spare_size
        except OSError:
            same = False
        if not same:
            log.warning("%s: the spare segment was replaced or changed on disk; creating the segment instead", self.path)
            _quiet_close(fd)
            return None
        return fd, self._spare_size

    def _spare_settle(self) -> None:
        """Before a save's install, a load or close changes ``.next``: wait for the thread's step in flight."""
        with self._cond:
            self._spare_wait_locked()

    def _spare_wait_locked(self) -> None:
        """Wait until no preparation is in flight, asking the one in flight to stop writing zeros: the caller
        waits for at most the step in flight and the file's and directory's syncs, never for every remaining
        step of a spare of megabytes. Caller holds ``_cond``."""
        if self._spare_busy:
            self._spare_stop = True
            self._cond.wait_for(lambda: not self._spare_busy)

    def _drop_spare(self, *, unlink: bool) -> None:
        """Forget the spare (a load, close): close it and, with *unlink*, remove the blank file (no directory
        sync: if the removal is lost, a blank ``.next`` is harmless and the next preparation replaces it)."""
        self._spare_settle()
        fd, self._spare_fd = self._spare_fd, None
        if fd is not None:
            _quiet_close(fd)
        if unlink and (fd is not None or self._spare_made):  # (a preparation close() cut short left one too)
            nxt = next_path(self.path)
            try:
                if blank_file(nxt):  # (a segment started in it is told apart by its header alone)
                    fs.unlink(nxt)
            except OSError as exc:
                log.info("%s: spare segment left in place (%s); it is blank and ignored", nxt, exc)

    # ------------------------------------------------------------------------------- the spare's thread
    def _spare_run(self) -> None:
        failed: BaseException | None = None
        try:
            early = self._promote  # the spare for the next save's first record: the rotation is far away
            if early:
                self._promote_live()
            self._make_spare(early)
            self.spare_error = None
        except (OSError, PosStateError) as exc:
            self.spare_error = failed = exc
            self._arm_spare(retry=True)
            log.warning("%s: preparing the next journal segment failed (%s); it is created when needed", self.path, exc)
        finally:
            with self._cond:
                self._spare_busy = self._spare_stop = False
                self._cond.notify_all()
        if failed is not None and self._emit is not None:  # once a save may go on: its handler may save, prune (15)
            with contextlib.suppress(Exception):  # an event handler's failure is not the journal's
                self._emit("error", {"context": "journal segment preparation", "error": str(failed)})

    def _promote_live(self) -> None:
        """The live journal is ``.next`` (it adopted the spare after a save): rename it over the journal's
        name, then sync the directory. The snapshot names its id, so until the rename is durable a load
        finds it as ``.next`` (journal/files.py segment_chain): nothing in between is lost."""
        nxt = next_path(self.path)
        with self._cond:  # _create() and retire_segment() run under it too
            # Group mode: the segment's header and first record are durable only once the group's fdatasync
            # ran. Renamed (and the directory synced) before that, a power loss could leave a blank file under
            # the journal's own name, which a load takes for a damaged journal. (wait_for lets go of the lock.)
            if not self._cond.wait_for(self._promote_ready, PROMOTE_WAIT):
                raise _not_yet(nxt, "its first record is not durable yet")
            if not self._promote:
                return
            if self._target != nxt or self._fd is None:
                self._promote = False
                return
            self._header_durable_or_raise(nxt)  # (its group sync failed: the header may be lost)
            if not self._replace_ok and fs.exists(self.path):
                dest = _atomic.move_aside(self.path, self._quarantine, label="replaced")
                log.warning("%s: journal not known to be folded into the snapshot; kept at %s", self.path, dest)
            fs.replace(nxt, self.path)
            self._target = self.path
            self._replace_ok = True
            self._promote = False
        fs.fsync_dir(self.path.parent)
        self._arm_spare()

    def _promote_ready(self) -> bool:
        """May :meth:`_promote_live` go on: the first record in the adopted spare is durable (or the rename is
        no longer wanted, the journal failed or is closing). Caller holds ``_cond``."""
        return not self._promote or self._segment_durable()

    def _segment_durable(self) -> bool:
        """The segment that started in the last adopted spare has its header on disk, or waiting for that is
        over (the journal failed, is closing or closed): before a rename over the journal's name. Sync mode
        synced the first record before the change returned; group mode waits for the group's fdatasync.
        Caller holds ``_cond``."""
        return (
            self.mode != "group"
            or self._durable_seq >= self._promote_seq
            or self._failure is not None
            or self._spare_closed
            or self._fd is None
        )

    def _header_durable_or_raise(self, nxt: Any) -> None:
        """Wait (releasing ``_cond``, at most :data:`PROMOTE_WAIT`) until :meth:`_segment_durable`; raise
        (nothing renamed: a load finds the segment as ``.next``) if its header may still not be on disk.
        Caller holds ``_cond``."""
        if not self._cond.wait_for(self._segment_durable, PROMOTE_WAIT):
            raise _not_yet(nxt, "its first record is not durable yet")
        if self.mode == "group" and self._durable_seq < self._promote_seq:
            raise _not_yet(nxt, "the group sync of its first record failed")

    def _make_spare(self, early: bool = False) -> None:
        """Create the blank ``.next``: zeros for the header and the next segment's records (*early*, right
        after a save: the first stretch only), synced, then the directory synced; kept open. A held spare
        shorter than that is grown in place instead. A ``.next`` left behind is replaced: a blank one is
        removed, anything else (no load followed it: it is no segment of this snapshot) is moved to
        quarantine, as a segment created on the caller's thread does with it."""
        with self._cond:
            grow = self._spare_eligible(held=True)
            if not grow and not self._spare_eligible():
                return
            want = self._spare_target or jf.HEADER_SIZE + self._spare_zeros(self._end, self._records)
            held, have = self._spare_fd, self._spare_size
        if grow and held is not None:
            if want > have:
                self._grow_spare(held, have, want)
            return
        nxt = next_path(self.path)
        if fs.exists(nxt):
            if blank_file(nxt):  # bounded read; a FIFO, symlink, directory or larger file is no spare
                fs.unlink(nxt)
            else:
                dest = _atomic.move_aside(nxt, self._quarantine, label="replaced")
                log.warning("%s: not a segment of this journal; kept at %s", nxt, dest)
        size = (jf.HEADER_SIZE + self._padding(0)) if early else want
        self._spare_made = True
        fd = fs.open_(nxt, fs.O_NEW, 0o600)
        try:
            size = self._write_zeros(fd, 0, size)
            fs.fsync(fd)
            fs.fsync_dir(self.path.parent)
        except BaseException:
            self._unlink_own(fd, nxt)
            raise
        with self._cond:
            # (A rotation during the zeros and syncs may have created its segment over this file, and a
            # compaction renamed that away since: then the name no longer holds this file.)
            if self._spare_eligible() and _same_file(fd, nxt):
                self._spare_fd, self._spare_size = fd, size
                return
        _quiet_close(fd)  # the journal moved on meanwhile (a save, a failure): the blank file stays harmless

    def _write_zeros(self, fd: int, start: int, size: int) -> int:
        """Write zeros from *start* to *size* in steps, each synced (one burst of megabytes would make the
        caller's next fdatasync wait for it); returns where they end. A caller waiting for this preparation (a
        rotation, a save, close) cuts it short after the step in flight: the zeros written so far are the spare
        (the records past them write zeros ahead)."""
        for offset in range(start, size, SPARE_STEP):
            if offset > start and self._spare_stop:
                return offset
            fs.pwrite_all(fd, bytes(min(SPARE_STEP, size - offset)), offset)
            fs.fdatasync(fd)
        return size

    def _grow_spare(self, fd: int, have: int, size: int) -> None:
        """Grow the held spare (the first stretch prepared after a save) in place to *size*, at half a
        threshold. Its size is then what ``fstat`` says, after a failure too (zeros of any length: blank)."""
        try:
            self._write_zeros(fd, have, size)
            fs.fsync(fd)
        finally:
            with self._cond:
                if self._spare_fd == fd:
                    try:
                        self._spare_size = fs.fstat(fd).st_size
                    except OSError:
                        self._spare_fd = None  # (blank: close removes it, the next preparation replaces it)
                        _quiet_close(fd)

    def _unlink_own(self, fd: int, nxt: Any) -> None:
        """A failed preparation: remove ``.next`` only while it is still this blank file and no rotation has
        started (a rotation may meanwhile have created its segment under that name: that is never removed)."""
        with self._cond, contextlib.suppress(OSError):
            if _same_file(fd, nxt) and self._spare_eligible():
                fs.unlink(nxt)  # blank: harmless if this fails too
        _quiet_close(fd)

    def _spare_zeros(self, end: int, records: int) -> int:
        """How many zeros the spare holds after its header: as many bytes as the next segment's records are
        expected to take (this one's bytes per record, up to the thresholds), so that no record of it writes
        zeros ahead on the caller's thread; at least the first stretch, at most :data:`SPARE_ZEROS_MAX`.
        Rounded up to 64 KiB. ``journal_preallocate`` below 64 KiB (0: none) asks for at most that many zeros
        ahead of the records: the spare then holds exactly that many."""
        first = self._padding(0)
        if first < _FIRST_PAD or records <= 0 or end <= jf.HEADER_SIZE:
            return first
        expected = min(self._max_bytes, (end - jf.HEADER_SIZE) * self._max_records // records) + _FIRST_PAD
        return max(first, min(SPARE_ZEROS_MAX, -(-expected // _FIRST_PAD) * _FIRST_PAD))

    def _padding(self, alloc: int) -> int:
        """How many zero bytes to write after a record that goes past the file's end.

        A record that overwrites bytes already on disk makes ``fdatasync`` flush only that data: the file's
        size and block map do not change, so the file system has no metadata to commit (on ext4 that saves
        the journal commit: about a third of an append's cost on the reference machine, docs/JOURNAL.md).
        The space grows geometrically, 64 KiB first and then the file's size again, at most
        ``journal_preallocate`` bytes at a time; 0 turns it off (every record then grows the file).
        """
        return min(self._preallocate, max(_FIRST_PAD, alloc))


def _not_yet(nxt: Any, reason: str) -> PersistenceError:
    return PersistenceError(
        nxt,
        operation="rename the journal segment over the journal's name",
        reason=reason,
        outcome="nothing is lost: until the rename a load finds the segment under this name",
        next_step="none: the rename is tried again a few records later (a save or compaction also ends it)",
    )


def _same_file(fd: int, path: Any) -> bool:
    """*path* names the file open on *fd* (False when it names another or nothing)."""
    try:
        a, b = fs.fstat(fd), fs.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _quiet_close(fd: int) -> None:
    with contextlib.suppress(OSError):
        fs.close(fd)


__all__ = ["NEVER", "PROMOTE_WAIT", "SEGMENT_START_WAIT", "SPARE_FRACTION", "SPARE_THREAD", "JournalSpare"]
