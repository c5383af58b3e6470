"""Durable file primitives: temp write + fsync, keep-previous, rename, directory fsync, move aside.

Every step is one call through :mod:`posstate.storage.fileops`, so the harness can fail or crash at any of them.
The rules: a temp file is created O_CREAT|O_EXCL|O_NOFOLLOW with mode 0600 under an unpredictable name in
the target's own directory; it is fsynced before it is renamed; the directory is fsynced after; nothing is
ever overwritten except by ``rename`` of a complete, fsynced file; a file set aside goes to quarantine
under a name no other file has (``link`` refuses to overwrite), never to the bin.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import time
from pathlib import Path

from posstate.storage import fileops as fs

TEMP_SUFFIX = ".tmp"
#: errno values meaning "this file system has no hard links": fall back to writing a copy.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class WriteFailed(Exception):
    """An OSError during a durable write, with the step it happened at and whether the rename was done."""

    def __init__(self, step: str, cause: OSError, *, renamed: bool) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause
        self.renamed = renamed


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")


def is_temp_of(name: str, target: Path) -> bool:
    """True for a name :func:`temp_name` makes for *target*, and only those: ``.positions.json.<16 hex>.tmp``
    is the state file's, ``.positions.json.journal.<16 hex>.tmp`` the journal's, never the state file's."""
    prefix = f".{target.name}."
    if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
        return False
    token = name[len(prefix) : -len(TEMP_SUFFIX)]
    return len(token) == 16 and all(c in "0123456789abcdef" for c in token)


def _quiet_close(fd: int) -> None:
    with contextlib.suppress(OSError):
        fs.close(fd)


def quiet_unlink(path: Path) -> None:
    """Remove a temp file of ours, ignoring errors (cleanup after a failure must not mask the failure)."""
    with contextlib.suppress(OSError):
        fs.unlink(path)


def write_temp(target: Path, data: bytes, *, name: Path | None = None) -> Path:
    """Write *data* to a new fsynced temp file beside *target*; on failure nothing is left behind. *name*: the
    temp's name, made by :func:`temp_name` beforehand (a compaction worker writes the temp its parent named)."""
    tmp = temp_name(target) if name is None else name
    step = "open"
    try:
        fd = fs.open_(tmp, fs.O_NEW, 0o600)
    except OSError as exc:
        raise WriteFailed(step, exc, renamed=False) from exc
    try:
        step = "write"
        fs.write_all(fd, data)
        step = "fsync"
        fs.fsync(fd)
    except OSError as exc:
        _quiet_close(fd)
        quiet_unlink(tmp)
        raise WriteFailed(step, exc, renamed=False) from exc
    except BaseException:
        _quiet_close(fd)
        quiet_unlink(tmp)
        raise
    try:
        fs.close(fd)
    except OSError as exc:
        quiet_unlink(tmp)
        raise WriteFailed("close", exc, renamed=False) from exc
    return tmp


def keep_previous(path: Path, keep_as: Path) -> None:
    """Make *keep_as* hold what *path* holds now (a hard link; a fsynced copy where links are missing)."""
    if same_file(path, keep_as):
        # Already (a save that failed after this step is retried): a rename between two links of one file
        # does nothing and would leave the new link's temp name behind.
        return
    tmp = temp_name(keep_as)
    try:
        fs.link(path, tmp)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        copy = write_temp(keep_as, fs.read_file(path))
        fs.replace(copy, keep_as)
        return
    try:
        fs.replace(tmp, keep_as)
    except BaseException:
        quiet_unlink(tmp)
        raise


def commit(tmp: Path, target: Path) -> None:
    """Rename *tmp* over *target* and fsync the directory (the rename is durable when this returns)."""
    try:
        fs.replace(tmp, target)
    except OSError as exc:
        # A rename that reports an error may still have taken effect (an NFS retransmission, a lying disk):
        # only the temp still at its own name proves it did not (issue 12.8).
        try:
            fs.lstat(tmp)
        except OSError:
            raise WriteFailed("rename", exc, renamed=True) from exc
        quiet_unlink(tmp)
        raise WriteFailed("rename", exc, renamed=False) from exc
    try:
        fs.fsync_dir(target.parent)
    except OSError as exc:
        raise WriteFailed("fsync_dir", exc, renamed=True) from exc


def write_file(target: Path, data: bytes) -> None:
    """Durably create or replace *target* with *data* (temp, fsync, rename, directory fsync)."""
    tmp = write_temp(target, data)
    commit(tmp, target)


def write_new_file(target: Path, data: bytes, *, temp_for: Path | None = None) -> None:
    """Durably create *target*, refusing to replace an existing file (``link`` fails on EEXIST). *temp_for*:
    name the temp file after that path instead of *target* (a writer that does not own the folder keeps its
    temp out of the owner's sweep)."""
    tmp = write_temp(temp_for if temp_for is not None else target, data)
    try:
        fs.link(tmp, target)
    except OSError as exc:
        quiet_unlink(tmp)
        raise WriteFailed("link", exc, renamed=False) from exc
    quiet_unlink(tmp)
    try:
        fs.fsync_dir(target.parent)
    except OSError as exc:
        raise WriteFailed("fsync_dir", exc, renamed=True) from exc


def move_aside(path: Path, into: Path, *, label: str) -> Path:
    """Move *path* into the directory *into* under a new unique name; return where it went.

    Used for quarantine: the file is kept, byte for byte, and never replaces anything already there.
    """
    fs.ensure_dir(into)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1000):
        suffix = "" if attempt == 0 else f".{attempt}"
        dest = into / f"{path.name}.{stamp}.{label}{suffix}"
        try:
            fs.link(path, dest)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if fs.exists(dest):
                continue
            fs.replace(path, dest)
            break
        fs.unlink(path)
        break
    else:  # pragma: no cover - a thousand quarantined files in one second
        raise FileExistsError(errno.EEXIST, "no free quarantine name", str(into))
    fs.fsync_dir(into)
    fs.fsync_dir(path.parent)
    return dest


def stale_temps(target: Path) -> list[Path]:
    """Temp files a crashed writer left beside *target* (and its ``.bak``)."""
    bak = target.with_name(target.name + ".bak")
    try:
        names = fs.listdir(target.parent)
    except FileNotFoundError:
        return []
    return sorted(target.parent / n for n in names if is_temp_of(n, target) or is_temp_of(n, bak))


def same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = fs.lstat(a), fs.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def file_mode(path: Path) -> int:
    return fs.lstat(path).st_mode & 0o777


__all__ = [
    "WriteFailed",
    "commit",
    "file_mode",
    "is_temp_of",
    "keep_previous",
    "move_aside",
    "same_file",
    "stale_temps",
    "temp_name",
    "write_file",
    "write_new_file",
    "write_temp",
]
