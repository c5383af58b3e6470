"""``repair_state()``: fix a state file that decrypts but fails the schema or relationship checks.

Each position and metadata entry is judged on its own (the schema's rules through :class:`Position` and
the metadata checks). A valid entry is kept. An invalid one is taken from the newest valid backup that
holds it (``positions.json.bak`` and the timestamped backups, highest generation first); a backup that
shows the key deleted ends the search (the position was closed: it is dropped, never resurrected); a key
no backup holds is dropped. Every decision is reported. The original file goes to quarantine first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posstate.backup import backups as _backups
from posstate.core.config import StateConfig
from posstate.core.errors import CorruptStateError, PersistenceError, PosStateError, SchemaValidationError
from posstate.journal import files as _jfiles
from posstate.journal import records as _records
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.model.position import MAX_COUNTER, Position, PositionKey, parse_position_key
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage import statefile as _statefile

if TYPE_CHECKING:
    from posstate.backup.files import StateFiles

log = logging.getLogger("posstate")

Action = Literal["kept", "restored", "dropped"]


@dataclass(frozen=True, slots=True)
class RepairDecision:
    kind: Literal["position", "metadata", "tombstone", "journal"]
    key: str
    action: Action
    source: str  # "state file", "backup <id>", "positions.json.bak", or "" when dropped
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "action": self.action, "source": self.source, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What :meth:`PositionStateManager.repair_state` did; ``repaired`` is False when nothing was wrong."""

    repaired: bool
    decisions: tuple[RepairDecision, ...]
    rounds: int
    generation: int
    quarantined: Path | None = None
    problems: tuple[str, ...] = ()  # what made the file invalid, one per round

    def to_dict(self) -> dict[str, Any]:
        return {
            "repaired": self.repaired,
            "problems": list(self.problems),
            "rounds": self.rounds,
            "generation": self.generation,
            "quarantined": str(self.quarantined) if self.quarantined else None,
            "decisions": [d.to_dict() for d in self.decisions],
        }


def _rev(v: Any, generation: int) -> int:
    if type(v) is not int or not 0 <= v <= min(generation, MAX_COUNTER):
        raise ValueError(f"revision {v!r} is not an integer in 0..{generation}")
    return v


def _parse_position(key_text: Any, entry: Any, generation: int) -> tuple[PositionKey, Position, int]:
    if not isinstance(entry, dict) or set(entry) != {"rev", "position"}:
        raise ValueError("entry is not {rev, position}")
    raw = entry["position"]
    if not isinstance(raw, dict):
        raise ValueError("position is not an object")
    try:
        p = Position.from_dict(raw)
    except SchemaValidationError as exc:
        raise ValueError(f"{exc.json_path}: {exc.detail}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if key_text != f"{p.symbol}|{p.side}":
        raise ValueError(f"key does not match symbol {p.symbol!r} and side {p.side!r}")
    return p.key, p, _rev(entry["rev"], generation)


def _parse_metadata(sym: Any, entry: Any, generation: int) -> tuple[dict[str, Any], int]:
    if not isinstance(entry, dict) or set(entry) != {"rev", "data"}:
        raise ValueError("entry is not {rev, data}")
    try:
        data = _document.clean_metadata(sym, entry["data"])
    except SchemaValidationError as exc:
        raise ValueError(f"{exc.json_path}: {exc.detail}") from None
    return data, _rev(entry["rev"], generation)


def _lenient(doc: Any, header_generation: int, decisions: list[RepairDecision]) -> tuple[StateData, list[str], list[str]]:
    """The valid parts of *doc*; returns (state, invalid position keys, invalid metadata symbols)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("positions"), dict):
        raise CorruptStateError(
            None,
            "the document has no readable positions object",
            next_step="restore a backup with `posstate backups restore latest`",
            kind="invalid",
        )
    gen = doc.get("generation")
    generation = gen if type(gen) is int and 0 <= gen <= MAX_COUNTER else header_generation
    st = StateData(generation=generation)
    bad_p: list[str] = []
    for key_text, entry in doc["positions"].items():
        try:
            key, p, rev = _parse_position(key_text, entry, generation)
            if key in st.positions:
                raise ValueError("duplicate (symbol, side)")
        except ValueError as exc:
            bad_p.append(key_text)
            decisions.append(RepairDecision("position", key_text, "dropped", "", f"invalid in the state file: {exc}"))
            continue
        st.positions[key], st.position_revs[key] = p, rev
        decisions.append(RepairDecision("position", key_text, "kept", "state file", "valid"))
    bad_m: list[str] = []
    meta = doc.get("symbol_metadata")
    for sym, entry in meta.items() if isinstance(meta, dict) else ():
        try:
            st.metadata[sym], st.metadata_revs[sym] = _parse_metadata(sym, entry, generation)
        except ValueError as exc:
            bad_m.append(sym)
            decisions.append(RepairDecision("metadata", sym, "dropped", "", f"invalid in the state file: {exc}"))
            continue
        decisions.append(RepairDecision("metadata", sym, "kept", "state file", "valid"))
    tombs = doc.get("tombstones")
    tp = tombs.get("positions") if isinstance(tombs, dict) else None
    for key_text, r in tp.items() if isinstance(tp, dict) else ():
        k = parse_position_key(key_text) if isinstance(key_text, str) else None
        if (
            k is None
            or k[1] not in ("long", "short")
            or not k[0]
            or type(r) is not int
            or not 0 <= r <= generation
            or k in st.positions
        ):
            decisions.append(
                RepairDecision("tombstone", str(key_text), "dropped", "", "invalid, or conflicts with a live position")
            )
            continue
        st.position_tombstones[k] = r
    tm = tombs.get("symbol_metadata") if isinstance(tombs, dict) else None
    for sym, r in tm.items() if isinstance(tm, dict) else ():
        if type(r) is not int or not 0 <= r <= generation or sym in st.metadata:
            decisions.append(RepairDecision("tombstone", str(sym), "dropped", "", "invalid, or conflicts with live metadata"))
            continue
        st.metadata_tombstones[sym] = r
    acc = doc.get("account")
    jr = doc.get("journal")
    if isinstance(jr, dict) and set(jr) == {"id", "seq"} and isinstance(jr["id"], str) and type(jr["seq"]) is int:
        st.journal = dict(jr)
    if (
        isinstance(acc, dict)
        and set(acc) == {"exchange", "account_id", "mode"}
        and all(isinstance(v, str) and v for v in acc.values())
    ):
        st.account = dict(acc)
    return st, bad_p, bad_m


def _sources(cfg: StateConfig, options: _statefile.ReadOptions) -> list[tuple[str, StateData]]:
    """Valid copies to take entries from, highest generation first."""
    out: list[tuple[str, StateData]] = []
    paths = [(cfg.bak_path.name, cfg.bak_path)] + [
        (f"backup {bid}", cfg.backup_path / _backups.file_name(bid)) for bid, _ in _backups.names_only(cfg.backup_path)
    ]
    for name, path in paths:
        try:
            out.append((name, _statefile.read(path, options=options).state))
        except PosStateError:
            continue
    out.sort(key=lambda s: s[1].generation, reverse=True)
    return out


def _fill(
    st: StateData, bad_p: list[str], bad_m: list[str], sources: list[tuple[str, StateData]], decisions: list[RepairDecision]
) -> None:
    for key_text in bad_p:
        key = parse_position_key(key_text) if isinstance(key_text, str) else ("", "long")
        if key in st.positions:
            continue  # a valid entry under the same (symbol, side) was kept
        for name, src in sources:
            if key in src.positions:
                st.positions[key] = src.positions[key]
                st.position_revs[key] = src.position_revs.get(key, 0)
                decisions.append(
                    RepairDecision("position", key_text, "restored", name, f"taken from {name} (generation {src.generation})")
                )
                break
            if key in src.position_tombstones:
                decisions.append(RepairDecision("position", key_text, "dropped", name, f"closed in {name}; not resurrected"))
                break
        else:
            decisions.append(RepairDecision("position", key_text, "dropped", "", "no valid backup holds it"))
    for sym in bad_m:
        for name, src in sources:
            if sym in src.metadata:
                st.metadata[sym] = src.metadata[sym]
                st.metadata_revs[sym] = src.metadata_revs.get(sym, 0)
                decisions.append(
                    RepairDecision("metadata", sym, "restored", name, f"taken from {name} (generation {src.generation})")
                )
                break
            if sym in src.metadata_tombstones:
                decisions.append(RepairDecision("metadata", sym, "dropped", name, f"deleted in {name}; not resurrected"))
                break
        else:
            decisions.append(RepairDecision("metadata", sym, "dropped", "", "no valid backup holds it"))


def repair(files: StateFiles) -> RepairReport:
    """See the module docstring. Raises what decoding raises when the file does not even decrypt."""
    cfg = files.config
    path = cfg.state_path
    rounds = max(1, cfg.repair_attempts)
    decisions: list[RepairDecision] = []
    problems: list[str] = []
    quarantined: Path | None = None
    for round_no in range(1, rounds + 1):
        data = _statefile.read_bytes(path)
        header, payload = _codec.decode(
            data, keyring=files.read.keyring, path=path, max_document_bytes=files.read.max_document_bytes
        )
        doc = _document.loads(payload, path=path, strict=not header.encrypted)
        try:
            loaded = _statefile.parse(data, path=path, options=files.read)
        except SchemaValidationError as exc:
            problem = f"{exc.json_path}: {exc.detail}"
        else:
            return RepairReport(
                repaired=round_no > 1,
                decisions=tuple(decisions),
                rounds=round_no - 1,
                generation=loaded.state.generation,
                quarantined=quarantined,
                problems=tuple(problems),
            )
        problems.append(problem)
        st, bad_p, bad_m = _lenient(doc, header.generation, decisions)
        _fill(st, bad_p, bad_m, _sources(cfg, files.read) if (bad_p or bad_m) else [], decisions)
        if st.account is None and cfg.exchange is not None:
            st.account = {
                "exchange": cfg.exchange,
                "account_id": str(cfg.account_id),
                "mode": cfg.account_mode or "live",
            }
        chain = _jfiles.segment_chain(cfg.journal_path, cfg.legacy_journal_path, st.journal)  # issue 14: segments
        jpath = next((p for p in chain if fs.exists(p)), chain[0])
        if st.journal is not None and any(fs.exists(p) for p in chain):
            # Changes acknowledged in the journal after this snapshot are part of the state: replay the
            # trustworthy ones onto the repaired snapshot (every segment, in order), then keep the files as evidence.
            applied, max_rev, stopped = _records.replay_chain(
                chain, keyring=files.read.keyring, state=st, require_encryption=files.read.require_encryption
            )
            files.raise_generation(max_rev - 1)
            why = f"{applied} journal records replayed onto the repaired snapshot" + (
                f" (stopped at {stopped})" if stopped else ""
            )
            decisions.append(RepairDecision("journal", jpath.name, "kept", jpath.name, why))
        for jp in _jfiles.journal_files_of(cfg.journal_path, cfg.legacy_journal_path, [st.journal]):
            try:
                _atomic.move_aside(jp, cfg.quarantine_dir, label="journal")
            except OSError as exc:
                raise PersistenceError(jp, operation="quarantine journal before repair", cause=exc) from exc
        files.journal.recover(StateData())  # no journal file now: the save below starts a new one
        try:
            moved = _atomic.move_aside(path, cfg.quarantine_dir, label="repair")
        except OSError as exc:
            raise PersistenceError(path, operation="quarantine before repair", cause=exc) from exc
        quarantined = quarantined or moved
        files.raise_generation(max(header.generation, st.generation))
        try:
            new_gen = files.commit(*files.adopt(st, None))
        except BaseException:
            files.set_loaded(False)
            raise
        report = RepairReport(
            repaired=True,
            decisions=tuple(decisions),
            rounds=round_no,
            generation=new_gen,
            quarantined=quarantined,
            problems=tuple(problems),
        )
        files.emit(
            "stateRepaired",
            {
                "path": str(path),
                "operation": "repair",
                "generation": new_gen,
                "round": round_no,
                "kept": sum(d.action == "kept" for d in decisions),
                "restored": sum(d.action == "restored" for d in decisions),
                "dropped": sum(d.action == "dropped" for d in decisions),
                "problem": problems[0],
            },
        )
        try:
            _statefile.read(path, options=files.read)
        except PosStateError:
            continue  # another round on what was written
        return report
    files.emit("recoveryError", {"path": str(path), "reason": f"still invalid after {rounds} repair rounds"})
    raise CorruptStateError(path, f"still invalid after {rounds} repair rounds", kind="invalid")


@dataclass(frozen=True, slots=True)
class RepairPlan:
    """What :func:`repair` would decide in its first round (:func:`plan`); nothing was written.

    ``problem`` is None when the file passes every check (nothing to repair).
    """

    problem: str | None
    generation: int
    decisions: tuple[RepairDecision, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"problem": self.problem, "generation": self.generation, "decisions": [d.to_dict() for d in self.decisions]}


def plan(cfg: StateConfig, options: _statefile.ReadOptions) -> RepairPlan:
    """Dry run of :func:`repair`'s first round: the same per-entry decisions, computed from the state file
    and the backups; reads only (no lock, no quarantine, no write). Raises what decoding raises when the
    file does not even decrypt."""
    path = cfg.state_path
    data = _statefile.read_bytes(path)
    header, payload = _codec.decode(data, keyring=options.keyring, path=path, max_document_bytes=options.max_document_bytes)
    doc = _document.loads(payload, path=path, strict=not header.encrypted)
    try:
        loaded = _statefile.parse(data, path=path, options=options)
    except SchemaValidationError as exc:
        problem = f"{exc.json_path}: {exc.detail}"
    else:
        return RepairPlan(None, loaded.state.generation, ())
    decisions: list[RepairDecision] = []
    st, bad_p, bad_m = _lenient(doc, header.generation, decisions)
    _fill(st, bad_p, bad_m, _sources(cfg, options) if (bad_p or bad_m) else [], decisions)
    return RepairPlan(problem, header.generation, tuple(decisions))
