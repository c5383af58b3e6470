"""The file client: a replica on a mounted disk (``file:///mnt/other-disk/prefix``), through fileops.

Each object is one file under the prefix directory, written as posstate writes every file (temp, fsync,
rename, directory fsync), so a half-written object is only ever a temp (never listed) and read back after
the rename to check it. Conditional writes (the lease) hold an exclusive ``flock`` on a lock file beside the
object around read-compare-replace (released by the kernel when its holder dies: no clock decides it is
gone); the version tag is the SHA-256 of the content.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from posstate.core.errors import ReplicaError
from posstate.replica import client as _client
from posstate.replica.client import ObjectInfo, ObjectMissing, PreconditionFailed
from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

_Objects = list[ObjectInfo]


class FileClient:
    """A :class:`~posstate.replica.client.ReplicaClient` for ``file:///path``."""

    LOCK_WAIT = 10.0  # seconds a conditional write waits for another one on the same object

    def __init__(self, url: str) -> None:
        self._url = url
        self._root = Path(url[len("file://") :])

    @property
    def url(self) -> str:
        return self._url

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ReplicaError(self._url, "invalid object name", key=key)
        # A folder below the root replaced by a symlink (someone with write access to the replica disk) must
        # not make posstate write or delete objects elsewhere.
        folder = self._root
        for part in parts[:-1]:
            folder = folder / part
            try:
                mode = fs.lstat(folder).st_mode
            except FileNotFoundError:
                break
            except OSError as exc:
                raise ReplicaError(self._url, f"cannot inspect {part}/ ({exc})", key=key) from exc
            if stat.S_ISLNK(mode):
                raise ReplicaError(self._url, f"{part}/ is a symbolic link, not a folder of the replica", key=key)
        return self._root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            fs.ensure_dir(path.parent)
            _atomic.write_file(path, data)
            back = fs.read_file(path)
        except (OSError, _atomic.WriteFailed) as exc:
            raise ReplicaError(self._url, f"upload failed ({exc})", key=key) from exc
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise ReplicaError(self._url, "upload read back differs from what was written", key=key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return fs.read_file(path, max_size=_client.MAX_OBJECT_BYTES)
        except FileNotFoundError:
            raise ObjectMissing(self._url, "download: no such object", key=key) from None
        except OSError as exc:
            raise ReplicaError(self._url, f"download failed ({exc})", key=key) from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: _Objects = []
        try:
            if not fs.exists(self._root):
                return []
            self._walk(self._root, "", prefix, out)
        except ReplicaError:
            raise
        except OSError as exc:
            raise ReplicaError(self._url, f"list failed ({exc})") from exc
        return sorted(out, key=lambda o: o.key)

    def _walk(self, folder: Path, rel: str, prefix: str, out: _Objects) -> None:
        for name in fs.listdir(folder):
            if name.startswith("."):  # temps (.<name>.<hex>.tmp) and mutexes are never objects
                continue
            key = f"{rel}{name}"
            st = fs.lstat(folder / name)
            if stat.S_ISDIR(st.st_mode):
                if prefix.startswith(key + "/") or key.startswith(prefix) or not prefix:
                    self._walk(folder / name, key + "/", prefix, out)
            elif key.startswith(prefix):
                out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)))
                if len(out) > _client.MAX_LISTED:
                    raise ReplicaError(
                        self._url,
                        f"list: more than {_client.MAX_LISTED} objects (not all posstate's)",
                        next_step="remove the files posstate did not write (`posstate replica verify` names them)",
                    )

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                fs.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ReplicaError(self._url, f"delete failed ({exc})", key=key) from exc

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.get(key)
        except ObjectMissing:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> str:
        path = self._path(key)
        try:
            fs.ensure_dir(path.parent)
            fd = self._lock(path.with_name(f".{path.name}.lock"))
        except OSError as exc:
            raise ReplicaError(self._url, f"conditional write failed ({exc})", key=key) from exc
        try:
            found = self.get_versioned(key)
            if (found is None) != (etag is None) or (found is not None and found[1] != etag):
                raise PreconditionFailed(self._url, "conditional write: the object changed", key=key)
            try:
                _atomic.write_file(path, data)
            except (OSError, _atomic.WriteFailed) as exc:
                raise ReplicaError(self._url, f"conditional write failed ({exc})", key=key) from exc
            return hashlib.sha256(data).hexdigest()
        finally:
            with contextlib.suppress(OSError):
                fs.close(fd)  # releases the flock

    def _lock(self, lock_path: Path) -> int:
        """An exclusive ``flock`` on the lock file beside the object, waited for at most :attr:`LOCK_WAIT` s.
        The kernel (or the NFS lock manager) drops it when its holder dies, so no clock decides that a
        holder is gone: one paused inside its read-compare-write keeps the others out (they fail, retry)."""
        fd = fs.open_(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fs.close(fd)
                    raise
                time.sleep(0.01)
            except OSError:
                fs.close(fd)
                raise
