"""asyncio writers: every change that may fsync runs in a worker thread, never on the event loop (issue 15.6).

``aset_position``, ``adelete_position``, ``aset_symbol_metadata``, ``adelete_symbol_metadata``,
``aset_bot_metadata`` and ``async with manager.atransaction() as tx`` do what their blocking twins do, in the
loop's default executor, so timers, sockets and other tasks keep running while the journal record (or a
compaction) is made durable.

Cancellation (docs/JOURNAL.md, "asyncio"): a change is all or nothing, and a worker thread cannot be stopped
half way through an ``fdatasync``. So cancelling a caller that awaits one of these methods does not stop the
change: the coroutine waits (shielded) until the thread has finished, then raises ``CancelledError``. By the
time the cancellation reaches the caller the change is either wholly applied and durable or wholly not applied
(it failed); which of the two, a read tells (``get_position`` ...). It is never half applied, and never still
running behind the caller's back. A block of ``atransaction()`` that is cancelled (or raises) before its end
applies nothing: its changes are only staged until the block ends, then applied as one transaction (one
journal record) in a worker thread, under the same rule.

asyncio is imported inside the coroutines: a program that never awaits them never loads it (issue 13.6).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from posstate.core.errors import SchemaValidationError, TransactionError
from posstate.manager.admin import StateMaintenance
from posstate.manager.commit import PositionsInput
from posstate.model import document as _document
from posstate.model.position import Position, PositionKey, Side, check_key

_T = TypeVar("_T")

__all__ = ["AsyncChanges", "StagedChanges"]


class StagedChanges:
    """The changes of one ``atransaction()`` block, checked when staged and applied together at its end.

    Each call validates its arguments at once (a bad position or metadata raises inside the block, where the
    caller can see it); nothing reaches the manager until the block ends without an exception.
    """

    __slots__ = ("_ops",)

    def __init__(self) -> None:
        self._ops: list[tuple[str, tuple[Any, ...]]] = []

    def set_position(self, position: Position) -> None:
        if not isinstance(position, Position):
            raise SchemaValidationError(None, "$", "type", f"expected a Position, got {type(position).__name__}")
        self._ops.append(("set_position", (position,)))

    def delete_position(self, symbol: str, side: Side) -> None:
        """Remove the position at the block's end (nothing happens if there is none then)."""
        self._ops.append(("delete_position", check_key(symbol, side)))

    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> None:
        self._ops.append(("set_symbol_metadata", (symbol, _document.clean_metadata(symbol, data))))

    def delete_symbol_metadata(self, symbol: str) -> None:
        self._ops.append(("delete_symbol_metadata", (symbol,)))

    def set_bot_metadata(self, data: Mapping[str, Any]) -> None:
        self._ops.append(("set_bot_metadata", (_document.clean_bot_metadata(data),)))

    def __len__(self) -> int:
        return len(self._ops)


class AsyncChanges(StateMaintenance):
    """The asyncio twins of the single-entry writers and of transaction() (see the module docstring)."""

    def _staging(self) -> dict[object, StagedChanges]:
        """The open atransaction() blocks of this manager, by the asyncio task that runs each."""
        found: dict[object, StagedChanges] | None = self.__dict__.get("_astaged")
        if found is None:
            found = self.__dict__.setdefault("_astaged", {})
        return found

    async def _off_loop(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in the loop's default executor; a cancelled caller still waits for it to finish."""
        self._refuse_async_in_txn(what)
        import asyncio  # loaded already: this coroutine runs in its event loop

        if what != "atransaction" and asyncio.current_task() in self._staging():
            # It would apply at once, outside the block's all-or-nothing (and stay if the block then raised).
            raise TransactionError(
                self.config.state_path, f"{what} cannot run inside atransaction(): stage it on the block's tx instead"
            )
        import contextvars  # so is this (asyncio needs it)

        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, fn, *args))
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if fut.done():  # finished (or the executor itself was shut down): nothing is running now
                    raise
                cancelled = True  # the change is under way: wait for its end, then pass the cancellation on
                continue
            except BaseException as exc:
                if cancelled:  # the change failed (applied nothing); the caller asked to be cancelled
                    raise asyncio.CancelledError() from exc
                raise
            break
        if cancelled:
            raise asyncio.CancelledError()
        return result

    async def aset_position(self, position: Position) -> None:
        """:meth:`set_position` off the event loop (the journal record is made durable in a worker thread)."""
        await self._off_loop("aset_position", self.set_position, position)

    async def adelete_position(self, symbol: str, side: Side) -> bool:
        """:meth:`delete_position` off the event loop."""
        return await self._off_loop("adelete_position", self.delete_position, symbol, side)

    async def aset_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> None:
        """:meth:`set_symbol_metadata` off the event loop (*data* is checked and copied before it goes)."""
        clean = _document.clean_metadata(symbol, data)
        await self._off_loop("aset_symbol_metadata", self.set_symbol_metadata, symbol, clean)

    async def adelete_symbol_metadata(self, symbol: str) -> bool:
        """:meth:`delete_symbol_metadata` off the event loop."""
        return await self._off_loop("adelete_symbol_metadata", self.delete_symbol_metadata, symbol)

    async def aset_bot_metadata(self, data: Mapping[str, Any]) -> None:
        """:meth:`set_bot_metadata` off the event loop."""
        clean = _document.clean_bot_metadata(data)
        await self._off_loop("aset_bot_metadata", self.set_bot_metadata, clean)

    # The saves and the load (changes.py) with the same cancellation rule as the writers above.
    async def asave(self, *, expected_generation: int | None = None) -> int:
        """:meth:`save` off the event loop."""
        return await self._off_loop("asave", lambda: self.save(expected_generation=expected_generation))

    async def asave_positions(self, positions: PositionsInput) -> int:
        """:meth:`save_positions` off the event loop."""
        return await self._off_loop("asave_positions", self.save_positions, positions)

    async def aload_positions(self) -> dict[PositionKey, Position]:
        """:meth:`load_positions` off the event loop (a first load may recover, and write)."""
        return await self._off_loop("aload_positions", self.load_positions)

    @contextlib.asynccontextmanager
    async def atransaction(self) -> AsyncIterator[StagedChanges]:
        """``async with manager.atransaction() as tx:`` stage changes on *tx* (``tx.set_position(p)``, ...);
        at the end of the block they are applied as one transaction (one journal record, all or nothing) in a
        worker thread. An exception or a cancellation inside the block applies nothing."""
        import asyncio  # loaded already: this coroutine runs in its event loop

        task = asyncio.current_task()
        open_blocks = self._staging()
        outer = open_blocks.get(task)
        if outer is not None:  # nested in this task's block: part of it, as a nested transaction() is
            mark = len(outer._ops)
            try:
                yield outer
            except BaseException:
                del outer._ops[mark:]  # the inner block's own changes only
                raise
            return
        self._refuse_async_in_txn("atransaction")
        self._check_writable()
        staged = StagedChanges()
        open_blocks[task] = staged
        try:
            yield staged
        finally:
            open_blocks.pop(task, None)
        if staged:
            await self._off_loop("atransaction", self._apply_staged, staged._ops)

    def _apply_staged(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self.transaction():
            for name, args in ops:
                getattr(self, name)(*args)
