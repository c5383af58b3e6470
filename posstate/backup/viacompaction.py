"""Timed backups in the journal modes (issue 14.2): the copy of a compaction's snapshot, never memory encoded again.

In ``"sync"`` and ``"group"`` a change is acknowledged once its journal record is durable; the snapshot (the
state file) only holds it after the next compaction. When a timed backup falls due while memory holds
acknowledged changes the newest durable snapshot lacks, the backup thread does not encode memory (O(state) on
a background thread that competes with the bot for the processor and the GIL): it asks the manager for a
background compaction (:meth:`~posstate.backup.files.StateFiles.request_compaction`: the rotation the
journal thresholds start, O(1) under the manager's lock; none is started while one is pending or finishing),
and returns. That compaction's after-save hook notes its snapshot and asks for the backup again; the thread
then copies the verified file (:func:`posstate.backup.snapcopy.copy_state_file`, the trailer checksum of
bytes this process encoded needs no decrypt). So a timed backup costs at most one compaction, which the
journal needs anyway, plus a file copy and a keyless read-back; it holds the state as of that compaction's
rotation (docs/RECOVERY.md, "Backups", says how stale that can be).

Any snapshot made durable after the backup fell due will do (one noted since ``last_backup_at +
backup_interval``: a threshold's compaction whose after-save hook found the backup due, a save; or one pending
when the backup is asked for). Failure paths:

* the journal refuses the rotation (group mode: records still wait for their sync, which the manager's side
  syncs first; a failed journal that the next change compacts on its own): asked again at once a few times,
  then every ``min(backup_interval / 8, RETRY_REFUSED)`` seconds; after :data:`REFUSED_LIMIT` refusals in a
  row the acknowledged state in memory is backed up instead (the backup of issue 15.2, ``acknowledged: true``);
* the compaction fails (reported by the manager as an ``error`` event and retried by it): each new failed
  attempt is reported as ``backupFailed`` with ``operation: "compaction"`` (the backup stays due, retried
  after ``backup_interval`` as any failed backup); from :data:`FALLBACK_AFTER` failed attempts on, memory is
  backed up instead, so a disk that refuses the state file's folder still gets backups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from posstate.backup import acked as _acked
from posstate.backup import snapcopy as _snapcopy
from posstate.backup.files import CompactionAsk
from posstate.core.errors import PosStateError

if TYPE_CHECKING:
    from posstate.backup.background import BackupService
    from posstate.backup.backups import BackupInfo

log = logging.getLogger("posstate")

#: Failed attempts of the compaction a timed backup waits for before memory is backed up instead.
FALLBACK_AFTER = 3
#: Refused asks in a row (each a few quick tries, RETRY_REFUSED apart: about 2 s) before memory is backed up instead.
REFUSED_LIMIT = 40
#: At most this long (seconds) before asking again after a refused rotation.
RETRY_REFUSED = 0.05
#: A timed backup waiting longer than max(backup_interval, this) for its compaction is reported as failed
#: (seconds; a stuck disk, or a long job ahead of it for the background turn), and again each interval after.
STUCK_AFTER = 120.0
_QUICK_TRIES = 3

Step = Literal["copy", "wait", "memory", "skip"]


@dataclass(slots=True)
class Awaited:
    """A due timed backup waiting for a snapshot: the first one durable at *min_generation* or above."""

    min_generation: int
    since: float  # when it began waiting (the service's clock), or when it was last reported overdue
    reported: int = 0  # failed attempts of the compaction already reported as backupFailed
    refused: int = 0  # refused rotations in a row


def ready(svc: BackupService) -> bool:
    """True: copy the durable snapshot now. False: the backup waits for a compaction, or memory was backed up
    instead (the fallback; when nothing could be taken, e.g. a transaction is open, it is decided anew later)."""
    step = decide(svc)
    if (step == "memory" and svc._from_memory("backup") is None) or step == "skip":
        svc.awaited = None
    return step == "copy"


def decide(svc: BackupService) -> Step:
    """On the backup thread, under the backup folder's lock, with a timed backup due and memory ahead of the
    durable snapshot: ``"copy"`` the durable snapshot now, ``"wait"`` for the compaction asked for (its
    after-save hook asks again; the timer polls meanwhile), or back up ``"memory"`` instead (fallback);
    ``"skip"``: nothing to do (``backup_interval`` 0: the newest snapshot is backed up already)."""
    durable = svc._durable_generation
    awaited = svc.awaited
    interval = svc._files.config.backup_interval
    if interval <= 0:  # a backup at every snapshot, no timer: never a compaction of its own
        return "copy" if durable > svc.backed_generation else "skip"
    if awaited is None:
        last = svc._files.last_backup_at
        # Noted after the backup fell due, and not in the clock's future (noted before it was stepped back).
        fresh = last is not None and last + interval <= svc.noted_at <= svc.clock()
        if fresh and durable > svc.backed_generation:
            return "copy"  # made durable after the backup fell due (a threshold's compaction, a save): it will do
        awaited = svc.awaited = Awaited(min_generation=durable + 1, since=svc.clock())
    elif durable >= awaited.min_generation:
        return "copy"
    ask = _ask(svc)
    if ask.state == "refused":
        awaited.refused += 1
        if awaited.refused >= REFUSED_LIMIT:
            log.warning(
                "%s: the journal refused %d compactions for a timed backup (%s); backing up memory instead",
                svc._files.config.backup_path,
                awaited.refused,
                ask.reason,
            )
            return "memory"
        svc._timer_at = svc.clock() + min(interval / 8, RETRY_REFUSED)  # sooner than interval/8, never a busy loop
        return "wait"
    awaited.refused = 0
    if ask.attempts > awaited.reported:
        awaited.reported = ask.attempts
        reason = (
            f"the compaction this timed backup waits for failed (attempt {ask.attempts}, retried by the manager): {ask.error}"
        )
        svc._failed(reason, "compaction")
        if ask.attempts >= FALLBACK_AFTER:
            return "memory"
        return "wait"
    now = svc.clock()
    awaited.since = min(awaited.since, now)  # the clock was stepped back: count from now
    waited = now - awaited.since
    if waited >= max(svc._files.config.backup_interval, STUCK_AFTER):
        awaited.since = now  # reported again an interval later (the failure's retry pause), not at each poll
        svc._failed(
            f"the compaction this timed backup waits for has not finished after {waited:.0f} s (a stuck disk under "
            "the state file, or a long background job ahead of it); the backup stays due",
            "compaction",
        )
    return "wait"


def _ask(svc: BackupService) -> CompactionAsk:
    ask = svc._files.request_compaction()
    for _ in range(_QUICK_TRIES - 1):
        if not ask.again:  # a busy manager (a transaction may hold it and want the backup folder): not now
            break
        ask = svc._files.request_compaction()
    return ask


def from_memory(svc: BackupService, operation: str, *, pause: Callable[[], None] | None) -> BackupInfo | None:
    """A backup of the acknowledged state in memory (:func:`posstate.backup.acked.from_memory`): at close
    (*operation* ``"close"``, on the closing thread, in one go) or as the fallback above (in slices, *pause*).
    A failure is reported (``backupFailed``); None when nothing was taken."""
    try:
        info = _acked.from_memory(
            svc._files, now=svc.clock(), pause=pause, gate=svc._gate, cancelled=lambda: svc._cancelled, named=svc._name_given
        )
    except _snapcopy.Cancelled:
        return None  # close() gave it up before its name and said so
    except (PosStateError, OSError) as exc:
        svc._failed(exc, "close" if operation == "close" else getattr(exc, "operation", operation))
        return None
    if info is None:
        return None
    svc._took(info, extra={"acknowledged": True, "operation": operation})
    return info
