"""The journal's state: its open file, header, sealer and sequence numbers; failure handling.

The Journal class is a chain, one concern per module: JournalBase (here) -> JournalGroupSync (groupsync.py)
-> JournalSpare (spare.py) -> JournalRotation (rotation.py) -> JournalRecover (recover.py) -> Journal
(journal.py, the append path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from posstate.core.errors import (
    PersistenceError,
    PosStateError,
    WrongKeyError,
)
from posstate.journal import format as jf
from posstate.journal.records import _key_for
from posstate.model.ops import Undo
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


class JournalBase:
    """The journal file of one state directory: attributes, status, failure handling."""

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
        #: Set (from any thread, no lock) when a rotation is wanted before the thresholds (a due timed
        #: backup, issue 14.2): the next change rotates, under the lock it holds anyway. Cleared by a rotation.
        self.rotation_wanted = False
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
        # Segments (issue 14): where the next journal is created (self.path, or the ``.next`` segment a
        # rotation starts); True from a rotation until the background compaction retired the old segment
        # (no second rotation meanwhile: at most two segments); the pre-images of every key changed since the
        # rotation while the background builds its view (None: not capturing); True after a load that
        # replayed more than one segment (the load folds them into a snapshot).
        self._target = path
        self.rotating = False
        self._pre: dict[tuple[str, Any], Undo] | None = None
        self.fold_needed = False
        #: The highest generation a fold record past the snapshot names (journal/fold.py; 0: none): a load
        #: keeps every later generation above it.
        self.fold_seen = 0

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

    def _header_for(self, journal_id: bytes | None, generation: int, prev_id: bytes | None = None) -> jf.JournalHeader:
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
            prev_id=prev_id,
        )

    def _write_key(self, header: jf.JournalHeader) -> bytes | None:
        if self._write_keyring is None:
            if header.encrypted:
                self._needs_rotation = True
            return None
        if not header.encrypted:  # never a plaintext record while encryption is on
            raise WrongKeyError(self.path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
        return _key_for(header, self._write_keyring, self.path)

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
