"""The state in memory and its changes: reads, single-entry writers (recorded in the journal in the journal
modes) and transactions.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from posstate.core.errors import (
    SchemaValidationError,
    TransactionError,
)
from posstate.manager.commit import PositionsInput
from posstate.manager.compaction import BackgroundCompaction
from posstate.model import document as _document
from posstate.model import ops as _jops
from posstate.model.position import Position, PositionKey, Side, check_key, field_values

log = logging.getLogger("posstate")


class InMemoryChanges(BackgroundCompaction):
    """get/set/delete of positions and metadata, each all or nothing; transaction() groups them."""

    def get_position(self, symbol: str, side: Side) -> Position | None:
        key = check_key(symbol, side)
        with self._lock:
            self._ensure_loaded()
            return self._state.positions.get(key)

    def get_positions(self) -> dict[PositionKey, Position]:
        with self._lock:
            self._ensure_loaded()
            return dict(self._state.positions)

    def set_position(self, position: Position) -> None:
        """Add or replace the position with this (symbol, side); durable at the next save."""
        if not isinstance(position, Position):
            raise SchemaValidationError(None, "$", "type", f"expected a Position, got {type(position).__name__}")
        with self._lock:
            if self._doubt is not None:
                self._check_writable()
            self._ensure_loaded()
            key = (position.symbol, position.side)
            old = self._state.positions.get(key)
            # Same as ``old == position`` (the dataclass compares the tuples of every field), with the tuples
            # built by one C call each instead of in Python.
            if old is not None and (
                old is position or (old.__class__ is position.__class__ and field_values(old) == field_values(position))
            ):
                return
            op = _jops.set_position(position, self._next_rev())
            self._change_mark += 1
            if self._txn is None and self._journal.append_now(self._state, self._entries, op):
                self._dirty = True
                self._state.generation = op.json["rev"]  # an acknowledged change moves the generation
                return
            ticket = self._change(op)
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)

    def delete_position(self, symbol: str, side: Side) -> bool:
        """Remove a position (its symbol's metadata stays). Returns False if there was none."""
        key = check_key(symbol, side)
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            if key not in self._state.positions:
                return False
            ticket = self._change(_jops.delete_position(key, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)
        return True

    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> None:
        """Replace the bot's own data for *symbol* (a JSON-able dict; a private copy is kept)."""
        clean = _document.clean_metadata(symbol, data)
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            ticket = self._change(_jops.set_metadata(symbol, clean, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)

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
            self._check_writable()
            self._ensure_loaded()
            if symbol not in self._state.metadata:
                return False
            ticket = self._change(_jops.delete_metadata(symbol, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)
        return True

    def set_bot_metadata(self, data: Mapping[str, Any]) -> None:
        """Replace the bot's own data that belongs to no symbol (a step counter, a strategy's global state):
        a JSON-able dict, checked and copied like symbol metadata, journaled like every change (issue 15.7)."""
        clean = _document.clean_bot_metadata(data)
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            ticket = self._change(_jops.set_bot_metadata(clean, self._next_rev()))
        if ticket is not None:
            self._journal.settle(ticket, self._rollback_journal)

    def get_bot_metadata(self) -> dict[str, Any] | None:
        """A copy of the bot-wide metadata (editing it changes nothing until you set it), or None if never set."""
        with self._lock:
            self._ensure_loaded()
            found = self._state.bot_metadata
            return _document.copy_json(found) if found is not None else None

    def _change(self, op: _jops.Op) -> int | None:
        """Apply *op* in memory and (journal modes) record it durably; all or nothing. Lock held."""
        self._change_mark += 1
        if self._txn is not None:
            self._check_txn_owner()
            self._journal.remember(self._state, self._entries, op)
            self._txn.append((op, _jops.apply(self._state, self._entries, op)))
            self._dirty = True
            return None
        return self._record([op])

    def _record(self, ops: list[_jops.Op]) -> int | None:
        self._change_mark += 1
        first_bot_metadata = self._state.bot_metadata is None and self._journal.active
        if first_bot_metadata and any(op.json["op"] == _jops.SET_BOT_METADATA for op in ops):
            self._record_as_snapshot(ops)
            return None
        self._journal.prepare(self._state, self._entries, compact=self._compact_journal, rotate=self._rotate_journal)
        rev = self._next_rev()  # a compaction in prepare() moved the generation on
        for op in ops:
            if op.json["rev"] != rev:
                _jops.restamp(op, rev)
        ticket = self._journal.append(self._state, self._entries, ops)
        self._dirty = True
        if self._journal.active:
            # Each journaled change moves the generation to its revision, so that save(expected_generation=)
            # sees it (docs/JOURNAL.md, "Generation"); a reload computes the same from the records.
            self._state.generation = rev
        return ticket

    def _compact_journal(self) -> int:
        return self._commit(self._state.copy(), dict(self._entries))

    def _rollback_journal(self) -> None:
        with self._lock:
            self._change_mark += 1
            self._journal.rollback(self._state, self._entries)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group changes into one journal record: all or nothing. An exception inside the block discards
        every change made in it, in memory too. Other threads wait until the block ends."""
        ticket = None
        with self._lock:
            self._check_writable()
            self._ensure_loaded()
            if self._txn is not None:  # nested: part of the outer transaction, all or nothing on its own
                self._check_txn_owner()
                mark = len(self._txn)
                try:
                    yield
                except BaseException:
                    self._change_mark += 1
                    for _, u in reversed(self._txn[mark:]):
                        _jops.undo(self._state, self._entries, u)
                    del self._txn[mark:]
                    raise
                return
            self._txn = []
            self._txn_owner = _txn_owner()
            try:
                yield
            except BaseException:
                self._change_mark += 1
                done, self._txn = self._txn, None
                for _, u in reversed(done):
                    _jops.undo(self._state, self._entries, u)
                raise
            done, self._txn = self._txn, None
            if done:
                for _, u in reversed(done):
                    _jops.undo(self._state, self._entries, u)
                ticket = self._record([op for op, _ in done])
        self._journal.settle(ticket, self._rollback_journal)

    def _record_as_snapshot(self, ops: list[_jops.Op]) -> None:
        """The first bot metadata goes into a snapshot (schema 2), never only into the journal over a schema-1
        snapshot: the release before it would take the unknown record for damage and recover without it (and
        without every change after it); a schema-2 snapshot makes it refuse the file instead (issue 15.7).
        All or nothing, as a save: memory adopts the changes only once the snapshot is durable. Lock held."""
        self._journal.prepare(self._state, self._entries, compact=self._compact_journal)  # a failed sync's undo
        self._journal.drain()
        st, entries = self._state.copy(), dict(self._entries)
        rev = self._next_rev()
        for op in ops:
            if op.json["rev"] != rev:
                _jops.restamp(op, rev)
            _jops.apply(st, entries, op)
        self._commit(st, entries)

    def _check_txn_owner(self) -> None:
        """Inside a transaction (lock held): refuse a change from another asyncio task of this thread, which
        the re-entrant lock lets in while the owner's block waits at an ``await``."""
        if self._txn_owner != _txn_owner():
            raise TransactionError(
                self._path,
                "another asyncio task's transaction() is open (awaiting inside its block); this change cannot join it",
            )

    def _refuse_async_in_txn(self, what: str) -> None:
        """An async writer awaited inside a transaction of this thread would wait for the lock this thread
        holds, forever if the block's own task awaits it (directly, or through wait_for/gather, which run it
        in another task): refuse it at once (issue 12.9)."""
        owner = self._txn_owner
        if self._txn is not None and owner is not None and owner[0] == threading.get_ident():
            raise TransactionError(self._path, f"{what} cannot run inside transaction()")

    async def asave_positions(self, positions: PositionsInput) -> int:
        self._refuse_async_in_txn("asave_positions")
        import asyncio  # loaded already: this coroutine runs in its event loop

        return await asyncio.to_thread(self.save_positions, positions)

    async def aload_positions(self) -> dict[PositionKey, Position]:
        self._refuse_async_in_txn("aload_positions")
        import asyncio  # loaded already: this coroutine runs in its event loop

        return await asyncio.to_thread(self.load_positions)

    async def asave(self, *, expected_generation: int | None = None) -> int:
        self._refuse_async_in_txn("asave")
        import asyncio  # loaded already: this coroutine runs in its event loop

        return await asyncio.to_thread(lambda: self.save(expected_generation=expected_generation))


def _txn_owner() -> tuple[int, object]:
    """(thread, running asyncio task or None): who is calling."""
    # asyncio is imported only by programs that use it: if it is not loaded, no task can be running.
    asyncio = sys.modules.get("asyncio")
    task: object = None
    if asyncio is not None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop running in this thread
            task = None
    return threading.get_ident(), task
