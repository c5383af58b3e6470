"""Where the server's :class:`~posstate.serve.view.View` comes from: a live account store, a live manager, or a
state directory read from disk (``posstate serve``).

The bot's thread never waits for the server. An account store already has a bounded, never-blocking update
feed (:mod:`posstate.account.feed`): each stream client subscribes to it. A manager and a directory have none,
so the server's poll thread compares what it reads with the last view every ``poll_interval`` and publishes the
differences on an :class:`~posstate.account.feed.UpdateFeed` of its own, with the same policy. Reading a
manager copies its state under its lock (a few microseconds for a few hundred positions) and only when it
changed since the last copy (the manager's change mark, :meth:`~posstate.PositionStateManager.state_copy_since`);
reading a directory re-reads the files when their size or time changed, takes no lock and never writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posstate.account.store import AccountStateStore
from posstate.account.types import AccountUpdate
from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
from posstate.journal.current import read_current
from posstate.journal.files import next_path
from posstate.manager.manager import PositionStateManager
from posstate.model.document import StateData
from posstate.serve.fanout import Fanout, Subscription
from posstate.serve.view import SourceKind, View, changes
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

log = logging.getLogger("posstate")


@dataclasses.dataclass
class Stats:
    """Counters for /metrics, each written by one thread (the bot's event handlers or the poll thread)."""

    saves: int = 0
    updates: int = 0
    compactions: int = 0
    backups: int = 0
    recoveries: int = 0
    send_timeouts: int = 0  # clients closed because they stopped reading their socket
    heartbeat_timeouts: int = 0
    connections_refused: int = 0  # connections closed at once: max_connections were open
    last_save: float | None = None  # wall time of the last save seen (None: use the state file's time)


class Source:
    """The common part: the current view, the stream queues, the counters and the problem, if any."""

    kind: SourceKind = "directory"

    def __init__(self, config: StateConfig | None) -> None:
        self.config = config
        self.stats = Stats()
        #: Why the state cannot be served as healthy right now (None: it can). Never holds a key.
        self.problem: str | None = None
        #: True once the state was read at least once.
        self.ready = False
        #: Read options with the key, to authenticate the newest backup (None: headers and checksums only).
        self.backup_read: _statefile.ReadOptions | None = None
        self._lock = threading.Lock()
        self._view = View(self.kind, 0)
        #: The stream's shared log (serve/fanout.py): each change encoded once for every client.
        self.fanout = Fanout()

    def view(self) -> View:
        return self._view

    def open_stream(self, maxsize: int) -> tuple[Subscription, View]:
        """A place in the stream's log, reading every later update (at most *maxsize* behind), and the view it
        starts from (updates with a version at most the view's are already in it)."""
        with self._lock:
            return self.fanout.add(maxsize), self._view

    def close_stream(self, sub: Subscription) -> None:
        self.fanout.remove(sub)

    @property
    def dropped(self) -> int:
        """Stream clients dropped so far: queues the fan-out found full (each got ``resync``) plus clients that
        stopped reading their socket."""
        return self.fanout.dropped_count + self.stats.send_timeouts

    def streams(self) -> tuple[Subscription, ...]:
        """The connected stream clients' subscriptions."""
        return self.fanout.subscriptions()

    def poll(self) -> None:
        """Look for changes (the poll thread calls this every ``poll_interval``)."""

    def close(self) -> None:
        """Stop listening to the source (the server calls this once, at stop)."""

    def _publish(self, new: View) -> None:
        """Swap in *new* (as the next version) if anything differs from the current view, and queue the
        differences to every stream."""
        with self._lock:
            old = self._view
            updates = list(changes(old, new))
            if not updates and old.generation == new.generation and self.ready:
                return
            version = old.version + (1 if updates else 0)
            self._view = dataclasses.replace(new, version=version, changed_at=time.time() if updates else old.changed_at)
            self.ready = True
            if updates:
                self.stats.updates += len(updates)
                self.fanout.publish(AccountUpdate(kind, version, key, value, "poll") for kind, key, value in updates)  # type: ignore[arg-type]


def _view_of_state(kind: SourceKind, st: StateData) -> View:
    """The view of *st*, a private copy (its maps are taken over, not copied again)."""
    return View(
        kind,
        0,
        generation=st.generation,
        positions=st.positions,
        position_revs=st.position_revs,
        metadata=st.metadata,
        metadata_revs=st.metadata_revs,
        account=st.account,
    )


# ------------------------------------------------------------------------------------------ manager
_MANAGER_EVENTS = ("stateSaved", "backupCreated", "stateRepaired", "persistenceError", "stateCorrupted", "recoveryError")


class ManagerSource(Source):
    """A live :class:`~posstate.PositionStateManager` in this process: positions and symbol metadata."""

    kind: SourceKind = "manager"

    def __init__(self, manager: PositionStateManager) -> None:
        super().__init__(manager.config)
        self._m = manager
        self._seen: int | None = None
        self._handlers: list[tuple[str, Callable[[dict[str, Any]], object]]] = []
        for event in _MANAGER_EVENTS:
            handler = self._handler(event)
            manager.on(event, handler)
            self._handlers.append((event, handler))
        if manager.last_recovery is not None:
            self.stats.recoveries += 1

    def _handler(self, event: str) -> Callable[[dict[str, Any]], object]:
        stats = self.stats

        def on_event(data: dict[str, Any]) -> None:  # on the bot's thread: counters only
            if event == "stateSaved":
                stats.saves += 1
                stats.last_save = time.time()
                self.problem = None
            elif event == "backupCreated":
                stats.backups += 1
            elif event == "stateRepaired":
                stats.recoveries += 1
            else:
                self.problem = f"{event}: {data.get('reason', '')}".rstrip(": ")

        return on_event

    def poll(self) -> None:
        m = self._m
        if m.closed:
            self.problem = "the manager is closed"
            return
        # The manager's change mark moves with every change in memory (the generation and ``dirty`` do not in
        # ``durability="snapshot"``): an idle poll takes no lock at all, and a copy is made only after a change.
        if self.ready and m.change_mark == self._seen:
            return
        mark, st = m.state_copy_since(self._seen if self.ready else None)
        if st is None:
            return  # nothing changed, or not loaded yet (the bot's first call loads it)
        self._seen = mark
        self._publish(_view_of_state("manager", st))

    def close(self) -> None:
        for event, handler in self._handlers:
            self._m.off(event, handler)


# ------------------------------------------------------------------------------------------ account store
class StoreSource(Source):
    """A live :class:`~posstate.AccountStateStore`: balances, positions, orders, leverage, metadata.

    The server takes one subscription to the store's feed, whatever the number of clients, so a write costs
    the bot one ``put_nowait`` more; the poll thread drains it and appends the updates to the stream's log as
    one batch (the same policy one level down: a client too far behind is dropped with a resync). If the
    server's own subscription is ever dropped (``SUBSCRIPTION`` updates between two polls), every client
    gets ``resync`` and the server subscribes again."""

    kind: SourceKind = "store"
    #: Room in the server's one subscription to the store (updates between two polls).
    SUBSCRIPTION = 65536

    def __init__(self, store: AccountStateStore) -> None:
        manager = getattr(store, "manager", None)
        super().__init__(manager.config if isinstance(manager, PositionStateManager) else None)
        self._store = store
        self._manager = manager if isinstance(manager, PositionStateManager) else None
        self._mine = ManagerSource(self._manager) if self._manager is not None else None
        if self._mine is not None:
            self.stats = self._mine.stats
        self._sub = store.subscribe(maxsize=self.SUBSCRIPTION)
        self._view = self._view_of(time.time())
        self._base = self._view.version  # updates up to this version are in the first view already
        self.fanout.reset_orders(self._view.orders)
        self.ready = True

    def _view_of(self, changed_at: float) -> View:
        snap = self._store.snapshot()
        return View(
            "store",
            snap.version,
            generation=self._manager.generation if self._manager is not None else None,
            positions=snap.positions,
            metadata=snap.metadata,
            orders=snap.orders,
            balance=snap.balance,
            previous_balance=snap.previous_balance,
            leverage=snap.leverage,
            changed_at=changed_at,
        )

    def poll(self) -> None:
        updates: list[AccountUpdate] = []
        with contextlib.suppress(queue.Empty):
            while True:
                updates.append(self._sub.get_nowait())
        resync = [u for u in updates if u.kind == "resync"]
        if resync:  # the poll thread fell SUBSCRIPTION updates behind: every client starts again
            log.warning("posstate serve: fell behind the account store; every stream client is sent resync")
            self._store.unsubscribe(self._sub)
            self._sub = self._store.subscribe(maxsize=self.SUBSCRIPTION)
            updates = []
        with self._lock:
            if resync:
                self._view = self._view_of(time.time())
                self._base = self._view.version
                self.fanout.reset_orders(self._view.orders)
                self.fanout.resync_all(resync[-1].version)
            updates = [u for u in updates if u.version > self._base]
            try:
                if updates:
                    self.fanout.publish(updates)
            except Exception:  # every client was sent resync: they reconnect to a view with these changes
                self._view = self._view_of(time.time())
                self._base = self._view.version
                self.fanout.reset_orders(self._view.orders)
                raise
            if self._store.version != self._view.version:
                self._view = self._view_of(time.time())
            elif self._manager is not None and self._manager.generation != self._view.generation:
                self._view = dataclasses.replace(self._view, generation=self._manager.generation)
        self.stats.updates = self._store.version
        if self._mine is not None:
            self.problem = "the manager is closed" if self._manager_closed() else self._mine.problem

    def _manager_closed(self) -> bool:
        return self._manager is not None and self._manager.closed

    def close(self) -> None:
        self._store.unsubscribe(self._sub)
        if self._mine is not None:
            self._mine.close()


# ------------------------------------------------------------------------------------------ directory
def _signature(*paths: Path | None) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        st = None
        if p is not None:
            with contextlib.suppress(OSError):
                s = fs.stat_(p)
                st = (s.st_ino, s.st_mtime_ns, s.st_size)
        out.append(st)
    return tuple(out)


class DirectorySource(Source):
    """A state directory on disk, read as a restarted bot would load it (snapshot plus journal), read-only:
    no lock taken, nothing written, so it runs beside the bot that owns the directory."""

    kind: SourceKind = "directory"
    #: Reads retried when the files changed while they were read (the bot saved meanwhile).
    RETRIES = 3

    def __init__(self, config: StateConfig, options: _statefile.ReadOptions) -> None:
        super().__init__(config)
        # With encryption on, a plaintext state file or journal is refused even without a key (the CLI's
        # read-only commands require it only when a key is given): anyone who can write the directory can
        # write one, and a server left running must not turn a "no key" 503 into a healthy forged state.
        self._options = dataclasses.replace(options, require_encryption=True) if config.encryption else options
        self.backup_read = self._options if options.keyring is not None else None
        self._sig: tuple[Any, ...] | None = None
        self._snapshot_generation: int | None = None
        #: The highest generation read so far: a lower one later is an older copy put back (SECURITY.md
        #: T1 "Rollback": the one counter kept outside the directory, for as long as the server runs).
        self._highest: int | None = None

    def poll(self) -> None:
        cfg = self.config
        assert cfg is not None
        # The ``.next`` segment too: while a background compaction is pending only it grows (issue 14).
        paths = (cfg.state_path, cfg.journal_path, cfg.legacy_journal_path, next_path(cfg.journal_path))
        for _ in range(self.RETRIES):
            sig = _signature(*paths)
            if sig == self._sig:
                return
            try:
                cur = read_current(cfg, self._options)
                problem = str(cur.error) if cur.error is not None else None
            except PosStateError as exc:
                cur, problem = None, str(exc)
            if _signature(*paths) != sig:
                continue  # written while read: read again (a save between the snapshot and the journal)
            self._note_files(sig)
            self._sig = sig
            if cur is not None:
                problem = self._rollback(cur.generation, problem)
            self.problem = problem
            if cur is not None:
                if self._snapshot_generation is not None and cur.loaded.state.generation != self._snapshot_generation:
                    self.stats.saves += 1
                self._snapshot_generation = cur.loaded.state.generation
                st = cur.state.copy()
                st.generation = cur.generation
                self._publish(_view_of_state("directory", st))
            return

    def _rollback(self, generation: int, problem: str | None) -> str | None:
        """*problem*, or the rollback, while the generation is below the highest read (until the bot writes past it)."""
        if self._highest is None or generation > self._highest:
            self._highest = generation
        if generation >= self._highest:
            return problem
        assert self.config is not None
        rolled = (
            f"{self.config.state_path}: generation went back from {self._highest} to {generation} while served "
            "(an older copy replaced the state file: a rollback, or a recovery that lost changes); compare with "
            "`posstate backups list` and restore the newest with `posstate backups restore` (a state reset on "
            "purpose: restart the server)"
        )
        return rolled if problem is None else f"{problem}; {rolled}"

    def _note_files(self, sig: tuple[Any, ...]) -> None:
        """A journal replaced by a new one (another inode) is a compaction."""
        old = self._sig
        if old is not None and old[1] is not None and sig[1] is not None and old[1][0] != sig[1][0]:
            self.stats.compactions += 1
