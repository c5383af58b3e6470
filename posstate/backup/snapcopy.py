"""A backup as a copy of the state file: the newest durable snapshot, verified, never encoded again.

The steps (docs/RECOVERY.md, "Backups"): sweep temps a killed backup left; read the state file once; check
its header and SHA-256 checksum, then (with the key) decrypt and validate those bytes, and check the account;
write them to a temp file in the backup folder and fsync it; link the temp to the backup's timestamped name
(never replacing a file) and remove the temp; fsync the folder; read the backup back and require the same
bytes with a holding checksum. A SIGKILL at any step leaves either no backup or a whole copy of bytes that
were fully verified before they got the name (a temp, never listed as a backup, is swept by the next backup).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from posstate.backup import backups as _backups
from posstate.backup.backups import BackupInfo
from posstate.backup.verified import VerifiedCache, probe
from posstate.core.errors import CorruptStateError, PersistenceError, PosStateError
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.container import checksum_of

#: The owner closed while this backup ran: it stopped before giving the backup its name.
Cancelled = _backups.Cancelled


class Newer(Exception):
    """The state file holds a snapshot newer than the newest one known durable (a save in progress)."""


class Older(CorruptStateError):
    """The state file holds a generation older than *min_generation* (its :attr:`generation`)."""

    def __init__(self, path: Path, generation: int, reason: str, *, next_step: str) -> None:
        super().__init__(path, reason, next_step=next_step)
        self.generation = generation


def copy_state_file(
    state_path: Path,
    backup_dir: Path,
    *,
    options: _statefile.ReadOptions,
    cache: VerifiedCache,
    check_account: Callable[[StateData], None],
    max_generation: int | None = None,
    min_generation: int | None = None,
    gate: threading.Lock | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    named: Callable[[], None] = lambda: None,
    now: float | None = None,
    known: Callable[[str], bool] = lambda checksum: False,
    confirm: Callable[[], None] | None = None,
) -> BackupInfo:
    """Copy the state file into *backup_dir* as a new verified timestamped backup; return its info.

    *max_generation*: refuse (:class:`Newer`) a file of a higher generation (its save has not returned yet).
    *min_generation*: the generation the owner made durable; an older file was put there behind the writer
    lock (an old genuine copy planted: it would decrypt and validate) and is refused (CorruptStateError).
    *gate*/*cancelled*: the name is given under *gate* and only if not *cancelled* (:class:`Cancelled`).
    On failure nothing new is listed in *backup_dir* (PersistenceError names the step; a source that does
    not verify raises what reading it raises: CorruptStateError, WrongKeyError ...).
    *known*: True for a trailer checksum of bytes the owner encoded from its validated memory (or loaded and
    validated): such a file, its trailer holding, is those very bytes (SHA-256), so it is not decrypted and
    validated again (issue 14.3: that is O(state) work that would hold the GIL in one C call).
    *confirm*: called once the bytes read verified, before anything is written; it raises to refuse them (an
    explicit backup outside the owner's lock: a save may have renamed them into place and failed since, 14.3).
    """
    _backups.sweep_temps(backup_dir, gate, cancelled)
    data = _statefile.read_bytes(state_path, what="saved state", max_size=options.max_file_bytes)
    header = _codec.inspect(data, path=state_path)  # header + checksum, no key needed
    if max_generation is not None and header.generation > max_generation:
        raise Newer(header.generation)
    if min_generation is not None and header.generation < min_generation:
        raise Older(
            state_path,
            header.generation,
            f"holds generation {header.generation}, older than generation {min_generation} this process made "
            "durable (replaced behind the writer lock); no backup of it was taken",
            next_step="find what else writes to this directory and stop it; the state in memory is intact, but the "
            "next save refuses to replace a file it did not write (ConcurrentModificationError): check the directory "
            "with `posstate validate` before the bot is restarted",
        )
    checksum = checksum_of(data)  # inspect() checked it against the bytes
    if checksum is None or not known(checksum):
        loaded = _statefile.parse(data, path=state_path, options=options)  # decrypt + validate, once
        check_account(loaded.state)
    if confirm is not None:
        confirm()
    now = time.time() if now is None else now
    stamp = _backups.stamp_at(now)
    try:
        fs.ensure_dir(backup_dir)
    except OSError as exc:
        raise PersistenceError(backup_dir, operation="create backup directory", cause=exc) from exc
    try:
        target, backup_id = _place(data, backup_dir, stamp, gate=gate, cancelled=cancelled, named=named)
    finally:
        _backups.sweep_temps(backup_dir, gate, cancelled)  # a temp whose removal failed (the backup may be in)
    try:
        seen = probe(target)  # before the read-back: a change after it is never trusted from the cache
        back = fs.read_file(target, max_size=options.max_file_bytes)
        if back != data:
            raise OSError(5, "backup read back differs from the verified state file")
        _codec.inspect(back, path=target)
    except (OSError, PosStateError) as exc:
        with gate if gate is not None else contextlib.nullcontext():
            if not cancelled():  # else the folder may be another bot's: its prune checks this backup in full
                _atomic.quiet_unlink(target)  # a copy of a file still in place: redundant by construction
                with contextlib.suppress(OSError):
                    fs.fsync_dir(backup_dir)
        cause = exc if isinstance(exc, OSError) else OSError(5, str(exc))
        raise PersistenceError(target, operation="verify backup", cause=cause) from exc
    info = BackupInfo(
        id=backup_id,
        path=target,
        created_at=datetime.strptime(backup_id[:15], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc),  # the id used
        generation=header.generation,
        size=len(data),
        position_count=header.position_count,
        key_id=header.key_id if header.encrypted else None,
        valid=True,
        written_at=datetime.fromtimestamp(header.written_at_ms / 1000, tz=timezone.utc),
    )
    if seen is not None:
        cache.remember(target.name, seen, info)
    return info


def _place(
    data: bytes,
    backup_dir: Path,
    stamp: str,
    *,
    gate: threading.Lock | None,
    cancelled: Callable[[], bool],
    named: Callable[[], None],
) -> tuple[Path, str]:
    """Write *data* to an fsynced temp, link it to the first free name of *stamp* (then call *named*, under
    *gate*), drop the temp, fsync the folder. Returns the backup's path and id."""
    first = backup_dir / _backups.file_name(stamp)
    if cancelled():  # close() gave it up: not even a temp in a folder that may be another bot's now
        raise Cancelled(str(first))
    try:  # (a write under way when close() gives up is finished, then its temp removed by name: never named)
        tmp = _atomic.write_temp(first, data)
    except _atomic.WriteFailed as wf:
        raise PersistenceError(first, operation=f"backup {wf.step}", cause=wf.cause) from wf.cause
    try:
        for backup_id in _backups.fresh_ids(backup_dir, stamp):
            target = backup_dir / _backups.file_name(backup_id)
            with gate if gate is not None else contextlib.nullcontext():
                if cancelled():
                    raise Cancelled(str(target))
                try:
                    fs.link(tmp, target)
                except FileExistsError:
                    continue  # another backup took this name in this second
                except OSError as exc:
                    if exc.errno not in _atomic._NO_LINKS:
                        raise PersistenceError(target, operation="backup link", cause=exc) from exc
                    _atomic.commit(tmp, target)  # no hard links here: rename (we hold the folder)
                named()
            break
        else:  # pragma: no cover - ten thousand backups in one second
            raise PersistenceError(backup_dir, operation="backup name", reason="no free backup name in this second")
    except _atomic.WriteFailed as wf:
        raise PersistenceError(backup_dir, operation=f"backup {wf.step}", cause=wf.cause) from wf.cause
    finally:
        _atomic.quiet_unlink(tmp)
    try:
        fs.fsync_dir(backup_dir)
    except OSError as exc:
        _atomic.quiet_unlink(target)
        raise PersistenceError(backup_dir, operation="backup fsync_dir", cause=exc) from exc
    return target, backup_id
