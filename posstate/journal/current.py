"""The current state as a restarted bot would load it: the snapshot plus its journal, read-only.

Since the write-ahead journal, the state on disk is ``positions.json`` (the snapshot) with the records of
``positions.json.journal`` after the snapshot's ``journal.seq`` replayed on top (only if the journal's id is
the one the snapshot names; ``positions.journal``, the name posstate up to 0.1.0 used, is read when the
snapshot names it and the new name does not exist, as a load does). :func:`read_current` reads both and never
writes: it does not cut a torn tail, quarantine a damaged journal or start a new one (a load does those). What
it finds wrong with the journal is returned, never hidden: ``error`` is the typed error a load would raise
(damage before the last record, another snapshot's journal holding newer records, a wrong or missing key),
``notes`` what a load repairs by itself (a torn last record). An older journal the snapshot already holds
(normal between a save and the next change) is ignored, as a load ignores it. While a background compaction
is pending (issue 14) the records go on in ``positions.json.journal.next``, a segment linked to the first:
it is replayed after it, as a load does (``journal.files.segment_chain``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.journal.files import gap_after_missing, segment_chain
from posstate.journal.records import read_records, replay_chain
from posstate.model import document as _document
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

if TYPE_CHECKING:
    from posstate.core.config import StateConfig

__all__ = ["Current", "read_current"]


@dataclass(frozen=True, slots=True)
class Current:
    """The snapshot (``loaded``, untouched) and ``state``: a copy with the journal's records replayed.

    ``applied`` counts the records replayed (those after the snapshot's sequence number); ``last_seq`` is
    the last one applied (None when none was); ``max_rev`` the highest revision they set. When ``error``
    is set the journal could not be replayed in full: ``state`` then holds the snapshot plus the records
    before the problem (a best effort for display, not what a load adopts: a load raises ``error`` and
    runs recovery).
    """

    loaded: _statefile.Loaded
    state: StateData
    applied: int = 0
    last_seq: int | None = None
    max_rev: int = 0
    notes: tuple[str, ...] = ()
    error: PosStateError | None = field(default=None, compare=False)
    #: The id of the journal segment that holds ``last_seq`` (issue 14: the ``.next`` segment of a pending
    #: background compaction when its records were replayed; None: the snapshot's journal, or none applied).
    last_journal: str | None = None

    def journal_entry(self) -> dict[str, Any] | None:
        """The ``journal`` entry of a state holding everything replayed: the segment of the last record applied
        and its sequence number (a recovery from it replays only what follows, in that segment or the one its
        compaction renamed it to); the snapshot's own entry when nothing was replayed."""
        snap = self.state.journal
        if self.last_seq is None or snap is None:
            return snap
        return {**snap, "id": self.last_journal or snap.get("id"), "seq": self.last_seq}

    @property
    def problems(self) -> tuple[str, ...]:
        """What is wrong with the journal, as text (empty when the replay is complete)."""
        return (str(self.error),) if self.error is not None else ()

    @property
    def generation(self) -> int:
        """The snapshot's generation, raised to the highest revision replayed (what a save would write)."""
        return max(self.state.generation, self.max_rev)

    def document(self) -> dict[str, Any]:
        """The state document of ``state``: the snapshot's own document when nothing was replayed; else
        the document a compaction would write now (generation raised to the highest revision replayed,
        ``journal.seq`` the last record applied) so it passes the same validation (``import`` accepts it)."""
        st = self.state.copy()
        st.generation = self.generation
        st.journal = self.journal_entry()
        return _document.build_document(st)


def read_current(config: StateConfig, options: _statefile.ReadOptions) -> Current:
    """Read the state file and replay its journal, read-only (see the module docstring).

    Raises what reading the snapshot raises (StateNotFoundError, CorruptStateError, WrongKeyError, ...);
    journal problems are returned in ``Current.error`` / ``Current.notes``, not raised.
    """

    loaded = _statefile.read(config.state_path, options=options)
    state = loaded.state.copy()
    try:  # the snapshot's journal, then the segment a background compaction started after it (issue 14)
        chain = segment_chain(config.journal_path, config.legacy_journal_path, loaded.state.journal)
    except CorruptStateError as exc:  # both journal names hold the snapshot's journal, both past it
        return Current(loaded=loaded, state=state, error=exc)
    snap = loaded.state.journal or {}
    snap_seq = int(snap.get("seq", 0))
    applied = max_rev = 0
    last_applied: int | None = None
    last_journal: str | None = None
    notes: tuple[str, ...] = ()
    missing = False
    for i, path in enumerate(chain):
        try:
            data = fs.read_file(path)
        except FileNotFoundError:
            if len(chain) > 1 and i == 0:
                missing = True
                continue  # the snapshot's journal has no file; the next segment links to its id
            return Current(
                loaded=loaded, state=state, applied=applied, last_seq=last_applied, max_rev=max_rev, last_journal=last_journal
            )
        except OSError as exc:
            err: PosStateError = PersistenceError(path, operation="read journal", cause=exc)
            return Current(loaded=loaded, state=state, applied=applied, last_seq=last_applied, max_rev=max_rev, error=err)
        try:
            header, records, sc = read_records(
                data, path=path, keyring=options.keyring, require_encryption=options.require_encryption
            )
        except (MissingKeyError, WrongKeyError, UnsupportedVersionError) as exc:
            return Current(loaded=loaded, state=state, applied=applied, last_seq=last_applied, max_rev=max_rev, error=exc)
        except CorruptStateError as exc:
            # Damage before the last record: show the trustworthy prefix, and say the replay stopped.
            state = loaded.state.copy()
            a, r, _ = replay_chain(
                chain[: i + 1], keyring=options.keyring, state=state, require_encryption=options.require_encryption
            )
            return Current(loaded=loaded, state=state, applied=a, max_rev=r, error=exc)
        last = records[-1][0].seq if records else header.base_seq
        if missing and i == 1 and (gap := gap_after_missing(snap, path, header.base_seq)) is not None:
            err = CorruptStateError(
                path,
                gap,
                next_step="a load moves the segment to quarantine and recovers; see what it would choose with "
                "`posstate repair --dry-run`",
                kind="journal",
            )
            return Current(loaded=loaded, state=state, error=err)
        if i == 0 and header.id_hex != snap.get("id"):
            if last > snap_seq:
                err = CorruptStateError(
                    path,
                    f"journal {header.id_hex} holds records up to {last}, but the snapshot (generation "
                    f"{loaded.state.generation}) belongs to journal {snap.get('id')} and holds only up to {snap_seq}",
                    next_step="a load moves this journal to quarantine and recovers; see what it would choose with "
                    "`posstate repair --dry-run`",
                    kind="journal",
                )
                return Current(loaded=loaded, state=state, error=err)
            # An older journal the snapshot holds in full: normal between a save and the next change.
            return Current(loaded=loaded, state=state)
        for rec, ops in records:
            if rec.seq <= snap_seq or not ops:  # not ops: a fold record, no change (journal/fold.py)
                continue
            for op in ops:
                jops.apply(state, {}, op)
                max_rev = max(max_rev, int(op.json["rev"]))
            applied += 1
            last_applied = rec.seq
            last_journal = header.id_hex
        if sc.bad_offset is not None:
            note = (
                f"torn last record ({sc.torn_bytes} bytes from byte {sc.good_end}: {sc.bad_reason}) ignored: "
                "a crash mid-append, never acknowledged; the next load cuts it off (after copying the journal to quarantine)"
            )
            notes = (*notes, note if path == config.journal_path else f"{path.name}: {note}")
            if i < len(chain) - 1:
                err = CorruptStateError(
                    path,
                    f"record at byte {sc.bad_offset} is damaged ({sc.bad_reason}) and a later segment follows",
                    next_step="see what a load would choose with `posstate repair --dry-run`",
                    kind="journal",
                )
                return Current(loaded=loaded, state=state, applied=applied, last_seq=last_applied, max_rev=max_rev, error=err)
    return Current(
        loaded=loaded,
        state=state,
        applied=applied,
        last_seq=last_applied,
        max_rev=max_rev,
        notes=notes,
        last_journal=last_journal,
    )
