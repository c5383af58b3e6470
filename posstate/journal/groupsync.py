"""Group commit (``durability="group"``): concurrent callers share one ``fdatasync`` (leader/follower), and a
failed sync rolls the records it covered back out of memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal

from posstate.core.errors import (
    PersistenceError,
    PosStateError,
    StateLockedError,
)
from posstate.journal.base import JournalBase
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.model.ops import Entries
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)


class JournalGroupSync(JournalBase):
    """settle / rollback / drain of records waiting for their group sync."""

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

    def settled(self) -> bool:
        """True when every record written so far is durable and none failed (always outside group mode). With
        the manager's lock held this says memory holds durable changes only, so a copy of it may be backed up
        (posstate/manager/files.py ``acknowledged``) without waiting for a sync under that lock."""
        if self.mode != "group":
            return True
        with self._cond:
            return self._failure is None and not self._syncing and self._durable_seq >= self._written_seq

    def drain(self) -> None:
        """Make every record written before the call durable (group mode), before a snapshot copies memory.
        Records written meanwhile are not waited for: busy writers would keep it waiting for ever."""
        if self.mode != "group":
            return
        with self._cond:
            goal = self._written_seq  # never chase records written after the call: busy writers would starve it
        while True:
            with self._cond:
                while self._syncing:
                    self._cond.wait()
                if self._failure is not None and any(p[0] > self._failure[0] for p in self._pending):
                    raise self._failure[1]
                if self._durable_seq >= min(goal, self._written_seq):  # lower after a failed sync cut its records
                    return
                self._syncing = True
                target, fd = self._written_seq, self._fd
            self._sync_as_leader(target, fd)
