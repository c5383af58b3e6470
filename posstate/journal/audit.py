"""Read-only views of the journal: the audit trail (:func:`history`) and the check ``validate`` runs (:func:`check`).

Records store only new values. Old values are reconstructed: :func:`history` loads the snapshot the journal
belongs to and replays the records in order, so each entry's ``old`` is the value just before that record.
Records the snapshot already contains (or a journal of another snapshot) have ``old_known=False``.
Nothing here writes, truncates or moves a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posstate.core.errors import CorruptStateError, PersistenceError, PosStateError, SchemaValidationError, StateNotFoundError
from posstate.journal import format as jf
from posstate.journal.files import gap_after_missing
from posstate.journal.records import read_records
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile
from posstate.storage.crypto import Keyring

if TYPE_CHECKING:
    from posstate.core.config import StateConfig


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change recorded in the journal. ``old``/``new`` are the document form (None: absent)."""

    seq: int
    time_ms: int
    op: str
    symbol: str
    side: str | None  # None for symbol metadata
    key: str  # "SYMBOL|side" for a position, "SYMBOL" for metadata
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    rev: int
    transaction: bool
    old_known: bool

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_ms / 1000, tz=timezone.utc)


@dataclass(frozen=True, slots=True)
class JournalCheck:
    """What :func:`check` found. ``valid`` is False for damage before the last record or a key problem;
    a torn last record (``torn_bytes`` > 0) is what a crash mid-append leaves and is cut off on the next load."""

    path: str
    exists: bool
    valid: bool
    contents_checked: bool
    journal_id: str | None = None
    base_generation: int | None = None
    base_seq: int | None = None
    records: int = 0
    folds: int = 0  # of ``records``, the fold records a durable save wrote (not changes; history leaves them out)
    last_seq: int | None = None
    torn_bytes: int = 0
    matches_snapshot: bool | None = None
    problem: str = ""
    newer_version: int | None = None  # the header is intact but of a journal format newer than this posstate

    @property
    def counted(self) -> str:
        """The record count in words, split when fold records are among it: a save's fold record is not a
        change, and ``history`` counts only change records (newcomer leftovers 1: validate said 3, history 2)."""
        if not self.folds:
            return f"{self.records} records"
        changes = self.records - self.folds
        return (
            f"{self.records} records ({changes} change record{'s' if changes != 1 else ''}, "
            f"{self.folds} fold record{'s' if self.folds != 1 else ''})"
        )


def _value(st: StateData, symbol: str, side: str | None, *, bot: bool = False) -> dict[str, Any] | None:
    if bot:  # set_bot_metadata: key_of() gives ("", None)
        return dict(st.bot_metadata) if st.bot_metadata is not None else None
    if side is None:
        found = st.metadata.get(symbol)
        return dict(found) if found is not None else None
    p = st.positions.get((symbol, side))  # type: ignore[arg-type]
    return dict(p.to_dict()) if p is not None else None


#: What to do about a journal path that cannot be read (a load refuses it the same way).
_UNREADABLE_JOURNAL = "move it away if it is not a journal (a bot's next load refuses it too), or fix permissions"


def history(
    config: StateConfig,
    *,
    keyring: Keyring | None = None,
    symbol: str | None = None,
    require_encryption: bool = False,
    path: Path | None = None,
    segments: Sequence[Path] = (),
) -> tuple[HistoryEntry, ...]:
    """The changes in the journal, oldest first (only those for *symbol* if given).

    Raises CorruptStateError(kind="journal") for damage before the last record; a torn last record is
    left out. Without a journal the history is empty. With *require_encryption* a plaintext journal (or
    state file) is WrongKeyError, as a load with encryption on refuses it. *path*: the journal file a load
    reads, when it is not ``config.journal_path`` (the old name, ``positions.journal``). *segments*: the
    journal's segments in order (``files.segment_chain``, issue 14), read instead of *path* when given.
    """

    paths = list(segments) if segments else [config.journal_path if path is None else path]
    header: jf.JournalHeader | None = None
    records: list[Any] = []
    gap_base: int | None = None  # the snapshot's journal has no file: where the segment after it starts
    for i, seg in enumerate(paths):  # the snapshot's journal, then a segment linked to it (issue 14)
        try:
            data = fs.read_file(seg)
        except FileNotFoundError:
            if i == 0 and len(paths) > 1:
                gap_base = -1
                continue
            break
        except OSError as exc:  # a FIFO, a directory, a device planted as the journal; a read error
            raise PersistenceError(
                seg, operation="read journal", cause=exc, outcome="nothing was changed", next_step=_UNREADABLE_JOURNAL
            ) from exc
        h, recs, _ = read_records(data, path=seg, keyring=keyring, require_encryption=require_encryption)
        gap_base = h.base_seq if gap_base == -1 else gap_base
        header = header or h
        records.extend(recs)
    if header is None:
        return ()
    st: StateData | None = None
    snap_seq = 0
    try:
        loaded = _statefile.read(
            config.state_path,
            options=_statefile.ReadOptions(
                keyring=keyring,
                max_document_bytes=config.max_document_bytes,
                clock_skew=config.clock_skew,
                require_encryption=require_encryption,
            ),
        )
        gap = gap_after_missing(loaded.state.journal, paths[1], gap_base) if gap_base is not None else None
        if loaded.state.journal is not None and loaded.state.journal.get("id") == header.id_hex:
            st = loaded.state
            snap_seq = int(loaded.state.journal["seq"])
    except (StateNotFoundError, CorruptStateError, SchemaValidationError):
        gap = None  # no usable snapshot: the changes are still listed, with old values unknown
    if gap is not None:  # issue 15 attack: the snapshot's journal is missing and the segment starts past it
        raise CorruptStateError(
            paths[1], gap, next_step="see what a load would recover with `posstate repair --dry-run`", kind="journal"
        )
    out: list[HistoryEntry] = []
    for rec, ops in records:
        known = st is not None and rec.seq > snap_seq
        for op in ops:
            sym, side = jops.key_of(op)
            name = op.json["op"]
            old = _value(st, sym, side, bot=name == jops.SET_BOT_METADATA) if known and st is not None else None
            if known and st is not None:
                jops.apply(st, {}, op)
            if name == jops.SET_POSITION:
                assert op.position is not None
                new: dict[str, Any] | None = dict(op.position.to_dict())
            elif name in (jops.SET_METADATA, jops.SET_BOT_METADATA):
                new = dict(op.json["data"])
            else:
                new = None
            if symbol is not None and sym != symbol:
                continue
            out.append(
                HistoryEntry(
                    seq=rec.seq,
                    time_ms=rec.time_ms,
                    op=name,
                    symbol=sym,
                    side=side,
                    key=f"{sym}|{side}" if side is not None else sym,
                    old=old,
                    new=new,
                    rev=op.json["rev"],
                    transaction=rec.kind == jf.KIND_TRANSACTION,
                    old_known=known,
                )
            )
    return tuple(out)


def check(
    path: Path, *, keyring: Keyring | None, snapshot_journal: dict[str, Any] | None = None, require_encryption: bool = False
) -> JournalCheck:
    """Check a journal file without changing it (for ``posstate validate``). Never raises for bad content.
    With *require_encryption* a plaintext journal is not valid (a load with encryption on refuses it)."""

    try:
        data = fs.read_file(path)
    except FileNotFoundError:
        return JournalCheck(path=str(path), exists=False, valid=True, contents_checked=False)
    except OSError as exc:
        return JournalCheck(path=str(path), exists=True, valid=False, contents_checked=False, problem=f"cannot read ({exc})")
    try:
        header = jf.parse_header(data)
    except jf.JournalTooNew as exc:
        return JournalCheck(
            path=str(path), exists=True, valid=False, contents_checked=False, problem=str(exc), newer_version=exc.found
        )
    except jf.JournalProblem as exc:
        return JournalCheck(path=str(path), exists=True, valid=False, contents_checked=False, problem=str(exc))
    matches = None if snapshot_journal is None else snapshot_journal.get("id") == header.id_hex

    def report(
        *, valid: bool, checked: bool, sc: jf.Scan | None, records: int, last: int | None, problem: str = ""
    ) -> JournalCheck:
        torn = sc.torn_bytes if sc is not None and sc.bad_offset is not None and sc.bad_is_tail else 0
        folds = sum(1 for r in sc.records if r.kind == jf.KIND_FOLD) if sc is not None and records else 0
        return JournalCheck(
            path=str(path),
            exists=True,
            valid=valid,
            contents_checked=checked,
            journal_id=header.id_hex,
            base_generation=header.base_generation,
            base_seq=header.base_seq,
            records=records,
            folds=folds,
            last_seq=last,
            torn_bytes=torn,
            matches_snapshot=matches,
            problem=problem,
        )

    if header.encrypted and keyring is None:
        sc = jf.scan(data, header)
        ok = sc.bad_offset is None or sc.bad_is_tail
        last = sc.records[-1].seq if sc.records else header.base_seq
        return report(
            valid=ok,
            checked=False,
            sc=sc,
            records=len(sc.records),
            last=last,
            problem="" if ok else f"damage at byte {sc.bad_offset}: {sc.bad_reason}",
        )
    try:
        _, recs, sc = read_records(data, path=path, keyring=keyring, require_encryption=require_encryption)
    except PosStateError as exc:
        return report(valid=False, checked=True, sc=None, records=0, last=None, problem=str(exc))
    return report(valid=True, checked=True, sc=sc, records=len(recs), last=recs[-1][0].seq if recs else header.base_seq)
