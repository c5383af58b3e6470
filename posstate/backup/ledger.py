"""The verdict file: the verified-backup cache kept across restarts, authenticated under the key (issue 14).

A prune needs every backup's full verdict. The :class:`~posstate.backup.verified.VerifiedCache` remembers
them in memory, so a bot that restarts checked every backup again at its first prune (at 100,000 positions
and 24 backups, 6.8 processor-seconds in the check worker while the bot's calls wait for a processor). With
a key, the cache also keeps its *valid* verdicts in ``positions.json.verdicts`` beside the state file, and
the next manager starts from them.

What makes that safe:

- **Authenticated.** The file ends with an HMAC-SHA256 over everything before it, under a key derived from
  the state's key (``HMAC(key, "posstate/verdict-key/v1")``: never the key itself, no nonce to repeat). With a
  passphrase that key is the one of the salt (and scrypt cost) the file names in its body: the keyring's write
  salt follows the last file it loaded, and a prune may run before any load (``posstate backups prune``), so
  the salt of the moment is not the file's. A named cost above the keyring's own, or a salt of the wrong size,
  is refused before any derivation (a planted file cannot make scrypt run at a cost of its choosing; at most
  one derivation at the keyring's own cost, on the backup thread). A file without the key's tag (planted,
  damaged, written under another key) is moved to quarantine and the prune checks every backup as before.
  Without a key there is no file (memory only).
- **Bound to the file, not to its name.** A verdict holds the backup's probe: its keyless SHA-256 trailer,
  size, mtime, ctime and inode. It is used only while all five still match, exactly as in memory. A backup
  rewritten, renamed over, restored from elsewhere or copied with its folder has a new inode or ctime and
  is checked again. A replayed older verdict file vouches only for backups that are still byte-identical
  in the metadata to what was checked.
- **Bound to its folder.** A file whose folder is not this configuration's backup folder is not used.
- **Never the only word for a removal.** Verdicts read from the file count as not checked in this process:
  a prune that removes backups first checks the newest valid one it keeps in process when its verdict came
  from here (:func:`posstate.backup.prune._confirm`), as for a worker's.
- **Only a cache.** A lost, stale or unreadable file costs checks, never a wrong decision: the file is
  written (temp, fsync, rename) after a prune whose verdicts changed; a write that fails is logged and the
  next prune tries again. A file found changed since this manager read or wrote it (someone else's) is
  moved to quarantine before it is replaced, never overwritten unread. "Ours" is decided by the bytes (a
  SHA-256 of what this manager last read verified, wrote, or tried to write), the metadata only as the
  shortcut: a write that failed half way (after its rename, at the directory fsync, at the stat after it)
  leaves a file that is still ours, never reported as planted. A file that cannot be moved to quarantine
  is left alone until it changes (not linked into quarantine again at every prune).

Full verification still happens when a backup is created, on ``backups verify``, and before a backup is used
to restore, recover or repair; those paths never read this file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from posstate.backup import backups as _backups
from posstate.backup.backups import BackupInfo
from posstate.backup.verified import Probe, VerifiedCache
from posstate.core.config import state_file_path
from posstate.storage import atomic as _atomic
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage.crypto import SALT_SIZE, Keyring, scrypt_cost_ok

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles
    from posstate.core.config import StateConfig

log = logging.getLogger("posstate")

MAGIC = b"posstate-verdicts/v1\n"
_LABEL = b"posstate/verdict-key/v1"
_TAG = 32
#: The largest verdict file read (about 300 bytes a backup: thousands of backups fit).
MAX_BYTES = 4 << 20
_INT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode")

Verdicts = dict[str, tuple[Probe, BackupInfo]]
_Identity = tuple[int, int, int]


def verdicts_path(cfg: StateConfig) -> Path:
    """The verdict file of *cfg*'s state file (``positions.json.verdicts``)."""
    return state_file_path(cfg.state_path, "verdicts")


def cache_for(files: StateFiles, *, pause: Callable[[], None], stoppable: Callable[[], bool]) -> VerifiedCache:
    """A manager's verified-backup cache: its checks in a worker when it has one, its verdicts kept in the verdict
    file when it has a key (memory only without one)."""
    keyring, cfg = files.write_keyring, files.config
    kept = None
    if keyring is not None:
        kept = VerdictFile(
            verdicts_path(cfg),
            folder=cfg.backup_path,
            keyring=keyring,
            quarantine_dir=cfg.quarantine_dir,
            emit=files.emit,
        )
    return VerifiedCache(pause=pause, remote=files.remote_checks(), stoppable=stoppable, ledger=kept)


class Untrusted(Exception):
    """The verdict file is not one this key wrote for this folder (the reason, no secret)."""


class VerdictFile:
    """Reads and writes one state file's verdict file (used under the backup folder lock)."""

    __slots__ = ("_emit", "_folder", "_keyring", "_mine", "_ours", "_salt", "_stuck", "path", "quarantine_dir")

    def __init__(
        self, path: Path, *, folder: Path, keyring: Keyring, quarantine_dir: Path, emit: Callable[[str, dict[str, Any]], None]
    ) -> None:
        self.path = path
        self.quarantine_dir = quarantine_dir
        self._folder = folder
        self._keyring = keyring
        self._emit = emit
        #: (inode, size, mtime_ns) of the file as this manager last read it verified or wrote it (None: none).
        self._ours: _Identity | None = None
        #: SHA-256 of the bytes this manager last read verified or wrote, and of a write that may have failed
        #: after its rename: a file holding one of them is ours whatever its metadata says.
        self._mine: tuple[bytes, ...] = ()
        #: The (salt, scrypt cost) of the trusted file read (a passphrase): later writes use it again.
        self._salt: tuple[bytes, int] | None = None
        #: The identity of a file that could not be moved to quarantine: left alone until it changes.
        self._stuck: _Identity | None = None

    def __repr__(self) -> str:
        return f"VerdictFile({str(self.path)!r})"

    def _mac_key(self, salt: bytes, log2_n: int) -> bytes:
        key = self._keyring.key_for(salt, log2_n)
        return hmac.new(key, _LABEL, hashlib.sha256).digest()

    def _write_salt(self) -> tuple[bytes, int]:
        """The salt and cost a new file is tagged under: the trusted file's (its key is derived), else the
        keyring's write salt (b"" and 0 for a raw key)."""
        if self._salt is not None:
            return self._salt
        _key, salt = self._keyring.write_material()
        return salt, self._keyring.log2_n if salt else 0

    def _salt_of(self, doc: Mapping[str, Any]) -> tuple[bytes, int]:
        """The salt and cost an unauthenticated body names, refused before any key derivation when this
        keyring never writes them (a raw key: none; a passphrase: SALT_SIZE bytes, a cost up to its own)."""
        salt_hex, log2_n = doc.get("salt"), doc.get("log2_n")
        if not isinstance(salt_hex, str) or type(log2_n) is not int:
            raise Untrusted("no salt and scrypt cost")
        try:
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            raise Untrusted("its salt is not hex") from None
        if not self._keyring.uses_passphrase:
            if salt or log2_n:
                raise Untrusted("it names a passphrase salt, and this key is not a passphrase")
        elif len(salt) != SALT_SIZE or not scrypt_cost_ok(log2_n) or log2_n > self._keyring.log2_n:
            raise Untrusted("it names a salt or scrypt cost this passphrase keyring never writes")
        return salt, log2_n

    def load(self) -> Verdicts:
        """The verdicts the file holds for this folder ({}: none, or not trusted and moved to quarantine)."""
        try:
            return self._load()
        except OSError:  # it could not be moved to quarantine (logged): not used, and never replaced
            return {}

    def _load(self) -> Verdicts:
        self._sweep_temps()
        st: os.stat_result | None = None
        try:
            st = fs.lstat(self.path)
            raw = fs.read_file(self.path, max_size=MAX_BYTES)
        except FileNotFoundError:
            return {}
        except OSError as exc:  # too large, not a regular file, an I/O error: every backup is checked again
            self._set_aside(f"cannot be read ({exc.strerror or exc})", st)
            return {}
        try:
            doc = self._open(raw)
        except Untrusted as exc:
            self._set_aside(str(exc), st)
            return {}
        self._ours, self._mine = _identity(st), (hashlib.sha256(raw).digest(),)
        if doc.get("folder") != str(self._folder):
            return {}  # written for another backup folder (the configuration changed): nothing to use
        try:
            return _entries(doc, self._folder)
        except (KeyError, TypeError, ValueError) as exc:  # authenticated, yet malformed: a bug, not an attack
            log.warning("%s: verdicts not used (%s)", self.path, exc)
            return {}

    def _open(self, raw: bytes) -> dict[str, Any]:
        if len(raw) < len(MAGIC) + _TAG or not raw.startswith(MAGIC):
            raise Untrusted("not a verdict file")
        body, tag = raw[:-_TAG], raw[-_TAG:]
        try:  # parsed before it is authenticated (orjson, at most MAX_BYTES): the tag's key needs its salt
            doc = orjson.loads(body[len(MAGIC) :])
        except orjson.JSONDecodeError:
            raise Untrusted("not a verdict file (its body is not JSON)") from None
        if not isinstance(doc, dict):
            raise Untrusted("not a verdict file (its body is not an object)")
        salt = self._salt_of(doc)
        if not hmac.compare_digest(hmac.new(self._mac_key(*salt), body, hashlib.sha256).digest(), tag):
            raise Untrusted("its tag does not match this key (planted, damaged, or written under another key)")
        if self._keyring.uses_passphrase:
            self._salt = salt
        return doc

    def save(self, verdicts: Verdicts) -> bool:
        """Write *verdicts* (valid ones) as the file; False when that failed (logged: the next prune tries again,
        changed or not)."""
        salt, log2_n = self._write_salt()
        doc: dict[str, Any] = {"salt": salt.hex(), "log2_n": log2_n, "folder": str(self._folder), "entries": []}
        room = MAX_BYTES - len(MAGIC) - len(orjson.dumps(doc)) - _TAG
        entries = []
        valid = sorted((info.sort_key, name) for name, (_seen, info) in verdicts.items() if info.valid)
        for _order, name in reversed(valid):  # newest first: more than a file may hold keeps the newest
            entry = _entry(name, *verdicts[name])
            room -= len(orjson.dumps(entry)) + 1
            if room < 0:  # read back, a larger file would be refused (the rest are checked at the next start)
                break
            entries.append(entry)
        doc["entries"] = entries
        body = MAGIC + orjson.dumps(doc)
        data = body + hmac.new(self._mac_key(salt, log2_n), body, hashlib.sha256).digest()
        digest = hashlib.sha256(data).digest()
        try:
            self._unless_ours()
        except OSError as exc:
            log.warning("%s: backup verdicts not written (%s); the next prune tries again", self.path, exc)
            return False
        # From here the file may become these bytes even when a step fails (after the rename): still ours.
        self._mine = (*self._mine[-1:], digest)
        try:
            _atomic.write_file(self.path, data)
        except (OSError, _atomic.WriteFailed) as exc:
            log.warning("%s: backup verdicts not written (%s); the next prune tries again", self.path, exc)
            return False
        self._mine = (digest,)
        try:
            self._ours = _identity(fs.lstat(self.path))
        except OSError:
            self._ours = None  # the next save reads the file to know it is ours
        return True

    def _unless_ours(self) -> None:
        """A file there that this manager did not read verified or write is set aside before it is replaced
        (OSError: it could not be told or moved; nothing is written)."""
        try:
            st = fs.lstat(self.path)
        except FileNotFoundError:
            return
        if _identity(st) == self._ours:
            return
        if _identity(st) == self._stuck:
            raise OSError(errno.EEXIST, "a file there could not be moved to quarantine", str(self.path))
        if self._mine and stat.S_ISREG(st.st_mode) and st.st_size <= MAX_BYTES:
            try:
                raw = fs.read_file(self.path, max_size=MAX_BYTES)
            except FileNotFoundError:
                return
            if hashlib.sha256(raw).digest() in self._mine:
                return  # ours (a write that failed after its rename, or a stat that failed after it)
        self._set_aside("changed since this manager read or wrote it", st)

    def _set_aside(self, why: str, st: os.stat_result | None) -> None:
        """Move the file to quarantine (OSError when that fails: it stays, unused, and is never replaced; a
        file whose move failed is not tried again until it changes)."""
        try:
            dest = _atomic.move_aside(self.path, self.quarantine_dir, label="untrusted-verdicts")
        except FileNotFoundError:
            return
        except OSError as exc:
            self._stuck = _identity(st) if st is not None else None
            log.warning("%s: backup verdicts not used (%s); it could not be moved to quarantine: %s", self.path, why, exc)
            raise
        log.warning("%s: backup verdicts not used (%s); moved to %s, every backup is checked again", self.path, why, dest)
        self._emit("error", {"context": "backup verdicts", "error": f"{self.path}: {why}; moved to {dest}"})

    def _sweep_temps(self) -> None:
        """Temps of this file a killed writer left: a cache's temp is never renamed after its writer died."""
        try:
            names = fs.listdir(self.path.parent)
        except OSError:
            return
        for name in names:
            if _atomic.is_temp_of(name, self.path):
                with contextlib.suppress(OSError):
                    fs.unlink(self.path.parent / name)


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _entry(name: str, seen: Probe, info: BackupInfo) -> dict[str, Any]:
    return {
        "name": name,
        "trailer": seen.trailer.hex(),
        "size": seen.size,
        "mtime_ns": seen.mtime_ns,
        "ctime_ns": seen.ctime_ns,
        "inode": seen.inode,
        "generation": info.generation,
        "positions": info.position_count,
        "key_id": info.key_id,
        "written_at": info.written_at.isoformat() if info.written_at is not None else None,
    }


def _entries(doc: Mapping[str, Any], folder: Path) -> Verdicts:
    out: Verdicts = {}
    for e in doc["entries"]:
        name = e["name"]
        parsed = _backups.parse_name(name) if isinstance(name, str) else None
        if parsed is None or os.sep in name:
            raise ValueError(f"not a backup name: {name!r}")
        ints = [e[k] for k in _INT_FIELDS]
        if not all(type(v) is int and v >= 0 for v in ints):
            raise ValueError(f"{name}: bad probe")
        trailer = bytes.fromhex(e["trailer"])
        if len(trailer) != _format.TRAILER_SIZE:
            raise ValueError(f"{name}: bad trailer")
        for k in ("generation", "positions"):
            if e[k] is not None and (type(e[k]) is not int or e[k] < 0):
                raise ValueError(f"{name}: bad {k}")
        written = datetime.fromisoformat(e["written_at"]) if e["written_at"] is not None else None
        seen = Probe(trailer=trailer, size=ints[0], mtime_ns=ints[1], ctime_ns=ints[2], inode=ints[3])
        info = BackupInfo(
            id=parsed[0],
            path=folder / name,
            created_at=parsed[1],
            generation=e["generation"],
            size=ints[0],
            position_count=e["positions"],
            key_id=e["key_id"] if isinstance(e["key_id"], str) else None,
            valid=True,
            written_at=written,
        )
        out[name] = (seen, info)
    return out
