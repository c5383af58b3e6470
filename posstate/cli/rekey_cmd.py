"""``posstate rekey``: re-encrypt the state file, its ``.bak`` and every timestamped backup under a new key.

Each file is decoded with the old key, encoded under the new one (same generation, time and document),
written to a temp file, read back and decrypted with the new key, and only then renamed over the old
file. A rename is atomic, so after an interruption every file is readable with one of the two keys, and
running rekey again finishes the job (files already under the new key are recognised and skipped).
The caller holds the writer lock. No click here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posstate.backup.ledger import verdicts_path
from posstate.core.config import StateConfig
from posstate.core.errors import CorruptStateError, PersistenceError, PosStateError, WrongKeyError
from posstate.journal.current import read_current
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

log = logging.getLogger("posstate")

Action = Literal["rekey", "already", "plain", "unreadable"]


@dataclass(frozen=True, slots=True)
class RekeyItem:
    path: Path
    action: Action
    detail: str = ""


def candidates(cfg: StateConfig) -> list[Path]:
    """The state file, its ``.bak`` and ``backups/positions_*.json``, those that exist."""
    found = [p for p in (cfg.state_path, cfg.bak_path) if fs.exists(p)]
    try:
        names = fs.listdir(cfg.backup_path)
    except OSError:
        names = []
    found += sorted(cfg.backup_path / n for n in names if n.startswith("positions_") and n.endswith(".json"))
    return found


def classify(path: Path, *, old: Keyring, new: Keyring, max_document_bytes: int) -> RekeyItem:
    """What rekey would do with *path* (reads and decrypts it; writes nothing)."""
    try:
        data = _statefile.read_bytes(path)
        header = _codec.inspect(data, path=path)
        if not header.encrypted:
            return RekeyItem(path, "plain", "not encrypted; left as it is")
        try:
            _codec.decode(data, keyring=old, path=path, max_document_bytes=max_document_bytes)
        except WrongKeyError as first:
            try:
                _codec.decode(data, keyring=new, path=path, max_document_bytes=max_document_bytes)
            except PosStateError:
                return RekeyItem(path, "unreadable", str(first))
            return RekeyItem(path, "already", "already under the new key")
    except PosStateError as exc:
        return RekeyItem(path, "unreadable", str(exc))
    return RekeyItem(path, "rekey", f"generation {header.generation}, key id {header.key_id}")


def rekey_file(path: Path, *, old: Keyring, new: Keyring, cfg: StateConfig) -> None:
    """Re-encrypt one file under *new*; the old file is replaced only by a verified copy."""
    data = _statefile.read_bytes(path)
    header, payload = _codec.decode(data, keyring=old, path=path, max_document_bytes=cfg.max_document_bytes)
    encoded = _codec.encode(
        payload,
        generation=header.generation,
        written_at_ms=header.written_at_ms,
        position_count=header.position_count,
        compression_level=cfg.compression_level if header.compressed else None,
        keyring=new,
        schema_version=header.schema_version,
    )
    try:
        tmp = _atomic.write_temp(path, encoded.data)
    except _atomic.WriteFailed as wf:
        raise PersistenceError(path, operation=f"rekey: {wf.step}", cause=wf.cause) from wf.cause
    try:
        _verify(tmp, encoded.data, payload, new=new, cfg=cfg, path=path)
        _atomic.commit(tmp, path)
    except _atomic.WriteFailed as wf:
        raise PersistenceError(path, operation=f"rekey: {wf.step}", cause=wf.cause) from wf.cause
    except BaseException:
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        raise


def _verify(tmp: Path, expected: bytes, payload: bytes, *, new: Keyring, cfg: StateConfig, path: Path) -> None:
    try:
        written = fs.read_file(tmp)
    except OSError as exc:
        raise PersistenceError(path, operation="rekey: read back", cause=exc) from exc
    if written != expected:
        raise PersistenceError(path, operation="rekey: verify", reason="the copy read back differs from what was written")
    try:
        _, again = _codec.decode(written, keyring=new, path=path, max_document_bytes=cfg.max_document_bytes)
    except (CorruptStateError, WrongKeyError) as exc:
        raise PersistenceError(path, operation="rekey: verify", reason=f"the new copy does not decrypt ({exc})") from exc
    if again != payload:
        raise PersistenceError(path, operation="rekey: verify", reason="the new copy holds a different document")


def run(
    items: list[RekeyItem],
    *,
    old: Keyring,
    new: Keyring,
    cfg: StateConfig,
    progress: Callable[[RekeyItem], None] = lambda item: None,
) -> int:
    """Rekey every item marked ``rekey``; returns how many files were rewritten. The backups' verdict file
    (posstate/backup/ledger.py) is tagged under the old key: it is removed (a cache: the next prune checks
    every backup once), so the first start under the new key does not report it as planted."""
    done = 0
    for item in items:
        if item.action == "rekey":
            rekey_file(item.path, old=old, new=new, cfg=cfg)
            done += 1
        progress(item)
    drop_verdicts(cfg)
    return done


def drop_verdicts(cfg: StateConfig) -> None:
    """Remove the verdict file tagged under the old key (a failure is logged: the bot then sets it aside)."""
    try:
        fs.unlink(verdicts_path(cfg))
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning(
            "%s: not removed after rekey (%s); the next prune sets it aside and checks every backup", verdicts_path(cfg), exc
        )


JournalAction = Literal["none", "fold", "set aside"]


def journal_action(cfg: StateConfig, *, old: Keyring) -> tuple[JournalAction, str]:
    """What rekey must do with the journal first (reads only). A journal stays under the old key, and a load
    with the new key refuses it, so: ``fold`` when it holds changes the snapshot lacks (a snapshot-mode save
    folds them in and removes it), ``set aside`` (to quarantine) when the snapshot already holds all of it.
    A damaged journal or one under another key raises its error: repair first."""
    options = _statefile.ReadOptions(keyring=old, max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
    if not fs.exists(journal_path(cfg, old)):
        return "none", ""
    cur = read_current(cfg, options)
    if cur.error is not None:
        raise cur.error
    if cur.applied:
        return "fold", f"{cur.applied} journal records not yet in the state file: saved into it first, then the journal removed"
    return "set aside", "journal already held by the state file: moved to quarantine (it stays under the old key)"


def journal_path(cfg: StateConfig, old: Keyring) -> Path:
    """The journal a load reads: ``cfg.journal_path``, or the old name (``positions.journal`` of 0.1.0) when
    the snapshot names that file's journal (it is under the old key too, so it is folded or set aside alike)."""
    from posstate.cli.journal_cmd import journal_read_path

    options = _statefile.ReadOptions(keyring=old, max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
    return journal_read_path(cfg, options)


def set_journal_aside(cfg: StateConfig, old: Keyring) -> Path:
    """Move the (verified redundant) journal to quarantine, never deleting it. The caller holds the lock."""
    path = journal_path(cfg, old)
    try:
        dest = _atomic.move_aside(path, cfg.quarantine_dir, label="rekeyed")
    except OSError as exc:
        raise PersistenceError(path, operation="rekey: quarantine journal", cause=exc) from exc
    return dest
