"""Text and JSON rendering for the command line: tables, validation reports, diffs, backups, repair and
reconcile reports. No click, no I/O."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import orjson

from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport
from posstate.backup.backups import BackupInfo
from posstate.backup.repair import RepairDecision
from posstate.backup.retention import PruneResult
from posstate.core.errors import MissingKeyError, UnsupportedVersionError, WrongKeyError
from posstate.model.document import StateData
from posstate.model.position import DECIMAL_FIELDS, Position, PositionKey, position_key_text

# The JSON shapes the CLI shares with the HTTP API live one layer down (posstate/serve/shapes.py).
from posstate.serve.shapes import backup_json as backup_json
from posstate.serve.shapes import to_json as to_json
from posstate.storage.validate import ValidationReport


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, right: frozenset[int] = frozenset()) -> list[str]:
    """Aligned columns laid out by rich (issue 15.10: a kept library, not hand padding): two spaces between
    columns, a dashed line under the headers, columns whose index is in *right* right-aligned. Plain text
    (no colour, no markup: a symbol such as ``[x]`` is printed as it is), never wrapped or cut."""
    import io

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=_dashed_box(), show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style="", highlight=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*(Text(c) for c in r))
    buf = io.StringIO()
    console = Console(
        file=buf, width=_UNLIMITED, color_system=None, force_terminal=False, highlight=False, emoji=False, markup=False
    )
    console.print(t)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


@functools.cache
def _dashed_box() -> Any:
    from rich.box import Box

    # rich's box spec: eight rows of four characters (edges, horizontal, divider); only the header rule is drawn.
    return Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


_UNLIMITED = 100_000  # characters: a table is never wrapped or cut to a terminal's width


def _num(value: Decimal | None) -> str:
    return "-" if value is None else str(value)


POSITION_COLUMNS = ("symbol", "side", "contracts", "entry", "mark", "uPnL", "leverage")


def position_rows(positions: Mapping[PositionKey, Position]) -> list[list[str]]:
    return [
        [p.symbol, p.side, _num(p.contracts), _num(p.entry_price), _num(p.mark_price), _num(p.unrealized_pnl), _num(p.leverage)]
        for _, p in sorted(positions.items())
    ]


def show_lines(path: str, state: StateData, *, symbol: str | None, journal_records: int | None = None) -> list[str]:
    """The text of ``posstate show``: a summary line, the positions table, the symbol metadata.

    *journal_records*: how many journal records were replayed onto the snapshot (None: not a state file
    with a journal, e.g. a backup)."""
    positions = {k: p for k, p in state.positions.items() if symbol is None or k[0] == symbol}
    metadata = {s: d for s, d in state.metadata.items() if symbol is None or s == symbol}
    writer = state.writer
    lines = [
        f"{path}: generation {state.generation}, written {state.written_at} by pid {writer.get('pid')} on "
        f"{writer.get('host')} (posstate {writer.get('version')})"
    ]
    if journal_records:
        plural = "s" if journal_records != 1 else ""
        lines.append(f"journal: {journal_records} change record{plural} since that snapshot, replayed (as a restart loads them)")
    elif journal_records == 0:
        lines.append("journal: no changes since that snapshot")
    if state.account:
        lines.append(
            f"account: {state.account.get('account_id')} on {state.account.get('exchange')} ({state.account.get('mode')})"
        )
    lines.append("")
    if positions:
        lines += table(POSITION_COLUMNS, position_rows(positions), right=frozenset({2, 3, 4, 5, 6}))
    else:
        lines.append("no open positions" + (f" for {symbol}" if symbol else ""))
    lines.append("")
    if metadata:
        lines.append("symbol metadata:")
        for sym in sorted(metadata):
            lines.append(f"  {sym}: {orjson.dumps(metadata[sym], option=orjson.OPT_SORT_KEYS).decode()}")
    else:
        lines.append("no symbol metadata" + (f" for {symbol}" if symbol else ""))
    if state.bot_metadata is not None and symbol is None:
        lines.append(f"bot metadata: {orjson.dumps(state.bot_metadata, option=orjson.OPT_SORT_KEYS).decode()}")
    return lines


def filter_document(doc: Any, symbol: str) -> Any:
    """The state document with only *symbol*'s positions and metadata (for ``show --symbol --json``)."""
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    if isinstance(doc.get("positions"), dict):
        out["positions"] = {k: v for k, v in doc["positions"].items() if k.rsplit("|", 1)[0] == symbol}
    if isinstance(doc.get("symbol_metadata"), dict):
        out["symbol_metadata"] = {k: v for k, v in doc["symbol_metadata"].items() if k == symbol}
    return out


# ------------------------------------------------------------------------------------------ validate
def _verdict(ok: bool | None) -> str:
    return "ok" if ok else ("-" if ok is None else "FAIL")


def validate_lines(report: ValidationReport, *, replayed: int = 0) -> list[str]:
    """Each check with its verdict, then one summary line (*replayed*: journal records a load adds to the file)."""
    lines = [report.path]
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        lines.append(f"  {_verdict(c.ok):<4}  {c.name:<{width}}  {c.detail}".rstrip())
    for issue in report.errors[1:]:
        lines.append(f"        also: {issue.path}: {issue.message}")
    if report.valid:
        extra = f", key id {report.key_id}" if report.key_id else ""
        if replayed:  # the figures are the snapshot's; `show` lists the state a restart loads
            extra += f"; the snapshot, + {replayed} journal record{'s' if replayed != 1 else ''} a load replays (`posstate show`)"
        lines.append(f"VALID: generation {report.generation}, {report.positions} positions{extra}")
    elif report.error is None and not report.contents_checked:
        lines.append("NOT CHECKED: header and checksum are fine, but without a key the contents were NOT checked")
    else:
        lines.append("INVALID")
    return lines


# ------------------------------------------------------------------------------------------ diff
@dataclass(frozen=True, slots=True)
class StateDiff:
    added: dict[PositionKey, Position]
    removed: dict[PositionKey, Position]
    changed: dict[PositionKey, dict[str, tuple[Any, Any]]]
    meta_added: dict[str, dict[str, Any]]
    meta_removed: dict[str, dict[str, Any]]
    meta_changed: dict[str, dict[str, tuple[Any, Any]]]
    #: Bot-wide metadata (issue 15.7), key by key (a side that has none counts as empty).
    bot_changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.changed
            or self.meta_added
            or self.meta_removed
            or self.meta_changed
            or self.bot_changed
        )


_MISSING = object()


def _fields(p: Position) -> dict[str, Any]:
    return p.to_dict()


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, _MISSING), new.get(name, _MISSING)
        if a != b or type(a) is not type(b):
            out[name] = (None if a is _MISSING else a, None if b is _MISSING else b)
    return out


def diff_states(a: StateData, b: StateData) -> StateDiff:
    """What changed from *a* to *b*: positions by (symbol, side) field by field, metadata key by key."""
    changed = {}
    for k in sorted(a.positions.keys() & b.positions.keys()):
        delta = _changes(_fields(a.positions[k]), _fields(b.positions[k]))
        if delta:
            changed[k] = delta
    meta_changed = {}
    for s in sorted(a.metadata.keys() & b.metadata.keys()):
        delta = _changes(a.metadata[s], b.metadata[s])
        if delta:
            meta_changed[s] = delta
    return StateDiff(
        added={k: b.positions[k] for k in sorted(b.positions.keys() - a.positions.keys())},
        removed={k: a.positions[k] for k in sorted(a.positions.keys() - b.positions.keys())},
        changed=changed,
        meta_added={s: b.metadata[s] for s in sorted(b.metadata.keys() - a.metadata.keys())},
        meta_removed={s: a.metadata[s] for s in sorted(a.metadata.keys() - b.metadata.keys())},
        meta_changed=meta_changed,
        bot_changed=_changes(a.bot_metadata or {}, b.bot_metadata or {}),
    )


def _brief(p: Position) -> str:
    d = _fields(p)
    rest = " ".join(f"{n}={d[n]}" for n in DECIMAL_FIELDS if n in d)
    return f"{p.symbol} {p.side}  {rest}"


def _compact(value: Any) -> str:
    return "(absent)" if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def diff_lines(d: StateDiff, *, a_label: str, b_label: str) -> list[str]:
    lines = [f"--- {a_label}", f"+++ {b_label}"]
    if d.identical:
        lines.append("no differences in positions or symbol metadata")
        return lines
    for p in d.added.values():
        lines.append(f"+ {_brief(p)}")
    for p in d.removed.values():
        lines.append(f"- {_brief(p)}")
    for k, delta in d.changed.items():
        lines.append(f"~ {k[0]} {k[1]}")
        lines += [f"    {name}: {_compact(old)} -> {_compact(new)}" for name, (old, new) in delta.items()]
    if d.meta_added or d.meta_removed or d.meta_changed:
        lines.append("symbol metadata:")
        lines += [f"+ {s}: {_compact(v)}" for s, v in d.meta_added.items()]
        lines += [f"- {s}: {_compact(v)}" for s, v in d.meta_removed.items()]
        for s, delta in d.meta_changed.items():
            lines.append(f"~ {s}")
            lines += [f"    {name}: {_compact(old)} -> {_compact(new)}" for name, (old, new) in delta.items()]
    if d.bot_changed:
        lines.append("bot metadata:")
        lines += [f"    {name}: {_compact(old)} -> {_compact(new)}" for name, (old, new) in d.bot_changed.items()]
    return lines


def diff_json(d: StateDiff, *, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    def fields(delta: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
        return {name: {"old": old, "new": new} for name, (old, new) in delta.items()}

    return {
        "a": dict(a),
        "b": dict(b),
        "identical": d.identical,
        "positions": {
            "added": [p.to_dict() for p in d.added.values()],
            "removed": [p.to_dict() for p in d.removed.values()],
            "changed": [
                {"key": position_key_text(k), "symbol": k[0], "side": k[1], "fields": fields(v)} for k, v in d.changed.items()
            ],
        },
        "symbol_metadata": {
            "added": dict(d.meta_added),
            "removed": dict(d.meta_removed),
            "changed": {s: fields(v) for s, v in d.meta_changed.items()},
        },
        "bot_metadata": {"changed": fields(d.bot_changed)},
    }


# ------------------------------------------------------------------------------------------ backups
def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def backup_verdict(info: BackupInfo) -> str:
    """``yes`` (header and checksum hold), ``DAMAGED`` (corrupt on disk) or ``no`` (unreadable here)."""
    return "yes" if info.valid else ("DAMAGED" if info.damaged else "no")


def backups_table(infos: Sequence[BackupInfo]) -> list[str]:
    """``posstate backups list``: newest first; a backup that is not valid says why."""
    rows = [
        [
            b.id,
            _when(b.created_at),
            _opt(b.generation),
            _opt(b.position_count),
            str(b.size),
            backup_verdict(b),
            b.reason,
        ]
        for b in infos
    ]
    return table(("id", "created_at (UTC)", "generation", "positions", "size", "valid", "note"), rows, right=frozenset({2, 3, 4}))


def verdict_lines(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """``  verdict  id  detail`` lines with the id column as wide as the longest id: a ``_2`` id (two backups
    in one second) does not shift the detail column (newcomer leftovers 4)."""
    width = max((len(i) for _, i, _ in rows), default=0)
    return [f"  {v:<11}  {i:<{width}}  {d}" for v, i, d in rows]


def prune_lines(result: PruneResult) -> list[str]:
    """Every backup with what retention does (or would do) with it, and why; then a summary line."""
    dry = result.dry_run
    verbs = {"keep": "keep", "remove": "remove" if dry else "removed", "quarantine": "quarantine" if dry else "quarantined"}
    lines = verdict_lines([(verbs[d.action], d.backup.id, d.reason) for d in result.decisions])
    counts = f"{len(result.kept)} kept, {len(result.removed)} removed, {len(result.quarantined)} quarantined"
    lines.append(f"dry run: would leave {counts}; nothing was changed" if dry else counts)
    return lines


VerifyVerdict = Literal["ok", "DAMAGED", "KEY", "NEWER", "NOT CHECKED"]


def verify_verdict(report: ValidationReport) -> tuple[VerifyVerdict, str]:
    """One backup's verdict for ``backups verify`` and a short detail."""
    if report.valid:
        return "ok", f"generation {report.generation}, {report.positions} positions"
    err = report.error
    if isinstance(err, (WrongKeyError, MissingKeyError)):
        return "KEY", str(err).split("; ")[0]
    if isinstance(err, UnsupportedVersionError):
        return "NEWER", str(err).split("; ")[0]
    if err is None and not report.contents_checked:
        return "NOT CHECKED", "header and checksum fine; no key, contents not checked"
    detail = report.errors[0].message if report.errors else (str(err).split("; ")[0] if err else "failed a check")
    return "DAMAGED", detail


# ------------------------------------------------------------------------------------------ repair
def candidate_lines(candidates: Iterable[Sequence[str]]) -> list[str]:
    return [f"  {name}: {verdict}" for name, verdict in candidates]


def repair_decision_lines(decisions: Iterable[RepairDecision]) -> list[str]:
    out = []
    for d in decisions:
        where = f" from {d.source}" if d.action == "restored" else ""
        out.append(f"  {d.action:<8}  {d.kind} {d.key}{where}: {d.reason}")
    return out


# ------------------------------------------------------------------------------------------ reconcile
RECONCILE_COLUMNS = ("difference", "symbol", "side", "local contracts", "exchange contracts", "local entry", "exchange entry")


def reconcile_rows(report: ReconciliationReport) -> list[list[str]]:
    """One row per difference, in the order: missing, stale, size, within tolerance, side, entry price."""
    rows: list[list[str]] = []
    for p in report.missing_locally:
        rows.append(["missing locally", p.symbol, p.side, "-", str(p.contracts), "-", str(p.entry_price)])
    for p in report.stale_locally:
        rows.append(["stale locally", p.symbol, p.side, str(p.contracts), "-", str(p.entry_price), "-"])
    for m in report.size_mismatches:
        rows.append(["size mismatch", m.symbol, m.side, str(m.local_contracts), str(m.exchange_contracts), "", ""])
    for m in report.size_within_tolerance:
        rows.append(["size (within tolerance)", m.symbol, m.side, str(m.local_contracts), str(m.exchange_contracts), "", ""])
    for s in report.side_mismatches:
        for p in s.local:
            rows.append(["side mismatch (local)", s.symbol, p.side, str(p.contracts), "-", str(p.entry_price), "-"])
        for p in s.exchange:
            rows.append(["side mismatch (exchange)", s.symbol, p.side, "-", str(p.contracts), "-", str(p.entry_price)])
    for e in report.entry_price_differences:
        rows.append(["entry price", e.symbol, e.side, "", "", str(e.local_entry_price), str(e.exchange_entry_price)])
    return rows


def reconcile_lines(report: ReconciliationReport, *, state: str, exchange: str) -> list[str]:
    """``posstate reconcile``: a summary line, the differences table, the verdict."""
    lines = [
        f"{state} vs {exchange}: {len(report.exchange_positions)} open exchange positions "
        f"({report.skipped_flat} flat skipped); tolerance {report.tolerance} contracts, "
        f"price tolerance {report.price_tolerance}",
        "",
    ]
    rows = reconcile_rows(report)
    if rows:
        lines += table(RECONCILE_COLUMNS, rows, right=frozenset({3, 4, 5, 6}))
        lines.append("")
    lines.append("IN SYNC" if report.in_sync else "OUT OF SYNC")
    return lines


def applied_lines(applied: AppliedReconciliation, generation: int | None) -> list[str]:
    def keys(ks: Iterable[PositionKey]) -> str:
        return ", ".join(f"{s} {side}" for s, side in ks) or "none"

    lines = [f"  added:   {keys(applied.added)}", f"  removed: {keys(applied.removed)}", f"  updated: {keys(applied.updated)}"]
    lines.append(f"saved as generation {generation}" if generation is not None else "nothing to save: the state already matched")
    return lines
