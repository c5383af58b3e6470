"""What a manager's close() does to its backup service: one deadline, and no wait for a verification.

close() first takes the backup of the acknowledged state in memory (:func:`final_backup`, journal modes),
then stops the backup thread (:func:`stop`). Both share one deadline (``CLOSE_TIMEOUT`` after close() began),
so close() never waits twice. A prune on the backup thread that is still fully checking backups this process
never verified is stopped at its next slice (:class:`ChecksStopped`): a verification only, nothing is lost by
not finishing it, and the next prune checks the rest. A backup that is being written is not stopped there: it
is finished, or, past the deadline, cancelled before it gets its name (its temp file is removed); no backup
is named after close() returned.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posstate.backup.background import BackupService
    from posstate.backup.backups import BackupInfo

log = logging.getLogger("posstate")


class ChecksStopped(Exception):
    """close() stopped a prune's full check between two slices: a verification only, nothing is lost."""


def final_backup(svc: BackupService, timeout: float, deadline: float) -> BackupInfo | None:
    """See :meth:`BackupService.final_backup`."""
    files = svc._files
    try:
        # Whatever holds it (the journal, or a snapshot written since the newest backup: a save, a
        # compaction), an acknowledged state no backup holds gets one.
        st = files.snapshot()
        if files.config.durability == "snapshot" or st is None or files.journal.failed:
            return None
        if st.generation <= svc.backed_generation:
            return None
        if not svc.folder_lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            left = (
                f"a background backup still ran after {timeout:g} s, so the backup of the acknowledged state at "
                "close was not taken (the state file and its journal hold every acknowledged change)"
            )
            where = str(files.config.backup_path)
            log.warning("%s: close: %s", where, left)
            files.emit("backupFailed", {"path": where, "reason": left, "operation": "close"})
            return None
        with files.deferred_events():  # its handlers run once the folder is released (docs/ARCHITECTURE.md)
            try:
                return svc._from_memory("close")  # its own prune verifies nothing new at close (ChecksStopped)
            finally:
                svc.folder_lock.release()
    except Exception as exc:  # a bug must not keep close() from releasing the writer lock
        log.exception("the backup at close failed unexpectedly")
        svc._failed(exc, "close")
        return None


def stop(svc: BackupService, timeout: float, deadline: float) -> str | None:
    """See :meth:`BackupService.close`."""
    with svc._cond:
        svc._closing = True  # no new request; one already asked for still runs (within the deadline)
        svc._cond.notify_all()
        thread = svc._thread
    if thread is None or thread is threading.current_thread():  # from an event handler of this backup
        return None
    if getattr(svc.folder_lock, "_is_owned", lambda: False)():  # a handler holding the folder (a restore's,
        with svc._cond:  # closing): the thread waits for it, and then touches nothing in the folder (15)
            svc._cancelled = True
            dropped = svc._wanted or (svc._busy and not svc._ran)  # asked for, and not taken yet
        if not dropped:
            return None
        return _report(
            svc,
            "close() was called from an event handler holding the backup folder: the timed backup asked for was not "
            "taken (the state file and its journal hold every acknowledged change)",
        )
    thread.join(max(deadline - time.monotonic(), 0.0))
    if not thread.is_alive():
        return None
    svc.cache.abandon(min(max(deadline - time.monotonic(), 0.0) + 1.0, max(timeout, 0.001)))  # the lock goes
    with svc._cond:  # first: no sweep and no name after this, even if the gate stays busy (15 attack)
        svc._cancelled = True
        done = svc._ran and not svc._named
    if done:  # its backup ended (not taken, and said so, or skipped): only its event handlers run on
        left = f"a background backup's event handlers still ran after {timeout:g} s (it names no backup now)"
        log.warning("%s: close: %s", svc._files.config.backup_path, left)
        return left
    # A name being given holds the gate for one file operation: a short grace, not a second timeout. Once it is
    # taken, _named (set under it) says for sure whether this run gave a backup its name.
    if not svc._gate.acquire(timeout=min(max(deadline - time.monotonic(), 0.0) + 1.0, max(timeout, 0.001))):
        return _report(
            svc,
            f"a background backup was still running after {timeout:g} s and could not be cancelled (a file "
            "operation is stuck): it may still add a backup, which is whole and verified if it appears",
        )
    svc._gate.release()
    if svc._named:  # its check, prune or handlers run on; a backup that fails its check is removed, and reported
        left = f"a background backup named before close() still ran its check, prune or event handlers after {timeout:g} s"
        log.warning("%s: close: %s", svc._files.config.backup_path, left)
        return left
    return _report(
        svc,
        f"a background backup was still running after {timeout:g} s and was cancelled before it got its name: no "
        "backup was added; its temp file, if any, is removed by the next backup",
    )


def _report(svc: BackupService, left: str) -> str:
    where = str(svc._files.config.backup_path)
    log.warning("%s: close: %s", where, left)
    svc._files.emit("backupFailed", {"path": where, "reason": left, "operation": "close"})
    return left
