"""Changes whose outcome is unknown: remembered so that the next load can report them.

When posstate cannot prove that a change it reported as failed was undone on disk (a journal record was
written, its ``fdatasync`` failed and cutting it off failed too; a snapshot was renamed into place but the
directory fsync failed), the manager records what is in doubt here: best effort in a small marker file
beside the state file (``positions.json.unknown``, mode 0600, written like every other file), and always in
a registry of this process keyed by the resolved state path, so that a reopen in the same process reports
it even when the marker could not be written. The load that reports the change removes both once its own
state is durable (docs/JOURNAL.md, "Outcome unknown").

The marker holds sequence numbers, a journal id and generations only: no symbol, no value (it is not
encrypted).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from posstate.storage import atomic as _atomic
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

MARKER_SUFFIX = ".unknown"
_MAX_MARKER_BYTES = 64 * 1024

_registry: dict[str, list[dict[str, Any]]] = {}
_registry_lock = threading.Lock()


def marker_path(state_path: Path) -> Path:
    """The marker beside *state_path*, named from the whole file name (``positions.json.unknown``)."""
    return state_path.with_name(state_path.name + MARKER_SUFFIX)


def _key(state_path: Path) -> str:
    return str(Path(state_path).resolve(strict=False))


def journal_entry(*, journal_id: str | None, seq_lo: int, seq_hi: int, operation: str) -> dict[str, Any]:
    """Journal records *seq_lo* .. *seq_hi* of journal *journal_id* may be on disk although they failed."""
    return {
        "kind": "journal",
        "journal_id": journal_id,
        "seq_lo": seq_lo,
        "seq_hi": seq_hi,
        "operation": operation,
        "time_ms": int(time.time() * 1000),
    }


def snapshot_entry(*, generation: int, operation: str) -> dict[str, Any]:
    """A snapshot of *generation* may have replaced the state file although its save failed."""
    return {"kind": "snapshot", "generation": generation, "operation": operation, "time_ms": int(time.time() * 1000)}


def record(state_path: Path, entry: dict[str, Any]) -> bool:
    """Remember *entry* in this process, and durably in the marker file if the disk lets us.

    Returns True when the marker is durable (a restart will report the change), False when only this process
    knows. Never raises an OSError: it runs on a failure path, after the disk already failed once.
    """
    with _registry_lock:
        _registry.setdefault(_key(state_path), []).append(dict(entry))
    marker = marker_path(state_path)
    try:
        entries = [*_read_marker(marker), entry]
        _atomic.write_file(marker, orjson.dumps({"version": 1, "changes": entries}))
    except (OSError, _atomic.WriteFailed, ValueError) as exc:
        log.warning("%s: could not record the change whose outcome is unknown (%s)", marker, exc)
        return False
    return True


def _read_marker(marker: Path) -> list[dict[str, Any]]:
    try:
        data = fs.read_file(marker, _MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return []
    if len(data) > _MAX_MARKER_BYTES:
        raise ValueError("marker too large")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    changes = doc.get("changes") if isinstance(doc, dict) else None
    if not isinstance(changes, list):
        # Unreadable: still a sign that a change was in doubt; report it without details.
        return [{"kind": "unreadable", "operation": "unknown"}]
    return [_clean(c) for c in changes if isinstance(c, dict) and c.get("kind") in ("journal", "snapshot")]


_INT_FIELDS = {"journal": ("seq_lo", "seq_hi"), "snapshot": ("generation",)}
_MAX_INT = 2**63 - 1


def _clean(entry: dict[str, Any]) -> dict[str, Any]:
    """The marker is not authenticated: keep only the fields posstate writes, with the types it writes them
    in; an entry with a missing or malformed number is reported as unreadable (never a builtin error)."""
    kind = entry["kind"]
    out: dict[str, Any] = {"kind": kind}
    for name in _INT_FIELDS[kind]:
        value = entry.get(name)
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            return {"kind": "unreadable", "operation": "unknown (malformed marker entry)"}
        out[name] = value
    if kind == "journal":
        jid = entry.get("journal_id")
        out["journal_id"] = jid if isinstance(jid, str) and len(jid) <= 64 else None
    op = entry.get("operation")
    out["operation"] = op[:200] if isinstance(op, str) else "unknown"
    t = entry.get("time_ms")
    if type(t) is int and 0 <= t <= _MAX_INT:
        out["time_ms"] = t
    return out


def pending(state_path: Path) -> list[dict[str, Any]]:
    """Every change in doubt for *state_path*: the marker's and this process's, without duplicates."""
    out: list[dict[str, Any]] = []
    try:
        out += _read_marker(marker_path(state_path))
    except (OSError, ValueError) as exc:
        out.append({"kind": "unreadable", "operation": f"marker unreadable ({exc})"})
    with _registry_lock:
        out += [dict(e) for e in _registry.get(_key(state_path), ())]
    seen: set[bytes] = set()
    unique = []
    for e in out:
        ident = orjson.dumps(e, option=orjson.OPT_SORT_KEYS)
        if ident not in seen:
            seen.add(ident)
            unique.append(e)
    return unique


def clear(state_path: Path) -> None:
    """Forget every change in doubt for *state_path* (after a load reported them and its state is durable).

    Raises OSError if the marker cannot be removed durably; the registry is cleared only after it is.
    """
    marker = marker_path(state_path)
    try:
        fs.unlink(marker)
    except FileNotFoundError:
        pass
    else:
        fs.fsync_dir(marker.parent)
    with _registry_lock:
        _registry.pop(_key(state_path), None)


def forget_all() -> None:
    """Tests only: empty this process's registry."""
    with _registry_lock:
        _registry.clear()


__all__ = ["clear", "journal_entry", "marker_path", "pending", "record", "snapshot_entry"]
