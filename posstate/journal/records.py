"""Journal records: how a change becomes a record's payload, and how records are read back, authenticated and
replayed onto a snapshot. The writer (journal.py) encodes with :func:`encode`; a load (recover.py), recovery,
repair and the read-only views replay with :func:`read_records` / :func:`replay_prefix`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.journal import fold as _fold
from posstate.journal import format as jf
from posstate.journal.files import gap_after_missing
from posstate.model import ops as jops
from posstate.model.document import StateData
from posstate.model.ops import Op
from posstate.storage import fileops as fs
from posstate.storage.crypto import Keyring, key_id

log = logging.getLogger("posstate")

Mode = Literal["snapshot", "sync", "group"]
Emit = Callable[[str, dict[str, Any]], None]
# Records are written at an offset (pwrite), never with O_APPEND: they overwrite the zeros written ahead.
O_WRITE = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
O_RDWR = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_FIRST_PAD = 64 * 1024  # zeros written with a new journal's first record (see Journal._padding)


def encode(ops: Sequence[Op]) -> tuple[int, bytes]:
    """(record kind, payload) of one record holding *ops*: a JSON list of the operations, in order. One
    operation is a ``KIND_OP`` record, several (a transaction) a ``KIND_TRANSACTION`` record."""
    if len(ops) == 1:
        return jf.KIND_OP, orjson.dumps([ops[0].json])
    return jf.KIND_TRANSACTION, orjson.dumps([op.json for op in ops])


def decode(plain: bytes, rec: jf.RawRecord, *, path: Path) -> list[Op]:
    """The operations of a record's authenticated payload *plain*; CorruptStateError(kind="journal") when it
    is not a valid operation list (what :func:`encode` writes). A fold record (journal/fold.py) holds none."""
    if rec.kind == jf.KIND_FOLD:
        if _fold.decode_fold(plain) is None:
            raise _journal_error(path, f"record {rec.seq} is not a valid fold record")
        return []
    try:
        raw_ops = orjson.loads(plain)
    except orjson.JSONDecodeError:
        raise _journal_error(path, f"record {rec.seq} is not valid JSON") from None
    if type(raw_ops) is not list or not raw_ops or (rec.kind == jf.KIND_OP and len(raw_ops) != 1):
        raise _journal_error(path, f"record {rec.seq} holds no valid operation list")
    return [jops.from_json(j, path=path, seq=rec.seq) for j in raw_ops]


def _journal_error(path: Path, reason: str) -> CorruptStateError:
    return CorruptStateError(
        path,
        reason,
        next_step=(
            "the journal was kept as is; inspect it with `posstate validate`, "
            "or restore a backup with `posstate backups restore latest`"
        ),
        kind="journal",
    )


def read_records(
    data: bytes,
    *,
    path: Path,
    keyring: Keyring | None,
    require_encryption: bool = False,
    folds: list[tuple[int, int]] | None = None,
) -> tuple[jf.JournalHeader, list[tuple[jf.RawRecord, list[Op]]], jf.Scan]:
    """Parse, authenticate and validate a whole journal. Damage before the last record raises
    CorruptStateError(kind="journal"); a torn last record is reported in the returned Scan, not raised.
    With *require_encryption* (encryption on) a plaintext journal is WrongKeyError, as a plaintext state
    file is: anyone can write one, so its records are never trusted. A fold record comes with no operation;
    *folds* gets (sequence number, generation it names) of each."""
    try:
        header = jf.parse_header(data)
    except jf.JournalTooNew as exc:
        # Not damage: recovering from it would drop the records a newer posstate acknowledged.
        raise UnsupportedVersionError(path, what="journal format", found=exc.found, supported=jf.VERSION) from None
    except jf.JournalProblem as exc:
        raise _journal_error(path, str(exc)) from None
    _refuse_plain(header, path, require_encryption)
    sealer = jf.Sealer(header, _key_for(header, keyring, path))
    sc = jf.scan(data, header, sealer)
    if sc.bad_offset is not None and not sc.bad_is_tail:
        seq = sc.records[-1].seq + 1 if sc.records else header.base_seq + 1
        raise _journal_error(
            path,
            f"record {seq} at byte {sc.bad_offset} is damaged ({sc.bad_reason}), not a torn last record; replay stopped there",
        )
    out: list[tuple[jf.RawRecord, list[Op]]] = []
    for rec in sc.records:
        plain = sealer.open(rec)
        if plain is None:
            # The key id matched (_key_for), so this is not another key: the record was tampered with, or
            # (version 3) spliced from another copy of this journal. Damage: a load recovers the records before it.
            raise _journal_error(
                path,
                f"record {rec.seq} at byte {rec.offset} fails authentication (tampered with, or taken from another "
                "copy of this journal); replay stopped there",
            )
        out.append((rec, decode(plain, rec, path=path)))
        if folds is not None and rec.kind == jf.KIND_FOLD and (fold := _fold.decode_fold(plain)) is not None:
            folds.append((rec.seq, fold[0]))
    return header, out, sc


#: Fold records a read-only replay checks against the state it built (each costs a digest of the whole state).
MAX_FOLD_CHECKS = 4


@dataclass(frozen=True, slots=True)
class Replay:
    """What a read-only replay did: records applied, the highest revision applied (all segments, and the
    first segment alone), what stopped it ("" for nothing), and each fold record it reached after the
    snapshot (journal/fold.py): (generation, True when the state replayed so far has the digest it names)."""

    applied: int = 0
    max_rev: int = 0
    stopped: str = ""
    first_rev: int = 0
    folds: tuple[tuple[int, bool], ...] = ()

    @property
    def covered(self) -> int:
        """The highest generation a fold record shows the replayed state holds in full (0: none)."""
        return max((g for g, same in self.folds if same), default=0)

    @property
    def seen(self) -> int:
        """The highest generation a fold record names, whether or not the replay holds it (0: none)."""
        return max((g for g, _ in self.folds), default=0)


def replay_prefix(
    path: Path, *, keyring: Keyring | None, state: StateData, require_encryption: bool = False
) -> tuple[int, int, str]:
    """Apply to *state* the journal records that can be trusted, stopping at the first one that cannot.

    Read-only (for recovery, when the journal is damaged before its last record): returns (records applied,
    highest revision applied, what stopped the replay or ""). Nothing is applied when the journal belongs to
    another snapshot, its header cannot be read, or (*require_encryption*) it is not encrypted. A record is
    applied whole or not at all.
    """
    r = replay_detail([path], keyring=keyring, state=state, require_encryption=require_encryption, chain=False)
    return r.applied, r.max_rev, r.stopped


def replay_chain(
    paths: Sequence[Path], *, keyring: Keyring | None, state: StateData, require_encryption: bool = False
) -> tuple[int, int, str]:
    """:func:`replay_prefix` over the segments of a journal (issue 14, ``files.segment_chain``): the first
    file is the snapshot's journal, each later one must link to the one before it (format 4 header) and
    is replayed only when the one before it was replayed to its end. A first file missing (the snapshot's
    journal had no record past it) is skipped when the next one links to the snapshot's journal id."""
    r = replay_detail(paths, keyring=keyring, state=state, require_encryption=require_encryption)
    return r.applied, r.max_rev, r.stopped


def replay_detail(
    paths: Sequence[Path],
    *,
    keyring: Keyring | None,
    state: StateData,
    require_encryption: bool = False,
    chain: bool = True,
    folds: bool = False,
) -> Replay:
    """:func:`replay_chain` (or, *chain* False, :func:`replay_prefix` of ``paths[0]``) with what it did in
    full. With *folds*, each fold record reached is checked against the state replayed so far (O(state)
    once per fold record: recovery only); without, fold records are skipped."""
    applied = max_rev = first_rev = 0
    found: list[tuple[int, bool]] = []
    prev: jf.JournalHeader | bytes | None = None
    for i, path in enumerate(paths):
        if chain and i == 0 and len(paths) > 1 and not fs.exists(path):
            want = (state.journal or {}).get("id")
            prev = bytes.fromhex(want) if isinstance(want, str) else None
            continue
        a, r, stopped, header = _replay_one(
            path,
            keyring=keyring,
            state=state,
            require_encryption=require_encryption,
            after=prev,
            segment=i > 0,
            folds=found if folds else None,
        )
        applied += a
        max_rev = max(max_rev, r)
        if i == 0:
            first_rev = r
        if stopped:
            where = f" (segment {path.name})" if i > 0 else ""
            return Replay(applied, max_rev, stopped + where, first_rev, tuple(found))
        prev = header
    return Replay(applied, max_rev, "", first_rev, tuple(found))


def _replay_one(
    path: Path,
    *,
    keyring: Keyring | None,
    state: StateData,
    require_encryption: bool,
    after: jf.JournalHeader | bytes | None = None,
    segment: bool = False,
    folds: list[tuple[int, bool]] | None = None,
) -> tuple[int, int, str, jf.JournalHeader | None]:
    try:
        data = fs.read_file(path)
    except FileNotFoundError:
        return 0, 0, "no journal", None
    except OSError as exc:
        return 0, 0, f"journal unreadable ({exc.strerror or exc})", None
    try:
        header = jf.parse_header(data)
    except jf.JournalTooNew as exc:
        return 0, 0, str(exc), None
    except jf.JournalProblem as exc:
        return 0, 0, f"journal header damaged ({exc})", None
    snap = state.journal or {}
    if segment and isinstance(after, bytes):  # the snapshot's journal has no file: the segment must start at the snapshot
        gap = gap_after_missing(snap, path, header.base_seq)
        if gap is not None:
            return 0, 0, gap, None
    if segment:  # a later segment: it must continue the one replayed before it
        linked = (
            header.follows(after)
            if isinstance(after, jf.JournalHeader)
            else bool(after) and header.prev_link == (after or b"")[: jf.LINK_SIZE]
        )
        if not linked:
            return 0, 0, f"segment {header.id_hex} does not continue the journal before it", None
    elif header.id_hex != snap.get("id"):
        return 0, 0, f"journal {header.id_hex} belongs to another snapshot", None
    try:
        _refuse_plain(header, path, require_encryption)
        sealer = jf.Sealer(header, _key_for(header, keyring, path))
    except (MissingKeyError, WrongKeyError) as exc:
        return 0, 0, str(exc), None
    sc = jf.scan(data, header, sealer)
    snap_seq = int(snap.get("seq", 0))
    applied = max_rev = 0
    for rec in sc.records:
        plain = sealer.open(rec)
        if plain is None:
            return applied, max_rev, f"record {rec.seq} fails authentication", header
        if rec.kind == jf.KIND_FOLD:  # not a change: what the next snapshot held (journal/fold.py)
            fold = _fold.decode_fold(plain)
            if fold is None:
                return applied, max_rev, f"record {rec.seq} is not a valid fold record", header
            if folds is not None and rec.seq > snap_seq:
                # One digest is O(state): a genuine journal holds one or two fold records past a snapshot, a
                # planted plaintext one could hold thousands. Past the bound a fold record only names its
                # generation (seen, never "held": the count errs on the high side).
                held = len(folds) < MAX_FOLD_CHECKS and _fold.state_digest(state) == fold[1]
                folds.append((fold[0], held))
            continue
        try:
            raw_ops = orjson.loads(plain)
            if type(raw_ops) is not list or not raw_ops:
                raise ValueError("no operations")
            ops = [jops.from_json(j, path=path, seq=rec.seq) for j in raw_ops]
        except (ValueError, TypeError, CorruptStateError):
            return applied, max_rev, f"record {rec.seq} holds no valid operation list", header
        if rec.seq <= snap_seq:
            continue
        for op in ops:
            jops.apply(state, {}, op)
            max_rev = max(max_rev, int(op.json["rev"]))
        applied += 1
    if sc.bad_offset is not None:
        return applied, max_rev, f"byte {sc.bad_offset}: {sc.bad_reason}", header
    return applied, max_rev, "", header


def _refuse_plain(header: jf.JournalHeader, path: Path, require_encryption: bool) -> None:
    if require_encryption and not header.encrypted:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, downgrade=True)


def _key_for(header: jf.JournalHeader, keyring: Keyring | None, path: Path) -> bytes | None:
    if not header.encrypted:
        return None
    if keyring is None:
        raise MissingKeyError(path, reason=f"the journal is encrypted (key id {header.key_id}) and no key was supplied")
    if header.passphrase != keyring.uses_passphrase:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, given="key" if header.passphrase else "passphrase")
    key = keyring.key_for(header.salt, header.kdf_log2_n)
    ours = key_id(key)
    if ours != header.key_id:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=ours, passphrase=header.passphrase)
    return key
