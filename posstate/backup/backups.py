"""Timestamped backups: naming, writing (verified), listing from headers, resolving ids, full validation.

A backup is a container file exactly like the state file, named ``positions_YYYYMMDD_HHMMSS.json`` (UTC)
in ``backup_dir``, with ``_2``, ``_3``... when several fall in one second. Its id is the part after
``positions_``. Nothing here knows about the manager: it takes directories, states and read options.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from posstate.core.errors import (
    AmbiguousBackupError,
    CorruptStateError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import sliced as _sliced
from posstate.storage import statefile as _statefile
from posstate.storage import turns as _turns
from posstate.storage.crypto import Keyring

log = logging.getLogger("posstate")

_NAME = re.compile(r"^positions_([0-9]{8}_[0-9]{6})(?:_([0-9]{1,6}))?\.json$")
_STAMP = "%Y%m%d_%H%M%S"
LATEST = "latest"


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """One timestamped backup, as read from its header (nothing decrypted).

    ``valid`` means the header, checksum, length and versions hold; :meth:`PositionStateManager.validate_backup`
    also decrypts and validates the contents. ``damaged`` means the file is corrupt on disk (quarantine
    material); a file that is merely unreadable here (newer version, other key) is neither valid nor damaged.
    ``generation``, ``position_count``, ``key_id`` and ``written_at`` are None when the header is not trusted.
    """

    id: str
    path: Path
    created_at: datetime
    generation: int | None
    size: int
    position_count: int | None
    key_id: str | None
    valid: bool
    damaged: bool = False
    reason: str = ""
    written_at: datetime | None = None
    #: The file could not be read (an I/O error, not damage): ``latest`` never skips past it.
    unreadable: bool = False

    @property
    def sort_key(self) -> tuple[str, int]:
        """Orders backups by creation: second, then the ``_N`` suffix."""
        return _order(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": str(self.path),
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "written_at": self.written_at.isoformat().replace("+00:00", "Z") if self.written_at else None,
            "generation": self.generation,
            "size": self.size,
            "position_count": self.position_count,
            "key_id": self.key_id,
            "valid": self.valid,
            "damaged": self.damaged,
            "reason": self.reason,
        }


def parse_name(name: str) -> tuple[str, datetime] | None:
    """``(id, created_at)`` for a backup file name, or None if *name* is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    try:
        created = datetime.strptime(m.group(1), _STAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    suffix = m.group(2)
    if suffix is not None and (suffix.startswith("0") or int(suffix) < 2):
        return None
    return (m.group(1) + (f"_{suffix}" if suffix else ""), created)


def _order(backup_id: str) -> tuple[str, int]:
    seq = backup_id[16:]
    return (backup_id[:15], int(seq) if seq else 1)


def file_name(backup_id: str) -> str:
    return f"positions_{backup_id}.json"


def _ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def inspect_file(path: Path, backup_id: str, created: datetime) -> BackupInfo:
    """Read one backup's bytes and check everything that needs no key."""
    base = BackupInfo(
        id=backup_id, path=path, created_at=created, generation=None, size=0, position_count=None, key_id=None, valid=False
    )
    try:
        data = fs.read_file(path)
    except fs.NotRegularFileError as exc:
        return replace(base, damaged=True, reason=str(exc.strerror))
    except OSError as exc:
        return replace(base, reason=f"cannot be read ({exc.strerror or exc})", unreadable=True)
    base = replace(base, size=len(data))
    try:
        header = _codec.inspect(data, path=path)
    except CorruptStateError as exc:
        return replace(base, damaged=True, reason=exc.reason)
    except UnsupportedVersionError as exc:
        return replace(base, reason=f"{exc.what} version {exc.found} is newer than this posstate")
    return replace(
        base,
        generation=header.generation,
        position_count=header.position_count,
        key_id=header.key_id if header.encrypted else None,
        written_at=_ms_to_dt(header.written_at_ms),
        valid=True,
    )


def scan(backup_dir: Path) -> list[BackupInfo]:
    """Every backup in *backup_dir*, newest first (a missing directory holds none)."""
    try:
        names = fs.listdir(backup_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PersistenceError(backup_dir, operation="list backups", cause=exc) from exc
    found: list[BackupInfo] = []
    for name in names:
        parsed = parse_name(name)
        if parsed is not None:
            found.append(inspect_file(backup_dir / name, parsed[0], parsed[1]))
    found.sort(key=lambda b: b.sort_key, reverse=True)
    return found


def names_only(backup_dir: Path) -> list[tuple[str, datetime]]:
    """Ids and creation times of the backups, newest first, without reading any file."""
    try:
        names = fs.listdir(backup_dir)
    except OSError:
        return []
    out = [p for p in (parse_name(n) for n in names) if p is not None]
    out.sort(key=lambda p: _order(p[0]), reverse=True)
    return out


def full_check(
    info: BackupInfo, *, options: _statefile.ReadOptions, pause: Callable[[], None] | None = None
) -> tuple[BackupInfo, _statefile.Loaded | None]:
    """Decrypt and validate a backup; returns the updated info and the loaded state when it is valid.
    With *pause* (a background thread, issue 14.3) the check runs a slice of positions at a time
    (:mod:`posstate.storage.sliced`, the same verdict) and no state is returned."""
    if info.damaged:
        return info, None
    loaded: _statefile.Loaded | None = None
    try:
        if pause is not None:
            # Read before the turn is taken (a read stuck on a hung disk must not stop the process's other
            # background work); one turn (storage/turns.py) for the O(state) check, each slice freed before the next.
            data = _statefile.read_bytes(info.path, what="backup", max_size=options.max_file_bytes)
            with _turns.turn(), _document.pause_gc():
                _sliced.check_bytes_in_slices(data, path=info.path, options=options, pause=pause)
            del data
        else:
            loaded = _statefile.read(info.path, options=options, what="backup")
    except CorruptStateError as exc:
        return replace(info, valid=False, damaged=True, reason=exc.reason), None
    except SchemaValidationError as exc:
        return replace(info, valid=False, damaged=True, reason=f"{exc.json_path}: {exc.detail}"), None
    except WrongKeyError as exc:
        return replace(info, valid=False, damaged=False, reason=f"written with another key (key id {exc.file_key_id})"), None
    except (MissingKeyError, UnsupportedVersionError, StateNotFoundError, PersistenceError) as exc:
        return replace(info, valid=False, damaged=False, reason=str(exc).split("; ")[0]), None
    return replace(info, valid=True, damaged=False, reason=""), loaded


def resolve(backups: list[BackupInfo], ident: str, *, backup_dir: Path) -> BackupInfo:
    """Find a backup by full id, unique prefix, or ``latest`` (the newest whose header holds)."""
    ident = ident.strip()
    if ident.startswith("positions_"):
        ident = ident[len("positions_") :].removesuffix(".json")
    if ident == LATEST:
        for b in backups:
            if b.valid:
                return b
            if b.unreadable:
                # Skipping it would restore an older backup, in which a position closed since may be open.
                raise PersistenceError(
                    b.path,
                    operation="read the newest backup",
                    reason=b.reason,
                    outcome="nothing was restored",
                    next_step="fix the disk and try again, or restore an older backup by its id on purpose "
                    "(`posstate backups list`)",
                )
        raise StateNotFoundError(
            backup_dir, what="valid backup", next_step="no backup can be restored; list them with `posstate backups list`"
        )
    for b in backups:
        if b.id == ident:
            return b
    matches = [b for b in backups if ident and b.id.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise StateNotFoundError(
            backup_dir / file_name(ident), what="backup", next_step="list backups with `posstate backups list`"
        )
    raise AmbiguousBackupError(backup_dir, prefix=ident, matches=[b.id for b in matches])


#: The temp files of backups written without the writer lock start ``.online-positions_``.
ONLINE_TEMP_PREFIX = "online-"
#: An online backup's temp older than this (seconds) was left by a killed writer: the lock holder sweeps it.
ONLINE_TEMP_MAX_AGE = 3600.0


def sweep_temps(backup_dir: Path, gate: threading.Lock | None = None, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Remove temp files a failed or crashed backup left (the caller holds the writer lock); an online backup's temp
    (written without the lock, maybe now) only once its time is over an hour from now either way. *gate*/*cancelled*
    (the backup thread): each removal under the gate, none once close() gave it up (the lock may be another's)."""
    try:
        names = fs.listdir(backup_dir)
    except OSError:
        return
    for n in names:
        if n.startswith(f".{ONLINE_TEMP_PREFIX}positions_") and n.endswith(_atomic.TEMP_SUFFIX):
            try:
                # Dated over an hour ahead is no writer's "now" either (a clock stepped back, a planted file):
                # garbage, or it would never be swept.
                if abs(time.time() - fs.lstat(backup_dir / n).st_mtime) < ONLINE_TEMP_MAX_AGE:
                    continue
            except OSError:
                continue
        elif not (n.startswith(".positions_") and n.endswith(_atomic.TEMP_SUFFIX)):
            continue
        with gate if gate is not None else contextlib.nullcontext():
            if cancelled():
                return
            try:
                fs.unlink(backup_dir / n)
            except OSError as exc:
                log.warning("cannot remove leftover backup temp %s: %s", n, exc)


def stamp_at(now: float) -> str:
    """The name part for a backup made at *now* (``time.time()``: every backup name is read off this one clock;
    ``time.gmtime()`` without an argument reads a coarser clock that can still show the previous second)."""
    return time.strftime(_STAMP, time.gmtime(now))


def fresh_ids(backup_dir: Path, stamp: str) -> Iterator[str]:
    """Ids for a new backup in the second *stamp*, each sorting after every backup already there.

    A name freed by pruning is never reused, and when the newest name is of a later second than *stamp* (the
    clock was stepped back) the ids continue that second: the newest backup always has the greatest id, the
    one ``latest`` restores.
    """
    existing = names_only(backup_dir)
    if existing and existing[0][0][:15] > stamp:
        stamp = existing[0][0][:15]
    taken = [_order(bid)[1] for bid, _ in existing if bid[:15] == stamp]
    for seq in range(max(taken, default=0) + 1, 10_000):
        yield stamp if seq == 1 else f"{stamp}_{seq}"


class Cancelled(Exception):
    """The owner closed while this backup ran: it stopped before giving the backup its name."""


def write_backup(
    state: StateData,
    *,
    backup_dir: Path,
    keyring: Keyring | None,
    compression_level: int | None,
    options: _statefile.ReadOptions,
    now: float | None = None,
    written_at_ms: int | None = None,
    online: bool = False,
    pause: Callable[[], None] | None = None,
    gate: threading.Lock | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    remember: Callable[[Path], Callable[[BackupInfo], None]] | None = None,
    named: Callable[[], None] = lambda: None,
) -> BackupInfo:
    """Write *state* as a new timestamped backup, read it back and validate it; return its info.

    On any failure nothing is left in *backup_dir* (no temp, no partial or unverified backup; once *cancelled*, a
    backup that fails its read-back is left for the next prune) and a :class:`PersistenceError` says which step
    failed. *state* is not modified. The header's ``written_at`` is *written_at_ms* if given; the name records *now*.
    *online*: written without the writer lock (``posstate backups create`` while a bot runs): its temp file is
    named so that the lock holder's sweep leaves it alone while it is young (:func:`sweep_temps`). *pause* (a
    background thread, 14.3): serialize and verify a slice of positions at a time, calling it between slices.
    *gate*/*cancelled*/*named* (the backup thread): named under *gate* only if not *cancelled* (also checked before
    the encode), then *named* is called. *remember* (a cache's ``before_check``): probes it before its read-back.
    """
    if cancelled():
        raise Cancelled(str(backup_dir))
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    stamp = stamp_at(now)
    try:
        fs.ensure_dir(backup_dir)
    except OSError as exc:
        raise PersistenceError(backup_dir, operation="create backup directory", cause=exc) from exc
    stamp_ms = now_ms if written_at_ms is None else min(written_at_ms, now_ms)
    if pause is None:
        _, encoded = _statefile.encode(state.copy(), keyring=keyring, compression_level=compression_level, now_ms=stamp_ms)
    else:  # only written_at and writer are stamped: a shallow copy keeps *state* as it is, with no O(state) copy
        with _turns.turn(), _document.pause_gc():
            _, encoded = _statefile.encode(
                replace(state), keyring=keyring, compression_level=compression_level, now_ms=stamp_ms, pause=pause
            )
    try:
        return _write_verified(encoded, stamp, stamp_ms, backup_dir, options, online, pause, gate, (cancelled, named), remember)
    except PersistenceError:
        raise
    except OSError as exc:
        raise PersistenceError(backup_dir, operation="backup", cause=exc) from exc
    finally:
        if not online:  # without the lock a sweep could remove another writer's temp in use
            sweep_temps(backup_dir, gate, cancelled)


def _write_verified(
    encoded: _codec.Encoded,
    stamp: str,
    stamp_ms: int,
    backup_dir: Path,
    options: _statefile.ReadOptions,
    online: bool,
    pause: Callable[[], None] | None,
    gate: threading.Lock | None,
    close_calls: tuple[Callable[[], bool], Callable[[], None]],  # (cancelled, named)
    remember: Callable[[Path], Callable[[BackupInfo], None]] | None,
) -> BackupInfo:
    cancelled, named = close_calls
    for backup_id in fresh_ids(backup_dir, stamp):
        candidate = backup_dir / file_name(backup_id)
        if fs.exists(candidate):
            continue
        try:
            temp_for = backup_dir / f"{ONLINE_TEMP_PREFIX}{candidate.name}" if online else None
            with gate if gate is not None else contextlib.nullcontext():
                if cancelled():
                    raise Cancelled(str(candidate))
                _atomic.write_new_file(candidate, encoded.data, temp_for=temp_for)
                named()
        except _atomic.WriteFailed as wf:
            if wf.step == "link" and isinstance(wf.cause, FileExistsError):
                continue  # another name in the same second appeared meanwhile
            if wf.renamed:
                _atomic.quiet_unlink(candidate)
            raise PersistenceError(candidate, operation=f"backup {wf.step}", cause=wf.cause) from wf.cause
        target = candidate
        break
    else:  # pragma: no cover - ten thousand backups in one second
        raise PersistenceError(backup_dir, operation="backup name", reason="no free backup name in this second")
    try:
        verified = remember(target) if remember is not None else None  # before the read-back
        data = fs.read_file(target)
        if data != encoded.data:
            raise OSError(5, "backup read back differs from what was written")
        if pause is None:
            _statefile.parse(data, path=target, options=options)
        else:
            with _turns.turn(), _document.pause_gc():
                _sliced.check_bytes_in_slices(data, path=target, options=options, pause=pause)
    except (OSError, PosStateError) as exc:
        with gate if gate is not None else contextlib.nullcontext():
            if not cancelled():  # else the folder may be another bot's (its prune checks this backup in full)
                _atomic.quiet_unlink(target)  # our own copy of a state still in memory: redundant by construction
        cause = exc if isinstance(exc, OSError) else OSError(5, str(exc))
        raise PersistenceError(target, operation="verify backup", cause=cause) from exc
    info = BackupInfo(
        id=backup_id,
        path=target,
        created_at=datetime.strptime(backup_id[:15], _STAMP).replace(tzinfo=timezone.utc),
        generation=encoded.header.generation,
        size=len(encoded.data),
        position_count=encoded.header.position_count,
        key_id=encoded.header.key_id if encoded.header.encrypted else None,
        valid=True,
        written_at=_ms_to_dt(stamp_ms),
    )
    if verified is not None:
        verified(info)
    return info
