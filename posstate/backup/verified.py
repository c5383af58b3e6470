"""The verified-backup cache: a backup fully checked once is not decrypted again while it is unchanged.

Pruning needs every backup's full verdict (only a backup that decrypts and validates fills a retention
slot), and decrypting every backup on every prune costs seconds per backup at 100,000 positions. A manager
remembers, per backup file name, the verdict of its last full check together with what the file looked like
*before* that check read it: its keyless SHA-256 trailer, size, mtime, ctime and inode. A later prune trusts
the verdict only while all five still match (four syscalls per backup: open, fstat, pread of the trailer,
close); anything else, a rewrite, a bit flip that reset the mtime (the ctime moves), a file renamed over it
(the inode changes), is checked fully again.

The cache lives in memory, one per manager. With a key it also keeps its valid verdicts in the state's verdict
file, authenticated under the key (:mod:`posstate.backup.ledger`), so a restarted bot does not check every
backup again; nothing on disk without the key's tag can plant a verdict, and a verdict read from that file
counts as not checked in this process (below). Full verification always happens, cache or not, when a backup
is created, on ``backups verify``, and before a backup is used to restore, recover or repair (those paths read
and validate the file itself).

With ``compaction="process"`` the manager gives the cache a :class:`RemoteChecks` (posstate/manager/procheck.py):
the full checks a prune needs run in a worker process (``python -m posstate.backup.checkjob``), many files per
job, so the bot's process does only the keyless part (probe, header and SHA-256). Only a *valid* verdict is
taken from it, and only bound to the probe this process took before the job (the worker reports the probe it
saw before reading, and nothing for a file that changed while it read it); every other file is checked here
as before. A prune never removes a backup on a worker's say-so alone: the newest valid backup kept, the one
that makes the others redundant, is checked in this process first when its verdict came from a worker
(posstate/backup/prune.py). The same holds for a verdict read from the verdict file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from posstate.backup import backups as _backups
from posstate.backup.backups import BackupInfo
from posstate.core.errors import PersistenceError
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile


@dataclass(frozen=True, slots=True)
class Probe:
    """What a backup file looks like without reading its body: the identity a cached verdict is bound to."""

    trailer: bytes
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def probe(path: Path) -> Probe | None:
    """The trailer and metadata of *path*, from one descriptor (None: not a readable regular file)."""
    try:
        fd = fs.open_(path, fs.O_READ | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = fs.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < _format.TRAILER_SIZE:
            return None
        tail = fs.pread(fd, _format.TRAILER_SIZE, st.st_size - _format.TRAILER_SIZE)
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            fs.close(fd)
    return Probe(trailer=tail, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


class RemoteChecks(Protocol):
    """Full checks of backups in another process (posstate/manager/procheck.py)."""

    def check(
        self,
        files: list[tuple[str, Path, Probe]],
        options: _statefile.ReadOptions,
        *,
        stoppable: bool,
        answered: Callable[[dict[str, Probe]], None] | None = None,
    ) -> dict[str, Probe] | None:
        """The names of *files* found valid, each with the probe taken before it was read ({}: no worker could
        be started: check here). None when :meth:`stop` gave a *stoppable* check up. PersistenceError when
        a worker failed (died, garbage): nothing is decided from its job; *answered* was handed the valid
        verdicts of each job answered before it (they are remembered even so)."""

    def stop(self) -> None:
        """close(): end a running stoppable check at once (SIGKILL) and refuse new ones."""


class Ledger(Protocol):
    """Where the cache keeps its valid verdicts across restarts (posstate/backup/ledger.py)."""

    def load(self) -> dict[str, tuple[Probe, BackupInfo]]:
        """The verdicts kept ({}: none that can be trusted)."""

    def save(self, verdicts: dict[str, tuple[Probe, BackupInfo]]) -> bool:
        """Keep *verdicts* (their valid ones); a failure is logged, never raised (False: the next check tries again)."""


class VerifiedCache:
    """Full verdicts by backup file name, each bound to the :class:`Probe` taken before its check.

    Not thread-safe on its own: the backup service uses it under its directory lock."""

    __slots__ = (
        "_abandoned",
        "_by_worker",
        "_changed",
        "_entries",
        "_from_file",
        "_loaded",
        "_writing",
        "full_checks",
        "ledger",
        "pause",
        "remote",
        "stoppable",
        "worker_checks",
    )

    def __init__(
        self,
        pause: Callable[[], None] | None = None,
        *,
        remote: RemoteChecks | None = None,
        stoppable: Callable[[], bool] = lambda: False,
        ledger: Ledger | None = None,
    ) -> None:
        self._entries: dict[str, tuple[Probe, BackupInfo]] = {}
        #: The verdict file (None: memory only, as without a key); read at the first check, written after one
        #: whose verdicts changed.
        self.ledger = ledger
        self._loaded = False
        self._changed = False
        #: How many full checks (decrypt + validate) this cache has run: tests and benchmarks read it.
        self.full_checks = 0
        #: Set by the background backup thread (issue 14.3): its full checks run a slice of positions at a
        #: time and call this between slices (``backups.full_check``), so the bot's threads get the GIL.
        self.pause = pause
        #: Where prunes run their full checks: a worker process (issue 14), or None: in this process.
        self.remote = remote
        #: True on a thread whose checks close() may stop (the backup service's own prune).
        self.stoppable = stoppable
        self._by_worker: set[str] = set()
        #: Those of _by_worker read from the verdict file (the others are a worker process's).
        self._from_file: set[str] = set()
        #: How many of full_checks a worker process ran.
        self.worker_checks = 0
        #: Held while the verdict file is written; :meth:`abandon` takes it (close() left a prune running).
        self._writing = threading.Lock()
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        """True once close() left a prune using this cache running (the writer lock is released): it writes nothing."""
        return self._abandoned

    @contextlib.contextmanager
    def ours(self) -> Iterator[bool]:
        """One removal by a prune using this cache: True unless abandoned, decided under the lock :meth:`abandon`
        takes, so nothing is removed once close() let the writer lock go (a removal under way is waited for)."""
        with self._writing:
            yield not self._abandoned

    def abandon(self, timeout: float) -> None:
        """close() left a prune running and releases the writer lock: this cache never writes the verdict file
        again (the next bot's may already be there). Waits up to *timeout* for a write under way."""
        got = self._writing.acquire(timeout=max(timeout, 0.0))
        self._abandoned = True
        if got:
            self._writing.release()

    def remember(self, name: str, seen: Probe, info: BackupInfo, *, by_worker: bool = False) -> None:
        self._entries[name] = (seen, info)
        self._changed = True
        self._from_file.discard(name)
        if by_worker:
            self._by_worker.add(name)
        else:
            self._by_worker.discard(name)

    def stop_remote(self) -> None:
        """close(): a worker running a stoppable check is killed, and none is started for one again."""
        if self.remote is not None:
            self.remote.stop()

    def by_worker(self, name: str) -> bool:
        """True when the cached verdict of *name* was not made by a check here: a worker process's, or one read
        from the verdict file."""
        return name in self._by_worker

    def from_file(self, name: str) -> bool:
        """True when the cached verdict of *name* was read from the verdict file (not checked in this process)."""
        return name in self._from_file

    def distrust(self, *, worker: bool = True) -> None:
        """A verdict not made here was contradicted here: forget all of them (the verdict file's too, at the next
        :meth:`keep`); *worker*: it was a worker's, so check in this process from now on."""
        for name in self._by_worker:
            self._entries.pop(name, None)
        self._by_worker.clear()
        self._from_file.clear()
        if worker:
            self.remote = None
        self._changed = True

    def load_kept(self) -> None:
        """Once: start from the verdict file's verdicts (each still bound to its probe; never over one of ours)."""
        if self._loaded or self.ledger is None or self._abandoned:
            return
        kept = self.ledger.load()  # read only once it returned: one that raised is read again, never replaced unread
        self._loaded = True
        for name, entry in kept.items():
            if name not in self._entries:
                self._entries[name] = entry
                self._by_worker.add(name)
                self._from_file.add(name)

    def keep(self) -> None:
        """Write the verdicts to the verdict file if they changed since it was read or written (or its last
        write failed: retried at the next check even when nothing changed since). The file is read first if it
        was not yet: a file this manager never read is never replaced unread. Nothing after :meth:`abandon`."""
        if self.ledger is None or not self._changed:
            return
        with self._writing:
            if not self._abandoned:
                self.load_kept()
                self._changed = not self.ledger.save(dict(self._entries))

    def lookup(self, name: str, seen: Probe | None) -> BackupInfo | None:
        """The cached verdict for *name*, only if the file still looks exactly as when it was checked."""
        entry = self._entries.get(name)
        if entry is None or seen is None or entry[0] != seen:
            return None
        return entry[1]

    def before_check(self, path: Path) -> Callable[[BackupInfo], None]:
        """Probe *path* before a check of a backup just written reads it back; the function returned
        remembers that check's verdict, bound to what the probe saw (a later change is never trusted)."""
        seen = probe(path)

        def verified(info: BackupInfo) -> None:
            if seen is not None:
                self.remember(path.name, seen, info)

        return verified

    def forget(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._changed = True
        self._by_worker.discard(name)
        self._from_file.discard(name)

    def keep_only(self, names: set[str]) -> None:
        for gone in [n for n in self._entries if n not in names]:
            del self._entries[gone]
            self._changed = True
        self._by_worker &= names
        self._from_file &= names

    def __len__(self) -> int:
        return len(self._entries)


def check_all(backup_dir: Path, *, options: _statefile.ReadOptions, cache: VerifiedCache) -> list[BackupInfo]:
    """Every backup in *backup_dir*, newest first, each with its full verdict: from *cache* when the file is
    unchanged since it was checked, else read, decrypted and validated now (in a worker process when the
    cache has one: :class:`RemoteChecks`) and remembered."""
    try:
        names = fs.listdir(backup_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PersistenceError(backup_dir, operation="list backups", cause=exc) from exc
    cache.load_kept()
    out: list[BackupInfo] = []
    present: set[str] = set()
    pending: list[tuple[str, Probe | None, BackupInfo]] = []
    for name in names:
        parsed = _backups.parse_name(name)
        if parsed is None:
            continue
        present.add(name)
        path = backup_dir / name
        seen = probe(path)  # before the read: a change after it never gets the old verdict
        cached = cache.lookup(name, seen)
        if cached is not None:
            out.append(cached)
            continue
        pending.append((name, seen, _backups.inspect_file(path, parsed[0], parsed[1])))  # keyless: header, SHA-256
    try:
        _check_pending(pending, out, options=options, cache=cache)
    except BaseException:  # close() stopped the checks (ChecksStopped), a worker failed: keep what was checked
        cache.keep()
        raise
    cache.keep_only(present)
    cache.keep()
    out.sort(key=lambda b: b.sort_key, reverse=True)
    return out


def _check_pending(
    pending: list[tuple[str, Probe | None, BackupInfo]],
    out: list[BackupInfo],
    *,
    options: _statefile.ReadOptions,
    cache: VerifiedCache,
) -> None:
    """The full verdicts of *pending* (a worker's valid ones, else checked here), appended to *out*, remembered."""
    answered: dict[str, Probe] = {}
    try:
        found = _remote(pending, options=options, cache=cache, answered=answered.update)
    except BaseException:  # a failed job, close() stopping them: the jobs answered before are not checked again
        for name, seen, keyless in pending:
            if seen is not None and answered.get(name) == seen:
                _worker_verdict(cache, name, seen, keyless)
        raise
    local = []
    for name, seen, keyless in pending:  # every worker verdict first: a check here stopped later keeps them all
        if seen is not None and found.get(name) == seen:
            out.append(_worker_verdict(cache, name, seen, keyless))
        else:
            local.append((name, seen, keyless))
    for name, seen, keyless in local:
        if cache.pause is not None:  # before the read too: a background check given up stops here
            cache.pause()
        info, _ = _backups.full_check(keyless, options=options, pause=cache.pause)
        cache.full_checks += 1
        if seen is not None and not info.unreadable:
            cache.remember(name, seen, info)
        else:
            cache.forget(name)
        out.append(info)


def _worker_verdict(cache: VerifiedCache, name: str, seen: Probe, keyless: BackupInfo) -> BackupInfo:
    info = replace(keyless, valid=True, damaged=False, reason="")
    cache.full_checks += 1
    cache.worker_checks += 1
    cache.remember(name, seen, info, by_worker=True)
    return info


def _remote(
    pending: list[tuple[str, Probe | None, BackupInfo]],
    *,
    options: _statefile.ReadOptions,
    cache: VerifiedCache,
    answered: Callable[[dict[str, Probe]], None],
) -> dict[str, Probe]:
    """The worker's valid verdicts for the files whose keyless check holds ({} without a worker)."""
    todo = [(name, info.path, seen) for name, seen, info in pending if seen is not None and info.valid]
    if cache.remote is None or not todo:
        return {}
    if cache.pause is not None:
        cache.pause()  # close() already asked: no worker is started
    found = cache.remote.check(todo, options, stoppable=cache.stoppable(), answered=answered)
    if found is None:  # close() stopped it: the next pause raises ChecksStopped
        if cache.pause is not None:
            cache.pause()
        return {}
    return found
