"""Which backups to keep: ``max_backups`` plus borg-like ``keep_within/hourly/daily/weekly`` rules.

Pure functions over :class:`BackupInfo` records; nothing here touches a file. The rules:

* Only a backup that validated fully (``valid``) fills a slot, so a damaged one never pushes a good one out.
* A damaged backup is never deleted: it is marked for quarantine.
* A backup that cannot be checked here (written with another key, newer version) is kept untouched.
* The newest valid backup is always kept.
* ``max_backups``: the N newest valid backups.
* ``keep_within`` (seconds): every valid backup created within that long before *now*.
* ``keep_hourly/daily/weekly``: like borg, the newest backup of each of the N most recent hours / days /
  ISO weeks that hold a valid backup; rules run in that order after ``max_backups`` and ``keep_within``,
  and (as in borg) a period whose newest backup an earlier rule already keeps does not count towards N.
* Every other valid backup is redundant and may be removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from posstate.backup.backups import BackupInfo

Action = Literal["keep", "remove", "quarantine"]


@dataclass(frozen=True, slots=True)
class PruneDecision:
    """What retention does with one backup, and why."""

    backup: BackupInfo
    action: Action
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.backup.id, "action": self.action, "reason": self.reason, "path": str(self.backup.path)}


@dataclass(frozen=True, slots=True)
class PruneResult:
    """The outcome of :meth:`PositionStateManager.prune_old_backups` (what was, or would be, done)."""

    kept: tuple[PruneDecision, ...]
    removed: tuple[PruneDecision, ...]
    quarantined: tuple[PruneDecision, ...]
    dry_run: bool

    @property
    def decisions(self) -> tuple[PruneDecision, ...]:
        return tuple(sorted(self.kept + self.removed + self.quarantined, key=lambda d: d.backup.sort_key, reverse=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "kept": [d.to_dict() for d in self.kept],
            "removed": [d.to_dict() for d in self.removed],
            "quarantined": [d.to_dict() for d in self.quarantined],
        }


@dataclass(frozen=True, slots=True)
class Policy:
    max_backups: int = 24
    keep_within: float = 0.0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0


_PERIODS: tuple[tuple[str, Callable[[datetime], object]], ...] = (
    ("keep_hourly", lambda d: (d.year, d.month, d.day, d.hour)),
    ("keep_daily", lambda d: (d.year, d.month, d.day)),
    ("keep_weekly", lambda d: d.isocalendar()[:2]),
)


def plan(backups: Sequence[BackupInfo], *, policy: Policy, now: datetime) -> list[PruneDecision]:
    """One decision per backup, newest first. *backups* must carry full-validation verdicts."""
    ordered = sorted(backups, key=lambda b: b.sort_key, reverse=True)
    valid = [b for b in ordered if b.valid]
    why: dict[str, str] = {}
    if valid:
        why[valid[0].id] = "newest valid backup (never pruned)"
    for i, b in enumerate(valid[: policy.max_backups]):
        why.setdefault(b.id, f"max_backups: #{i + 1} of {policy.max_backups} newest valid")
    if policy.keep_within > 0:
        for b in valid:
            age = (now - b.created_at).total_seconds()
            if age <= policy.keep_within:
                why.setdefault(b.id, f"keep_within: {age:.0f} s old, within {policy.keep_within:.0f} s")
    for rule, period_of in _PERIODS:
        wanted: int = getattr(policy, rule)
        if wanted <= 0:
            continue
        counted = 0
        last: object = None
        for b in valid:
            period = period_of(b.created_at)
            if period == last:
                continue
            last = period
            if b.id in why:
                continue  # as in borg: a period whose newest backup another rule keeps does not count
            counted += 1
            why[b.id] = f"{rule}: newest of period #{counted} of {wanted}"
            if counted >= wanted:
                break
    out: list[PruneDecision] = []
    for b in ordered:
        if b.valid:
            if b.id in why:
                out.append(PruneDecision(b, "keep", why[b.id]))
            else:
                out.append(PruneDecision(b, "remove", f"redundant: not selected by any retention rule ({_describe(policy)})"))
        elif b.damaged:
            out.append(PruneDecision(b, "quarantine", f"damaged ({b.reason}); moved to quarantine, never deleted"))
        else:
            out.append(PruneDecision(b, "keep", f"cannot be checked here ({b.reason}); kept untouched, fills no slot"))
    return out


def _describe(policy: Policy) -> str:
    parts = [f"max_backups={policy.max_backups}"]
    if policy.keep_within:
        parts.append(f"keep_within={policy.keep_within:g}s")
    for rule, _ in _PERIODS:
        if getattr(policy, rule):
            parts.append(f"{rule}={getattr(policy, rule)}")
    return ", ".join(parts)
