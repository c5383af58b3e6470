"""StateFiles: the small interface backups, recovery and repair work on, instead of the manager.

Backups, recovery and repair need the state directory's paths and policy, the read options, the journal, an
event callback, and a handful of operations on the state the owner holds in memory (load it, adopt a copy,
commit a generation). The manager implements this protocol (``posstate.manager.files.ManagerFiles``) and
calls these modules with it; they never see the manager itself, so the layers stay one way
(manager -> backup -> journal -> storage).

Every method runs under the owner's lock (the owner's public methods hold it while they delegate here), except
where its docstring says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from posstate.core.config import StateConfig
from posstate.journal.journal import Journal
from posstate.model.document import StateData
from posstate.model.ops import Entries
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions

if TYPE_CHECKING:
    from posstate.backup.background import BackupService
    from posstate.backup.verified import RemoteChecks

Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class CompactionAsk:
    """What :meth:`StateFiles.request_compaction` did (issue 14.2: a timed backup waits for a compaction).

    ``state``: ``"started"`` (a rotation began a background compaction now), ``"pending"`` (one was already
    pending or finishing: none started), ``"refused"`` (no rotation possible now; *reason* says why: ask
    again). ``generation``: the generation its snapshot will have (None: unknown, a finished one's after-save
    hook is running). ``attempts``/``error``: its failed attempts so far and the last failure. ``again``
    (refused): asking again at once may succeed (group mode: a writer appended while the journal synced)."""

    state: Literal["started", "pending", "refused"]
    generation: int | None = None
    attempts: int = 0
    error: str | None = None
    reason: str | None = None
    again: bool = False


class StateFiles(Protocol):
    """The state directory and the state held in memory for it, as the backup layer needs them."""

    #: Creation time of the newest backup (None: not looked up yet); timed backups compare it with the clock.
    last_backup_at: float | None
    #: Generation of the oldest backup kept (None: unknown); commits drop tombstones older than it.
    tombstone_floor: int | None
    #: The background backup thread, its folder lock and verified-backup cache (None: not started yet).
    backups: BackupService | None

    @property
    def config(self) -> StateConfig:
        """Paths (state file, .bak, journal, backups, quarantine) and policy."""

    @property
    def read(self) -> ReadOptions:
        """How to read and check a state file (keyring, size cap, clock skew, encryption required)."""

    @property
    def write_keyring(self) -> Keyring | None:
        """The key new files are sealed with (None: plain files)."""

    @property
    def journal(self) -> Journal:
        """The write-ahead journal of this state file."""

    @property
    def highest_generation(self) -> int:
        """The highest generation known to be used: a new one must exceed it."""

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Report an event to the owner's handlers (docs/RECOVERY.md lists them)."""

    def snapshot(self) -> StateData | None:
        """The state in memory, or None when nothing is loaded."""

    def unsaved(self) -> bool:
        """True when memory holds changes not yet in a snapshot."""

    def ensure_loaded(self) -> None:
        """Load the state (with recovery) if it is not loaded yet."""

    def save(self) -> int:
        """Write memory as the next generation (folds the journal into a snapshot); returns it."""

    def fold_journal(self) -> int:
        """Journal modes, without the owner's lock and without the backup folder (issue 14.3): make every change
        acknowledged before the call durable in a snapshot (the state file), by a background compaction this
        call waits for; raises what a failed attempt raised. Returns the least generation a state file holding
        them has (an older one is not the owner's: it was put there behind the writer lock). Loads the state
        first if needed. A caller that cannot wait for a compaction (an event handler: of a call holding the
        owner's lock, of the compaction thread, or one that holds the backup folder) saves under the owner's
        lock instead."""

    def confirm_copy(self) -> None:
        """Journal modes, without the owner's lock (issue 14.3): the state file just read for a backup may be
        backed up: no save is in flight and no change's outcome is in doubt (a save that renamed its file
        and then failed), else raise (OutcomeUnknownError; StateLockedError: the owner's lock stayed busy).
        Takes the owner's lock for a moment (a bounded wait)."""

    def deferred_events(self) -> AbstractContextManager[None]:
        """Events this thread emits (:meth:`emit`) inside the block go out, in order, when it ends."""

    def read_current(self) -> StateData:
        """Read the state file and replay its journal, exactly as a load does, and adopt the result."""

    def check_account(self, state: StateData) -> None:
        """Raise CorruptStateError when *state* belongs to another account than the configured one."""

    def adopt(self, state: StateData, checksum: str | None) -> tuple[StateData, Entries]:
        """Make *state* the state in memory (*checksum*: its file's trailer, None: not on disk as is);
        returns a copy of it and of its entries, ready for :meth:`commit`."""

    def commit(self, state: StateData, entries: Entries) -> int:
        """Write *state* durably as the next generation and adopt it in memory; returns the generation."""

    def raise_generation(self, at_least: int) -> None:
        """Note that generation *at_least* is used (the next commit goes above it)."""

    def set_loaded(self, loaded: bool) -> None:
        """Mark memory as loaded (after a restore) or not (a failed write: the next call reloads)."""

    def acknowledged(self) -> StateData | None:
        """Under the owner's lock: a copy of the acknowledged state (every written journal record made durable
        first; ``journal.seq`` the last one), or None when nothing is loaded or memory may hold a change that
        was not acknowledged (a failed group sync not yet rolled back, an outcome in doubt). Issue 15.2."""

    def wrote(self, checksum: str) -> bool:
        """True when a state file with this trailer checksum holds bytes this manager encoded from its validated
        memory, or loaded and validated (issue 14.3: a background backup of it needs no decrypt and validate)."""

    def request_compaction(self) -> CompactionAsk:
        """Start a background compaction (the rotation the journal thresholds start) unless one is pending;
        never on this thread and never O(state) under the owner's lock (journal modes; issue 14.2). Called
        without the owner's lock, from the backup thread."""

    def expect_on_disk(self, checksum: str | None) -> None:
        """The state file on disk is ours with this trailer checksum (None: no file); anything else at the
        next save was written by someone who bypassed the lock."""

    def remote_checks(self) -> RemoteChecks | None:
        """Where a prune's full checks of backups run: a worker process (issue 14), or None for this process."""
