"""PositionStateManager: the in-memory state, its one writer lock, and the durable save/load path."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posstate import _atomic, _document, _fileops as fs, _format, _statefile
from posstate._config import StateConfig
from posstate._crypto import Keyring
from posstate._document import StateData
from posstate._errors import (
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
)
from posstate._events import EventBus, Handler, StatsLogger
from posstate._lock import WriterLock
from posstate._model import Position, PositionKey, Side
from posstate._validate import ValidationIssue, ValidationReport, validate_file

log = logging.getLogger("posstate")

PositionsInput = Iterable[Position] | Mapping[Any, Position]


class PositionStateManager:
    """Crash-safe, encrypted, backed-up position state for one bot.

    Creating a manager takes the state directory's writer lock (a second writer gets
    :class:`~posstate.StateLockedError`) and sets aside temp files a crash left behind. The state is read on
    first use. Every save is atomic and durable when it returns; a failed save leaves the previous file
    intact and the in-memory state unchanged. All methods are thread-safe.
    """

    def __init__(
        self,
        config: StateConfig | None = None,
        *,
        key: bytes | None = None,
        passphrase: str | None = None,
        stats_logger: StatsLogger | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else StateConfig()
        self._path = cfg.state_path
        keyring = Keyring.resolve(key=key, passphrase=passphrase)
        if cfg.encryption and keyring is None:
            raise MissingKeyError(self._path)
        self._keyring = keyring
        self._write_keyring = keyring if cfg.encryption else None
        self._read = _statefile.ReadOptions(keyring=keyring, max_document_bytes=cfg.max_document_bytes, clock_skew=cfg.clock_skew)
        self._events = EventBus(stats_logger)
        self._lock = threading.RLock()
        self._closed = False
        self._state = StateData()
        self._entries: dict[PositionKey, dict[str, Any]] = {}
        self._loaded = False
        self._dirty = False
        # Trailer checksums the main file may legitimately have (None: no file). Anything else on disk at
        # save time was written by someone who bypassed the lock.
        self._expected_on_disk: set[str | None] = set()
        self._highest_generation = 0
        try:
            fs.ensure_dir(cfg.state_dir)
        except OSError as exc:
            raise PersistenceError(cfg.state_dir, operation="create state directory", cause=exc) from exc
        self._writer_lock = WriterLock(cfg.lock_path, state_path=self._path, timeout=cfg.lock_timeout)
        try:
            self._sweep_temps()
        except BaseException:
            self._writer_lock.release()
            raise

    # ------------------------------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        key = self._keyring.key_id if self._keyring is not None else "none"
        return f"PositionStateManager(path={str(self._path)!r}, generation={self._state.generation}, key_id={key}, closed={self._closed})"

    def __enter__(self) -> PositionStateManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def generation(self) -> int:
        """Generation of the state in memory (the last one loaded or saved)."""
        return self._state.generation

    @property
    def dirty(self) -> bool:
        """True when the in-memory state has changes not yet saved."""
        return self._dirty

    @property
    def closed(self) -> bool:
        return self._closed

    def on(self, event: str, handler: Handler) -> None:
        self._events.on(event, handler)

    def off(self, event: str, handler: Handler | None = None) -> None:
        self._events.off(event, handler)

    def close(self) -> None:
        """Release the writer lock. Unsaved changes are not written (call :meth:`save` first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._on_close()
            self._writer_lock.release()

    def _on_close(self) -> None:
        """Hook for subclasses and mixins (background validation, journal) to stop their work."""

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(self._path)

    # ------------------------------------------------------------------------------------------ reading
    def load_positions(self) -> dict[PositionKey, Position]:
        """Read the state file (fully validated) into memory and return its positions.

        A missing file with no ``.bak`` and no backups is a fresh start; a missing file while either exists
        raises :class:`~posstate.CorruptStateError`, never an empty state.
        """
        with self._lock:
            self._check_open()
            loaded = self._load_main()
            return dict(loaded.positions)

    def _load_main(self) -> StateData:
        started = time.perf_counter()
        try:
            if not fs.exists(self._path):
                state = self._fresh_or_missing()
                self._adopt(state, None)
                self._events.emit("stateLoaded", {"path": str(self._path), "generation": 0, "positions": 0, "source": "fresh"})
                return state
            loaded = _statefile.read(self._path, options=self._read)
        except CorruptStateError as exc:
            self._events.emit("stateCorrupted", {"path": str(self._path), "reason": exc.reason, "kind": exc.kind})
            raise
        except SchemaValidationError as exc:
            self._events.emit("validationError", {"path": str(self._path), "json_path": exc.json_path, "rule": exc.rule, "reason": exc.detail})
            self._events.emit("stateCorrupted", {"path": str(self._path), "reason": str(exc), "kind": "invalid"})
            raise
        except PersistenceError as exc:
            self._events.emit("persistenceError", {"path": str(self._path), "operation": exc.operation, "reason": str(exc)})
            raise
        self._check_account(loaded.state)
        self._adopt(loaded.state, loaded.checksum)
        self._events.emit(
            "stateLoaded",
            {
                "path": str(self._path),
                "generation": loaded.state.generation,
                "positions": len(loaded.state.positions),
                "source": "file",
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return loaded.state

    def _fresh_or_missing(self) -> StateData:
        others = [p for p in (self.config.bak_path,) if fs.exists(p)] + self._backup_files()
        if others:
            raise CorruptStateError(
                self._path,
                f"state file is missing but {others[0].name} exists (the file was lost, not never written)",
                kind="missing",
            )
        state = StateData()
        if self.config.exchange is not None:
            state.account = {"exchange": self.config.exchange, "account_id": str(self.config.account_id), "mode": self.config.account_mode or "live"}
        return state

    def _backup_files(self) -> list[Path]:
        """Timestamped backups on disk (names only; the backups module reads them)."""
        try:
            names = fs.listdir(self.config.backup_path)
        except OSError:
            return []
        return sorted(self.config.backup_path / n for n in names if n.startswith("positions_") and n.endswith(".json"))

    def _check_account(self, state: StateData) -> None:
        cfg = self.config
        if cfg.exchange is None or state.account is None:
            return
        if state.account.get("exchange") != cfg.exchange or state.account.get("account_id") != cfg.account_id:
            raise CorruptStateError(
                self._path,
                f"state belongs to account {state.account.get('account_id')!r} on {state.account.get('exchange')!r}, "
                f"but this manager is configured for {cfg.account_id!r} on {cfg.exchange!r}",
                next_step="check state_file / --state-dir: this is another account's state",
                kind="invalid",
            )

    def _adopt(self, state: StateData, checksum: str | None) -> None:
        self._state = state
        self._entries = {k: _document.position_entry(p, state.position_revs.get(k, 0)) for k, p in state.positions.items()}
        self._expected_on_disk = {checksum}
        self._highest_generation = max(self._highest_generation, state.generation)
        self._loaded = True
        self._dirty = False

    def _ensure_loaded(self) -> None:
        self._check_open()
        if not self._loaded:
            self._load_main()

    # ------------------------------------------------------------------------------------------ in memory
    def get_position(self, symbol: str, side: Side) -> Position | None:
        with self._lock:
            self._ensure_loaded()
            return self._state.positions.get((symbol, side))

    def get_positions(self) -> dict[PositionKey, Position]:
        with self._lock:
            self._ensure_loaded()
            return dict(self._state.positions)

    def set_position(self, position: Position) -> None:
        """Add or replace the position with this (symbol, side); durable at the next save."""
        if not isinstance(position, Position):
            raise SchemaValidationError(None, "$", "type", f"expected a Position, got {type(position).__name__}")
        with self._lock:
            self._ensure_loaded()
            self._apply_position(self._state, self._entries, position)
            self._dirty = True

    def delete_position(self, symbol: str, side: Side) -> bool:
        """Remove a position (its symbol's metadata stays). Returns False if there was none."""
        with self._lock:
            self._ensure_loaded()
            removed = self._remove_position(self._state, self._entries, (symbol, side))
            self._dirty = self._dirty or removed
            return removed

    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> None:
        """Replace the bot's own data for *symbol* (a JSON-able dict; a private copy is kept)."""
        clean = _document.clean_metadata(symbol, data)
        with self._lock:
            self._ensure_loaded()
            st = self._state
            st.metadata[symbol] = clean
            st.metadata_revs[symbol] = self._next_rev()
            st.metadata_tombstones.pop(symbol, None)
            self._dirty = True

    def get_symbol_metadata(self, symbol: str) -> dict[str, Any] | None:
        """A copy of *symbol*'s metadata (editing it changes nothing until you set it), or None."""
        with self._lock:
            self._ensure_loaded()
            found = self._state.metadata.get(symbol)
            return _document.copy_json(found) if found is not None else None

    def get_all_symbol_metadata(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._ensure_loaded()
            return {s: _document.copy_json(d) for s, d in self._state.metadata.items()}

    def delete_symbol_metadata(self, symbol: str) -> bool:
        with self._lock:
            self._ensure_loaded()
            st = self._state
            if symbol not in st.metadata:
                return False
            del st.metadata[symbol]
            st.metadata_revs.pop(symbol, None)
            st.metadata_tombstones[symbol] = self._next_rev()
            self._dirty = True
            return True

    def _next_rev(self) -> int:
        return max(self._state.generation, self._highest_generation) + 1

    def _apply_position(self, st: StateData, entries: dict[PositionKey, dict[str, Any]], position: Position) -> None:
        key = position.key
        if st.positions.get(key) == position and key in entries:
            return
        rev = self._next_rev()
        st.positions[key] = position
        st.position_revs[key] = rev
        st.position_tombstones.pop(key, None)
        entries[key] = _document.position_entry(position, rev)

    def _remove_position(self, st: StateData, entries: dict[PositionKey, dict[str, Any]], key: PositionKey) -> bool:
        if key not in st.positions:
            return False
        del st.positions[key]
        st.position_revs.pop(key, None)
        entries.pop(key, None)
        st.position_tombstones[key] = self._next_rev()
        return True

    # ------------------------------------------------------------------------------------------ saving
    def save_positions(self, positions: PositionsInput) -> int:
        """Replace all positions with *positions* and save; returns the new generation.

        Metadata is kept. If the save fails, nothing changes in memory or on disk.
        """
        wanted = _normalize(positions)
        with self._lock:
            self._ensure_loaded()
            st = self._state.copy()
            entries = dict(self._entries)
            for key in [k for k in st.positions if k not in wanted]:
                self._remove_position(st, entries, key)
            for p in wanted.values():
                self._apply_position(st, entries, p)
            return self._commit(st, entries)

    def save(self) -> int:
        """Write the in-memory state durably; returns the new generation."""
        with self._lock:
            self._ensure_loaded()
            return self._commit(self._state.copy(), dict(self._entries))

    async def asave_positions(self, positions: PositionsInput) -> int:
        return await asyncio.to_thread(self.save_positions, positions)

    async def aload_positions(self) -> dict[PositionKey, Position]:
        return await asyncio.to_thread(self.load_positions)

    async def asave(self) -> int:
        return await asyncio.to_thread(self.save)

    def _commit(self, st: StateData, entries: dict[PositionKey, dict[str, Any]]) -> int:
        """Write *st* as the next generation; adopt it in memory only once it is durable."""
        started = time.perf_counter()
        generation = max(st.generation, self._highest_generation) + 1
        st.generation = generation
        st, encoded = _statefile.encode(st, keyring=self._write_keyring, compression_level=self.config.compression_level if self.config.compression else None, entries=entries)
        self._highest_generation = generation
        self._write_main(encoded)
        self._state = st
        self._entries = entries
        self._expected_on_disk = {encoded.checksum}
        self._dirty = False
        self._events.emit(
            "stateSaved",
            {
                "path": str(self._path),
                "generation": generation,
                "positions": len(st.positions),
                "bytes": len(encoded.data),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        self._after_save(st)
        return generation

    def _after_save(self, state: StateData) -> None:
        """Hook run after every successful save (timed backups live here)."""

    def _write_main(self, encoded: Any) -> None:
        path = self._path
        try:
            tmp = _atomic.write_temp(path, encoded.data)
            try:
                self._prepare_replace()
            except BaseException:
                _atomic_quiet_unlink(tmp)
                raise
            _atomic.commit(tmp, path)
            if self.config.verify_after_write:
                try:
                    self._verify_written(encoded)
                except OSError:
                    # The new file is in place even though reading it back failed: the next save must
                    # accept it as ours, not report a concurrent modification.
                    self._expected_on_disk.add(encoded.checksum)
                    raise
        except _atomic.WriteFailed as wf:
            if wf.renamed:
                self._expected_on_disk.add(encoded.checksum)
            raise self._persistence_failed(wf.step, wf.cause) from wf.cause
        except OSError as exc:
            raise self._persistence_failed("save", exc) from exc

    def _persistence_failed(self, step: str, cause: OSError) -> PersistenceError:
        err = PersistenceError(self._path, operation=step, cause=cause)
        self._events.emit("persistenceError", {"path": str(self._path), "operation": step, "errno": cause.errno, "reason": str(err)})
        return err

    def _prepare_replace(self) -> None:
        """Check the file on disk is the one we expect, then keep it as ``.bak`` (or quarantine it if damaged)."""
        path = self._path
        try:
            data = fs.read_file(path)
        except FileNotFoundError:
            if None not in self._expected_on_disk:
                raise ConcurrentModificationError(path, expected=self._state.generation, found=None, reason="the state file disappeared since it was loaded") from None
            return
        recorded = _format.checksum_of(data)
        intact = recorded is not None and _format.hashlib.sha256(data[: -_format.TRAILER_SIZE]).hexdigest() == recorded
        if intact and recorded in self._expected_on_disk:
            _atomic.keep_previous(path, self.config.bak_path)
            return
        if intact:
            found: int | None
            try:
                found = _format.parse_header(data).generation
            except _format.FormatProblem:
                found = None
            raise ConcurrentModificationError(path, expected=self._state.generation, found=found)
        # The file we are about to replace is damaged on disk: keep the good .bak, set the damaged one aside.
        dest = _atomic.move_aside(path, self.config.quarantine_dir, label="damaged")
        self._events.emit("stateCorrupted", {"path": str(path), "reason": "damaged on disk before save", "quarantined": str(dest)})

    def _verify_written(self, encoded: Any) -> None:
        data = fs.read_file(self._path)
        if data != encoded.data:
            raise OSError(5, "file read back differs from what was written")
        try:
            _statefile._codec.decode(data, keyring=self._keyring, path=self._path, max_document_bytes=self.config.max_document_bytes)
        except PosStateError as exc:
            raise OSError(5, f"file read back does not decode ({exc})") from exc

    # ------------------------------------------------------------------------------------------ startup
    def _sweep_temps(self) -> None:
        """Set aside temp files a crashed writer left (we hold the lock, so none is in use)."""
        for tmp in _atomic.stale_temps(self._path):
            try:
                st = fs.lstat(tmp)
                if st.st_size == 0 or _atomic.same_file(tmp, self._path) or _atomic.same_file(tmp, self.config.bak_path):
                    fs.unlink(tmp)  # empty, or a second name of a file that is still there: redundant
                    log.info("removed leftover temp file %s", tmp)
                else:
                    dest = _atomic.move_aside(tmp, self.config.quarantine_dir, label="leftover")
                    log.info("moved leftover temp file %s to %s", tmp, dest)
            except OSError as exc:
                raise PersistenceError(tmp, operation="clean up leftover temp file", cause=exc) from exc

    # ------------------------------------------------------------------------------------------ validation
    def validate_state(self, positions: PositionsInput | None = None) -> ValidationReport:
        """Validate *positions*, or (by default) the state file on disk, fully; emits stateValidated or
        validationError. Never writes."""
        if positions is not None:
            try:
                _normalize(positions)
            except SchemaValidationError as exc:
                return ValidationReport(path="<positions>", valid=False, contents_checked=True, checks=(), errors=(ValidationIssue(exc.json_path, exc.detail, exc.rule),), error=exc)
            return ValidationReport(path="<positions>", valid=True, contents_checked=True, checks=())
        report = validate_file(self._path, options=self._read)
        if report.valid:
            self._events.emit("stateValidated", {"path": str(self._path), "generation": report.generation, "positions": report.positions})
        else:
            first = report.errors[0] if report.errors else ValidationIssue("$", "contents not checked")
            self._events.emit("validationError", {"path": str(self._path), "json_path": first.path, "reason": first.message})
        return report


def _atomic_quiet_unlink(path: Path) -> None:
    try:
        fs.unlink(path)
    except OSError:
        pass


def _normalize(positions: PositionsInput) -> dict[PositionKey, Position]:
    values = positions.values() if isinstance(positions, Mapping) else positions
    out: dict[PositionKey, Position] = {}
    for p in values:
        if not isinstance(p, Position):
            raise SchemaValidationError(None, "$", "type", f"expected Position values, got {type(p).__name__}")
        if p.key in out:
            raise SchemaValidationError(None, f"$[{p.symbol}|{p.side}]", "unique", f"two positions for {p.symbol} {p.side}")
        out[p.key] = p
    return out
