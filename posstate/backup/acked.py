"""Backups of the acknowledged state: the snapshot plus every journaled change, not only the last snapshot.

In the journal modes a change is acknowledged once its journal record is durable; the state file (the
snapshot) only catches up at the next compaction. A backup that copies the state file would miss those
changes, so (issue 15.2, 15.3):

* the owner of the writer lock backs up what it holds in memory (:func:`from_memory`): under its lock it makes
  every written record durable (group mode), then copies the state, which is exactly the acknowledged state;
  the copy is encoded and written outside that lock, so the bot never waits for the backup's writes;
* anyone else (``posstate backups create`` while a bot runs) reads the state file and its journal without the
  writer lock (:func:`online`): the snapshot, then the journal; when a compaction replaced both in between
  (the journal no longer belongs to the snapshot) the read is retried, so the backup is always one consistent
  state: the snapshot plus a prefix of its records (a record being appended at that moment is a torn tail and
  is left out, as a load leaves it out).

Either way the backup is the state as a compaction would write it now (generation raised to the highest
revision it holds, ``journal.seq`` the last record folded in), written to a temp file, fsynced, linked to its
timestamped name and read back (:func:`posstate.backup.backups.write_backup`): a reader never sees a partial
backup, and a kill leaves no backup or a whole one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from posstate.backup import backups as _backups
from posstate.backup.backups import BackupInfo
from posstate.core.config import StateConfig
from posstate.core.errors import PersistenceError, StateLockedError
from posstate.journal import files as _jfiles
from posstate.journal.current import Current, read_current
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles

__all__ = ["as_compacted", "confirmed_current", "consistent_current", "from_memory", "online"]

log = logging.getLogger("posstate")

#: How many times an online read is retried when a compaction replaces the snapshot under it.
ATTEMPTS = 20


def as_compacted(cur: Current) -> StateData:
    """The state *cur* holds, as a compaction would write it: generation raised to the highest revision
    replayed, ``journal.seq`` the last record applied."""
    st = cur.state.copy()
    st.generation = cur.generation
    st.journal = cur.journal_entry()  # the segment of the last record (issue 14: .next while a compaction is pending)
    return st


def consistent_current(cfg: StateConfig, options: _statefile.ReadOptions, *, attempts: int = ATTEMPTS) -> Current:
    """The snapshot and its journal as one consistent state, read without the writer lock (module docstring).

    The snapshot is read whole (a rename replaces it atomically) and the journal is append-only while that
    snapshot is current, so the snapshot with the records read after it is a state the bot acknowledged (or
    was acknowledging: a record whose sync was still running is included; :func:`confirmed_current` settles
    those). A journal that no longer belongs
    to the snapshot (a compaction replaced both in between) is what :func:`read_current` reports as an
    error: then both are read again. The same snapshot read twice with a journal problem is damage a load
    would have to recover from: raised (not backed up online). A new snapshot at every one of *attempts*
    reads is a busy bot: StateLockedError, "try again" (never a hint to repair what is not damaged)."""
    seen: str | None = None
    tries = max(1, attempts)
    for _ in range(tries):
        cur = read_current(cfg, options)
        if cur.error is None:
            return cur
        if cur.loaded.checksum == seen:
            # The same snapshot twice, its journal still wrong: no compaction ran in between (a compaction
            # always writes a new snapshot first), so this is what a load would have to recover from.
            raise cur.error
        seen = cur.loaded.checksum
    # A new snapshot at every read: the bot compacts faster than the two files can be read. Busy, not damaged.
    raise StateLockedError(
        cfg.state_path,
        pid=None,
        host=None,
        reason=f"the running bot replaced the state file during each of {tries} reads of it and its journal",
        next_step="try again in a moment (or when the bot is less busy); nothing was written",
    )


def confirmed_current(cfg: StateConfig, options: _statefile.ReadOptions, *, attempts: int = ATTEMPTS) -> Current:
    """:func:`consistent_current`, with the journal records it replayed made durable and read again.

    A record the bot wrote but whose ``fdatasync`` is still running is not acknowledged yet; if that sync
    fails, the bot cuts the record off and tells its caller the change failed. So the online reader syncs
    the journal itself (an error there: no backup) and reads again: the same snapshot with at least the
    records it holds means none of them was cut; otherwise it starts over. (A sync of the bot's that fails
    *after* this one succeeded, for later pages, may still cut records this backup holds: docs/SECURITY.md.)"""
    for _ in range(max(1, attempts)):
        cur = consistent_current(cfg, options, attempts=attempts)
        if not cur.applied:
            return cur  # the snapshot alone: a whole, durable file (saves replace it by rename)
        # Every file of the chain (issue 14: the ``.next`` segment of a pending background compaction holds
        # acknowledged records too, and a record there whose sync fails is cut by the bot like any other).
        chain = _jfiles.segment_chain(cfg.journal_path, cfg.legacy_journal_path, cur.loaded.state.journal)
        path = chain[0]
        try:
            for path in chain:
                if len(chain) > 1 and path == chain[0] and not fs.exists(path):
                    continue  # the snapshot's journal had no record past it; the segment follows it
                _sync(path)
        except FileNotFoundError:
            continue  # replaced meanwhile (a compaction, a rotation after a failed sync): read again
        except OSError as exc:
            raise PersistenceError(
                path,
                operation="sync journal for online backup",
                cause=exc,
                outcome="no backup was written",
                next_step="check the disk (`posstate doctor`), then try again",
            ) from exc
        again = read_current(cfg, options)
        if again.error is None and again.loaded.checksum == cur.loaded.checksum and (again.last_seq or 0) >= (cur.last_seq or 0):
            return cur
    raise StateLockedError(
        cfg.state_path,
        pid=None,
        host=None,
        reason=f"the running bot changed its journal under each of {max(1, attempts)} confirmed reads",
        next_step="try again in a moment (or when the bot is less busy); nothing was written",
    )


def _sync(path: Path) -> None:
    """fdatasync *path* through a read-only descriptor (what was written to it is on disk once it returns)."""
    fd = fs.open_(path, fs.O_READ)
    try:
        fs.fdatasync(fd)
    finally:
        fs.close(fd)


def online(
    cfg: StateConfig, options: _statefile.ReadOptions, *, write_keyring: Keyring | None, now: float | None = None
) -> BackupInfo:
    """A new verified backup of the acknowledged state on disk, taken without the writer lock (while a bot
    runs). Retention is not applied (that replaces files: the lock holder's job)."""
    cur = confirmed_current(cfg, options)
    return _backups.write_backup(
        as_compacted(cur),
        backup_dir=cfg.backup_path,
        keyring=write_keyring,
        compression_level=cfg.compression_level if cfg.compression else None,
        options=options,
        now=time.time() if now is None else now,
        online=True,
    )


def from_memory(
    files: StateFiles,
    *,
    now: float | None = None,
    pause: Callable[[], None] | None = None,
    gate: threading.Lock | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    named: Callable[[], None] = lambda: None,
) -> BackupInfo | None:
    """A new verified backup of the acknowledged state the owner holds in memory (None: nothing loaded, or
    memory may hold an unacknowledged change). The owner's lock is held only to copy the state. *pause*
    (the background thread): encode and verify a slice of positions at a time (issue 14.3); *gate* and
    *cancelled*, *named*: as :func:`~posstate.backup.backups.write_backup` (close() gave it up: Cancelled)."""
    state = files.acknowledged()
    if state is None:
        return None
    cfg = files.config
    svc = files.backups  # its verified-backup cache keeps this backup's verdict: the prune after it checks it no more
    return _backups.write_backup(
        state,
        backup_dir=cfg.backup_path,
        keyring=files.write_keyring,
        compression_level=cfg.compression_level if cfg.compression else None,
        options=files.read,
        now=time.time() if now is None else now,
        pause=pause,
        gate=gate,
        cancelled=cancelled,
        named=named,
        remember=svc.cache.before_check if svc is not None else None,
    )
