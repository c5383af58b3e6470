"""``posstate watch``: follow the state directory with watchdog and describe each change. No click here.

The watchdog observer thread only queues paths; the caller's thread reads and validates the files, so
Ctrl-C lands in the caller. A file is reported when its bytes change (its trailer checksum differs from the
last one reported), so a save's rename, the ``.bak`` link and a backup each give one record; temp files and
the lock file are ignored. A writer is flagged as unexpected when another process holds the writer lock and
the file was just written (within ``RECENT_MS``) by a different pid or host: someone bypassed the lock. A
state file whose generation is below the highest seen is flagged ``generation-backwards`` (an older copy was
put in its place).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from posstate.cli.output import printable
from posstate.core.config import StateConfig
from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring
from posstate.storage.lock import is_locked, read_holder

#: A file whose header says it was written this recently is checked against the lock holder.
RECENT_MS = 60_000
_KINDS = {"created", "modified", "moved", "deleted", "closed"}


class _Queue(FileSystemEventHandler):
    def __init__(self, q: queue.Queue[tuple[str, str]]) -> None:
        self.q = q

    def on_any_event(self, event: FileSystemEvent) -> None:
        # A directory's events count too: a directory put at the state path is reported (issue 12.14);
        # the watcher's role filter drops every other path.
        if event.event_type not in _KINDS:
            return
        if event.event_type == "moved":
            self.q.put(("gone", str(event.src_path)))
            self.q.put(("changed", str(event.dest_path)))
        elif event.event_type == "deleted":
            self.q.put(("gone", str(event.src_path)))
        else:
            self.q.put(("changed", str(event.src_path)))


@dataclass
class Watcher:
    cfg: StateConfig
    keyring: Keyring | None
    #: A key was given and encryption is on: a plaintext state file or journal is a key problem.
    require_encryption: bool = False
    _seen: dict[Path, str | None] = field(default_factory=dict)
    #: The highest generation seen per state file: a lower one later means an older copy replaced it.
    _generations: dict[Path, int] = field(default_factory=dict)
    _q: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    _observer: Any = None

    def start(self) -> None:
        d = self.cfg.state_dir
        if not fs.exists(d):
            raise StateNotFoundError(d, what="state directory", next_step="check --state-dir or --config")
        if self.require_encryption:
            self._refuse_plaintext()
        for p in self._files():
            self._seen[p] = self._checksum(p)
        with contextlib.suppress(OSError, PosStateError):
            first = self._describe("", "state", self.cfg.state_path, fs.read_file(self.cfg.state_path))
            if first["status"] in _COUNTED:
                self._generations[self.cfg.state_path] = first["generation"]
        self._observer = Observer()
        self._observer.schedule(_Queue(self._q), str(d), recursive=True)
        if fs.exists(self.cfg.backup_path) and not _inside(self.cfg.backup_path, d):
            self._observer.schedule(_Queue(self._q), str(self.cfg.backup_path), recursive=False)
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def next_record(self, timeout: float) -> dict[str, Any] | None:
        """The next change worth a line, or None when *timeout* seconds pass without one."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                kind, raw = self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            path = Path(raw)
            role = self._role(path)
            if role is None:
                continue
            record = self._gone(path, role) if kind == "gone" else self._changed(path, role)
            if record is not None:
                return record

    # ---------------------------------------------------------------------------------------- internals
    def _refuse_plaintext(self) -> None:
        """WrongKeyError (exit 3) for a plaintext state file or journal: a load with this key refuses them,
        so watching them as if they were the bot's state would report forged files as valid."""
        from posstate.journal import format as jf

        state, journal = self.cfg.state_path, self.cfg.journal_path
        plain: list[tuple[Path, str]] = []
        with contextlib.suppress(OSError, PosStateError):  # absent or damaged: the records say so later
            header = _codec.inspect(fs.read_file(state), path=state)
            if not header.encrypted:
                plain.append((state, header.key_id))
        with contextlib.suppress(OSError, jf.JournalProblem):
            jheader = jf.parse_header(fs.read_file(journal))
            if not jheader.encrypted:
                plain.append((journal, jheader.key_id))
        if plain:
            raise WrongKeyError(plain[0][0], file_key_id=plain[0][1], our_key_id=None, downgrade=True)

    def _files(self) -> list[Path]:
        out = [p for p in (self.cfg.state_path, self.cfg.bak_path) if fs.exists(p)]
        for d in (self.cfg.backup_path, self.cfg.quarantine_dir):
            with contextlib.suppress(OSError):
                out += [d / n for n in fs.listdir(d)]
        return out

    def _role(self, path: Path) -> str | None:
        cfg = self.cfg
        name = path.name
        if name.startswith(".") or name.endswith(".tmp"):
            return None
        if path == cfg.state_path:
            return "state"
        if path == cfg.bak_path:
            return "bak"
        if path.parent == cfg.backup_path and name.startswith("positions_") and name.endswith(".json"):
            return "backup"
        if path.parent == cfg.quarantine_dir:
            return "quarantine"
        return None

    def _label(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cfg.state_dir))
        except ValueError:
            return str(path)

    @staticmethod
    def _checksum(path: Path) -> str | None:
        try:
            return _mark(fs.read_file(path))
        except OSError:
            return None

    def _gone(self, path: Path, role: str) -> dict[str, Any] | None:
        if fs.exists(path) or path not in self._seen:
            return None
        del self._seen[path]
        return _record(self._label(path), "deleted", role=role, status="deleted", detail="file removed or renamed away")

    def _changed(self, path: Path, role: str) -> dict[str, Any] | None:
        try:
            data = fs.read_file(path)
        except (fs.NotRegularFileError, fs.FileTooLargeError) as exc:
            if role == "quarantine":
                return None
            return self._unreadable(path, role, exc)  # a load refuses it: say so (issue 12.14)
        except OSError:
            return None  # gone again already; its removal is reported by its own event
        mark = _mark(data)
        if self._seen.get(path) == mark:
            return None
        self._seen[path] = mark
        label = self._label(path)
        if role == "quarantine":
            return _record(
                label, "quarantined", role=role, status="quarantined", detail="a file was set aside", flags=["quarantined"]
            )
        record = self._describe(label, role, path, data)
        gen = record.get("generation")
        if role == "state" and isinstance(gen, int) and record["status"] in _COUNTED:
            highest = self._generations.get(path)
            if highest is not None and gen < highest:
                record["flags"] = [*record["flags"], "generation-backwards"]
                record["detail"] += (
                    f"; generation went backwards from {highest} to {gen} (an older copy, such as the .bak or a "
                    "backup, replaced the state file: a bot would resume from stale positions)"
                )
            self._generations[path] = max(gen, highest or 0)
        return record

    def _unreadable(self, path: Path, role: str, exc: OSError) -> dict[str, Any] | None:
        """A FIFO, socket, device, directory or oversized file where a state file, .bak or backup belongs:
        never opened for reading (nothing blocks), reported once as damaged."""
        mark = f"unreadable: {exc.strerror}"
        if self._seen.get(path) == mark:
            return None
        self._seen[path] = mark
        detail = f"{exc.strerror}; a bot's load refuses it"
        return _record(self._label(path), "changed", role=role, status="damaged", detail=detail, flags=["damaged"])

    def _describe(self, label: str, role: str, path: Path, data: bytes) -> dict[str, Any]:
        try:
            header = _codec.inspect(data, path=path)
        except CorruptStateError as exc:
            return _record(label, "changed", role=role, status="damaged", detail=exc.reason, flags=["damaged"])
        except UnsupportedVersionError as exc:
            return _record(label, "changed", role=role, status="unsupported", detail=str(exc), flags=["unsupported"])
        base: dict[str, Any] = {"generation": header.generation, "positions": header.position_count}
        if header.encrypted and self.keyring is None:
            return _record(
                label, "changed", role=role, status="unchecked", detail="checksum ok; no key, contents not checked", **base
            )
        options = _statefile.ReadOptions(
            keyring=self.keyring,
            max_document_bytes=self.cfg.max_document_bytes,
            clock_skew=self.cfg.clock_skew,
            require_encryption=self.require_encryption,
        )
        try:
            loaded = _statefile.parse(data, path=path, options=options)
        except (WrongKeyError, MissingKeyError) as exc:
            return _record(label, "changed", role=role, status="wrong-key", detail=str(exc), flags=["key"], **base)
        except (CorruptStateError, SchemaValidationError) as exc:
            return _record(label, "changed", role=role, status="invalid", detail=str(exc), flags=["damaged"], **base)
        except PosStateError as exc:  # pragma: no cover - anything else the parser may add later
            return _record(label, "changed", role=role, status="invalid", detail=str(exc), flags=["damaged"], **base)
        writer = loaded.state.writer
        flags: list[str] = []
        detail = f"writer pid {writer.get('pid')} on {writer.get('host')}"
        lock_path = self.cfg.lock_path
        if role == "state" and abs(time.time() * 1000 - header.written_at_ms) <= RECENT_MS and is_locked(lock_path):
            pid, host = read_holder(lock_path)
            if pid is not None and (pid != writer.get("pid") or (host is not None and host != writer.get("host"))):
                flags.append("unexpected-writer")
                detail += f", but the writer lock is held by pid {pid} on {host}"
        return _record(
            label, "changed", role=role, status="valid", detail=detail, flags=flags, writer_pid=writer.get("pid"), **base
        )


#: The statuses whose generation counts towards the highest seen: an authenticated file, or any file when there
#: is no key to authenticate with. A header that fails authentication (anyone can write one) never raises the
#: count, or every later genuine save would be flagged as going backwards.
_COUNTED = ("valid", "unchecked")


def _mark(data: bytes) -> str:
    """What identifies a file's content (a flipped bit anywhere changes it, unlike the recorded trailer)."""
    return hashlib.sha256(data).hexdigest()


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _record(
    file: str, event: str, *, role: str, status: str, detail: str, flags: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file": file,
        "role": role,
        "event": event,
        "status": status,
        "generation": None,
        "positions": None,
        "flags": flags or [],
        "detail": detail,
    }
    out.update(extra)
    return out


def record_line(r: dict[str, Any]) -> str:
    """One line: time, file, generation, verdict, flags in capitals, detail."""
    gen = f"generation {r['generation']}" if r.get("generation") is not None else r["event"]
    flags = "".join(f" [{f.upper()}]" for f in r["flags"])
    return printable(f"{r['time']} {r['file']}: {gen}, {r['status']}{flags} ({r['detail']})")
