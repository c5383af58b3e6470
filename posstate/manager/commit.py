"""The durable commit path: every save writes the whole state as the next generation, atomically, and adopts
it in memory only once it is durable.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from posstate.core.errors import (
    ConcurrentModificationError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
)
from posstate.manager.loading import StateLoading
from posstate.model.document import Entries, StateData
from posstate.model.position import Position, PositionKey, check_key
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import container as _format
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage import unknown as _unknown

log = logging.getLogger("posstate")

PositionsInput = Iterable[Position] | Mapping[Any, Position]


class DurableCommit(StateLoading):
    """Saves (whole, batch, async) and the one commit every write goes through."""

    def _next_rev(self) -> int:
        return max(self._state.generation, self._highest_generation) + 1

    def _apply_position(self, st: StateData, entries: Entries, position: Position) -> None:
        key = position.key
        if st.positions.get(key) == position:
            return
        rev = self._next_rev()
        st.positions[key] = position
        st.position_revs[key] = rev
        st.position_tombstones.pop(key, None)
        entries.pop(key, None)

    def _remove_position(self, st: StateData, entries: Entries, key: PositionKey) -> bool:
        if key not in st.positions:
            return False
        del st.positions[key]
        st.position_revs.pop(key, None)
        entries.pop(key, None)
        st.position_tombstones[key] = self._next_rev()
        return True

    def save_positions(self, positions: PositionsInput) -> int:
        """Replace all positions with *positions* and save; returns the new generation.

        Metadata is kept. If the save fails, nothing changes in memory or on disk.
        """
        wanted = _normalize(positions)
        with self._lock:
            self._check_writable("save_positions")
            self._ensure_loaded()
            self._journal.drain()
            st = self._state.copy()
            entries = dict(self._entries)
            for key in [k for k in st.positions if k not in wanted]:
                self._remove_position(st, entries, key)
            for p in wanted.values():
                self._apply_position(st, entries, p)
            return self._commit(st, entries)

    def batch_save_positions(self, upserts: PositionsInput = (), *, deletes: Iterable[PositionKey] = ()) -> int:
        """Apply many changes and write them in ONE save; returns the new generation.

        *upserts* (Positions, or a mapping whose values are Positions) are added or replaced; *deletes* are
        ``(symbol, side)`` keys to close (absent keys are ignored). Positions not named stay as they are
        (unlike :meth:`save_positions`, which replaces all). Everything is checked before anything changes;
        if the save fails, nothing changes in memory or on disk.
        """
        wanted = _normalize(upserts)
        gone: list[PositionKey] = []
        for k in deletes:
            if not isinstance(k, tuple) or len(k) != 2:
                raise SchemaValidationError(None, "$.deletes", "type", f"expected (symbol, side) pairs, got {k!r}")
            gone.append(check_key(k[0], k[1]))
        both = set(wanted) & set(gone)
        if both:
            sym, side = sorted(both)[0]
            raise SchemaValidationError(
                None, f"$[{sym}|{side}]", "unique", f"{sym} {side} is both upserted and deleted in a batch"
            )
        with self._lock:
            self._check_writable("batch_save_positions")
            self._ensure_loaded()
            st = self._state.copy()
            entries = dict(self._entries)
            for key in gone:
                self._remove_position(st, entries, key)
            for p in wanted.values():
                self._apply_position(st, entries, p)
            return self._commit(st, entries)

    def save(self, *, expected_generation: int | None = None) -> int:
        """Write the in-memory state durably; returns the new generation.

        With *expected_generation* (optimistic concurrency), the save is refused with
        :class:`~posstate.ConcurrentModificationError` unless the state is still at that generation, i.e.
        nobody saved since the caller read :attr:`generation`.
        """
        with self._lock:
            self._check_writable("save")
            self._ensure_loaded()
            if expected_generation is not None and expected_generation != self._state.generation:
                raise ConcurrentModificationError(
                    self._path,
                    expected=expected_generation,
                    found=self._state.generation,
                    reason=(
                        f"save expected generation {expected_generation}, but the state is at generation {self._state.generation}"
                    ),
                )
            self._journal.drain()
            return self._commit(self._state.copy(), dict(self._entries))

    def _commit(self, st: StateData, entries: Entries) -> int:
        """Write *st* as the next generation; adopt it in memory only once it is durable."""
        started = time.perf_counter()
        self._writer_lock.check()
        if self._replica is not None:
            self._replica.fence()  # a writer that lost its replica lease saves nothing (LeaseLostError)
        self._halt_compaction()  # a snapshot of memory holds every segment: a pending background one is given up
        generation = max(st.generation, self._highest_generation) + 1
        st.generation = generation
        if self._files.tombstone_floor is not None:  # known once backups were listed (merge loads then)
            from posstate.model import merge as _merge

            _merge.drop_old_tombstones(st, floor=self._files.tombstone_floor)
        # Snapshot mode: unsaved changes make the new file differ from the one it replaces, so a failure after
        # the rename leaves the outcome unknown even though memory holds what was written (issue 12.8).
        unsaved = self.config.durability == "snapshot" and self._dirty
        rotation = self._journal.begin_rotation(st)  # compaction: the snapshot names the next journal
        try:
            st, encoded = _statefile.encode(
                st,
                keyring=self._write_keyring,
                compression_level=self.config.compression_level if self.config.compression else None,
                entries=entries,
                on_document=rotation.observe if rotation is not None and rotation.wants_document else None,
            )
            self._highest_generation = generation
            saved = st
            # If the new file may be in place although the save failed, memory must hold the same
            # positions and metadata, or the outcome is unknown (see _persistence_failed).
            self._write_main(encoded, differs=lambda: unsaved or _differs(saved, self._state))
        except BaseException:
            if rotation is not None:
                rotation.abort()
            raise
        if rotation is not None:
            rotation.finish()
        self._state = st
        self._change_mark += 1
        self._entries = entries  # filled by build_document, and only for a small state (bounded, issue 14.4)
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
        """Hook run after every successful save (timed backups live here; loaded on the first save)."""
        from posstate.backup import ops as _backup_ops

        _backup_ops.after_save(self._files, state)
        if self._replica is not None:
            self._replica.notify()  # the shipper's one hook: a durable snapshot to ship (never waits)

    def _note_durable(self, generation: int) -> None:
        """A snapshot of *generation* is durable (told to the backup service before the hook above runs)."""
        from posstate.backup import background as _background

        _background.service(self._files).note_snapshot(generation)

    def _write_main(self, encoded: Any, *, differs: Callable[[], bool] | None = None) -> None:
        self._install_file(
            lambda: _atomic.write_temp(self._path, encoded.data),
            encoded.checksum,
            lambda: self._verify_written(encoded),
            differs=differs,
        )

    def _install_file(
        self,
        make_temp: Callable[[], Path],
        checksum: str | None,
        verify: Callable[[], None],
        *,
        differs: Callable[[], bool] | None = None,
    ) -> None:
        """Every snapshot's last steps: the temp (*make_temp*: written here, or by a compaction worker), the
        ``.bak`` of the file it replaces, the rename and directory fsync, then *verify* (with
        ``verify_after_write``). Failures are PersistenceError naming the step, as :meth:`_persistence_failed`."""
        path = self._path
        renamed = False
        try:
            tmp = make_temp()
            try:
                self._prepare_replace()
            except BaseException:
                _atomic.quiet_unlink(tmp)
                raise
            _atomic.commit(tmp, path)
            renamed = True
            # From here the new file is (or may be) on disk: if verifying it fails, the next save must
            # still recognise it as our own, not as another writer's.
            self._expected_on_disk.add(checksum)
            if self.config.verify_after_write:
                verify()
        except _atomic.WriteFailed as wf:
            if wf.renamed:
                self._expected_on_disk.add(checksum)
            raise self._persistence_failed(wf.step, wf.cause, renamed=wf.renamed, differs=differs) from wf.cause
        except OSError as exc:
            raise self._persistence_failed("save", exc, renamed=renamed, differs=differs) from exc

    def _persistence_failed(
        self, step: str, cause: OSError, *, renamed: bool = False, differs: Callable[[], bool] | None = None
    ) -> PersistenceError:
        outcome = (
            "the new file is in place but its durability is not confirmed (the previous one is kept as .bak)"
            if renamed
            else "the previous file is intact"
        )
        unknown = renamed and differs is not None and differs()
        if unknown:
            # The new file may survive while memory keeps the old positions: the bot must be told.
            entry = _unknown.snapshot_entry(generation=self._highest_generation, operation=f"save ({step})")
            where = (
                "recorded for the next load to report"
                if self._note_unknown(entry)
                else "recorded in this process only: a reopen in this process reports it, after a restart it will not be reported"
            )
            outcome = (
                f"the outcome is unknown: the new file (generation {self._highest_generation}) may or may not survive "
                f"a crash, so what memory holds may differ from what loads next ({where})"
            )
        err = PersistenceError(self._path, operation=step, cause=cause, outcome=outcome, outcome_unknown=unknown)
        self._events.emit(
            "persistenceError",
            {"path": str(self._path), "operation": step, "errno": cause.errno, "reason": str(err), "outcome_unknown": unknown},
        )
        return err

    def _prepare_replace(self) -> None:
        """Check the file on disk is the one we expect, then keep it as ``.bak`` (or quarantine it if damaged)."""
        path = self._path
        try:
            data = fs.read_file(path)
        except FileNotFoundError:
            if None not in self._expected_on_disk:
                raise ConcurrentModificationError(
                    path,
                    expected=self._state.generation,
                    found=None,
                    reason="the state file disappeared since it was loaded (another writer bypassed the lock)",
                ) from None
            return
        recorded = _format.checksum_of(data)
        intact = recorded is not None and hashlib.sha256(data[: -_format.TRAILER_SIZE]).hexdigest() == recorded
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
        self._events.emit(
            "stateCorrupted", {"path": str(path), "reason": "damaged on disk before save", "quarantined": str(dest)}
        )

    def _verify_written(self, encoded: Any) -> None:
        data = fs.read_file(self._path)
        if data != encoded.data:
            raise OSError(5, "file read back differs from what was written")
        try:
            _codec.decode(data, keyring=self._keyring, path=self._path, max_document_bytes=self.config.max_document_bytes)
        except PosStateError as exc:
            raise OSError(5, f"file read back does not decode ({exc})") from exc


def _differs(a: StateData, b: StateData) -> bool:
    """True when *a* and *b* hold different positions or metadata, bot-wide included (what the bot sees)."""
    return a.positions != b.positions or a.metadata != b.metadata or a.bot_metadata != b.bot_metadata


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
