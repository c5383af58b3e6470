"""Deterministic merge of two states by per-entry revision, with tombstones; tombstone housekeeping.

Every position and every symbol's metadata carries ``rev``, the generation at which it last changed; a
deletion leaves a tombstone holding the generation of the deletion. For each key the entry (live or
tombstone) with the higher revision wins and a tie goes to ``current``. So a merge never resurrects a
position that a newer state closed (its tombstone outranks the older live entry) and never drops one the
newer state holds (its live entry outranks the older tombstone).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from posstate.model.document import StateData
from posstate.model.position import Position, PositionKey, position_key_text

Source = Literal["current", "backup", "both"]
Outcome = Literal["live", "deleted"]


@dataclass(frozen=True, slots=True)
class MergeDecision:
    """The verdict for one key: where the winning entry came from and why."""

    kind: Literal["position", "metadata", "bot_metadata"]
    key: str
    source: Source
    outcome: Outcome
    rev: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "source": self.source,
            "outcome": self.outcome,
            "rev": self.rev,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The merged state (a new object; neither input is changed) and one decision per key."""

    state: StateData
    decisions: tuple[MergeDecision, ...]

    @property
    def changed(self) -> tuple[MergeDecision, ...]:
        """Decisions that took something from the backup."""
        return tuple(d for d in self.decisions if d.source == "backup")


def _entry(
    live: Mapping[Any, Any], revs: Mapping[Any, int], tombs: Mapping[Any, int], key: Hashable
) -> tuple[int, bool, Any] | None:
    if key in live:
        return (revs.get(key, 0), True, live[key])
    if key in tombs:
        return (tombs[key], False, None)
    return None


def _describe(e: tuple[int, bool, Any] | None) -> str:
    if e is None:
        return "absent"
    return f"{'live' if e[1] else 'tombstone'} rev {e[0]}"


def _pick(cur: tuple[int, bool, Any] | None, bak: tuple[int, bool, Any] | None) -> tuple[Source, tuple[int, bool, Any], str]:
    if bak is None:
        assert cur is not None
        return "current", cur, "only in current"
    if cur is None:
        return "backup", bak, "only in backup"
    if cur[:2] == bak[:2] and cur[2] == bak[2]:
        return "both", cur, "same in both"
    if bak[0] > cur[0]:
        return "backup", bak, f"backup {_describe(bak)} is newer than current {_describe(cur)}"
    if bak[0] == cur[0]:
        return "current", cur, f"same rev {cur[0]} in both but different; tie goes to current"
    return "current", cur, f"current {_describe(cur)} is newer than backup {_describe(bak)}"


def merge_states(current: StateData, backup: StateData) -> MergeResult:
    """Merge *backup* into *current* entry by entry; see the module docstring for the rule."""
    out = StateData(
        generation=max(current.generation, backup.generation),
        written_at=current.written_at,
        writer=dict(current.writer),
        account=dict(current.account) if current.account is not None else (dict(backup.account) if backup.account else None),
        journal=dict(current.journal) if current.journal is not None else None,
    )
    decisions: list[MergeDecision] = []
    pkeys: set[PositionKey] = (
        set(current.positions) | set(current.position_tombstones) | set(backup.positions) | set(backup.position_tombstones)
    )
    for key in sorted(pkeys):
        cur = _entry(current.positions, current.position_revs, current.position_tombstones, key)
        bak = _entry(backup.positions, backup.position_revs, backup.position_tombstones, key)
        source, (rev, live, value), reason = _pick(cur, bak)
        if live:
            assert isinstance(value, Position)
            out.positions[key] = value
            out.position_revs[key] = rev
        else:
            out.position_tombstones[key] = rev
        decisions.append(MergeDecision("position", position_key_text(key), source, "live" if live else "deleted", rev, reason))
    mkeys: set[str] = (
        set(current.metadata) | set(current.metadata_tombstones) | set(backup.metadata) | set(backup.metadata_tombstones)
    )
    for sym in sorted(mkeys):
        cur = _entry(current.metadata, current.metadata_revs, current.metadata_tombstones, sym)
        bak = _entry(backup.metadata, backup.metadata_revs, backup.metadata_tombstones, sym)
        source, (rev, live, value), reason = _pick(cur, bak)
        if live:
            out.metadata[sym] = value
            out.metadata_revs[sym] = rev
        else:
            out.metadata_tombstones[sym] = rev
        decisions.append(MergeDecision("metadata", sym, source, "live" if live else "deleted", rev, reason))
    cur_b = (current.bot_metadata_rev, True, current.bot_metadata) if current.bot_metadata is not None else None
    bak_b = (backup.bot_metadata_rev, True, backup.bot_metadata) if backup.bot_metadata is not None else None
    if cur_b is not None or bak_b is not None:
        source, (rev, _, value), reason = _pick(cur_b, bak_b)
        out.bot_metadata, out.bot_metadata_rev = value, rev
        decisions.append(MergeDecision("bot_metadata", "", source, "live", rev, reason))
    return MergeResult(out, tuple(decisions))


def drop_old_tombstones(state: StateData, *, floor: int | None) -> int:
    """Forget tombstones no backup can contradict any more; returns how many were dropped.

    *floor* is the generation of the oldest backup kept (None: unknown, keep them all). A tombstone with
    rev <= floor records a deletion every backup already reflects, so no merge can need it.
    """
    if floor is None:
        return 0
    old_p = [k for k, r in state.position_tombstones.items() if r <= floor]
    for k in old_p:
        del state.position_tombstones[k]
    old_m = [s for s, r in state.metadata_tombstones.items() if r <= floor]
    for s in old_m:
        del state.metadata_tombstones[s]
    return len(old_p) + len(old_m)
