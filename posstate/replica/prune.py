"""Retention on the replica: the keep rules of local backups (``max_backups``, ``keep_within``,
``keep_hourly/daily/weekly``; posstate/backup/retention.py) applied to the replica's snapshots, and the
journal ranges that belong to no kept snapshot.

A snapshot's time is the object's upload time (the listing's LastModified). The newest snapshot is always
kept, and so is every journal range of a kept snapshot's journal and of a journal newer than the newest
snapshot (the ``.next`` segment of a background compaction still pending); nothing of a newer fencing epoch than the
newest kept snapshot is ever removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from posstate.backup.retention import Policy
from posstate.core.config import StateConfig
from posstate.replica import names as _names
from posstate.replica.client import ObjectInfo, ReplicaClient

_PERIODS = (
    ("keep_hourly", lambda d: (d.year, d.month, d.day, d.hour)),
    ("keep_daily", lambda d: (d.year, d.month, d.day)),
    ("keep_weekly", lambda d: d.isocalendar()[:2]),
)


@dataclass(frozen=True, slots=True)
class ReplicaPrunePlan:
    keep: tuple[str, ...]
    remove: tuple[str, ...]
    reasons: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        return {"keep": list(self.keep), "remove": list(self.remove), "reasons": dict(self.reasons)}


def plan(
    objects: Sequence[ObjectInfo],
    *,
    policy: Policy,
    now: datetime | None = None,
    current_journal: str | None = None,
    following_journal: str | None = None,
) -> ReplicaPrunePlan:
    """What to keep and remove among *objects* (a listing), newest snapshot first. The ranges of
    *current_journal* and of *following_journal* (the ``.next`` segment of a pending background compaction,
    whose snapshot is not written yet) are always kept."""
    now = now or datetime.now(timezone.utc)
    when = {o.key: o.modified or now for o in objects}
    snaps, ranges, _ = _names.split(o.key for o in objects)
    newest_first = list(reversed(snaps))
    why: dict[str, str] = {}
    if newest_first:
        why[newest_first[0].key] = "newest snapshot (never pruned)"
    for i, s in enumerate(newest_first[: policy.max_backups]):
        why.setdefault(s.key, f"max_backups: #{i + 1} of {policy.max_backups} newest")
    if policy.keep_within > 0:
        for s in newest_first:
            age = (now - when[s.key]).total_seconds()
            if age <= policy.keep_within:
                why.setdefault(s.key, f"keep_within: {age:.0f} s old")
    for rule, period_of in _PERIODS:
        wanted: int = getattr(policy, rule)
        counted, last = 0, None
        for s in newest_first if wanted > 0 else ():
            period = period_of(when[s.key])
            if period == last:
                continue
            last = period
            if s.key in why:
                continue
            counted += 1
            why[s.key] = f"{rule}: newest of period #{counted} of {wanted}"
            if counted >= wanted:
                break
    kept_gens = {s.generation for s in snaps if s.key in why}
    keep = [s.key for s in newest_first if s.key in why]
    remove = [s.key for s in newest_first if s.key not in why]
    newest = max((s.generation for s in snaps if s.key in why), default=None)
    for r in ranges:
        if r.base_generation in kept_gens or r.journal_id in (current_journal, following_journal):
            keep.append(r.key)
            why[r.key] = "journal of a kept snapshot"
        elif newest is not None and r.base_generation > newest:
            # A journal newer than every snapshot: the segment of a background compaction still pending (its
            # snapshot is not written yet; issue 14), whose records a writer reported shipped. Never removed.
            keep.append(r.key)
            why[r.key] = "journal newer than the newest snapshot (a compaction still pending)"
        else:
            remove.append(r.key)
    reasons = {k: why.get(k, "redundant: not selected by any retention rule") for k in keep + remove}
    return ReplicaPrunePlan(tuple(keep), tuple(remove), reasons)


def prune(
    client: ReplicaClient, *, policy: Policy, dry_run: bool = False, current_journal: str | None = None
) -> ReplicaPrunePlan:
    """Apply :func:`plan` to the replica (``posstate replica prune``); *dry_run* deletes nothing."""
    found = plan(client.list(), policy=policy, current_journal=current_journal)
    if not dry_run and found.remove:
        client.delete(found.remove)
    return found


def policy_of(config: StateConfig) -> Policy:
    """The local backups' keep rules, for the replica's snapshots."""
    return Policy(
        max_backups=config.max_backups,
        keep_within=config.keep_within,
        keep_hourly=config.keep_hourly,
        keep_daily=config.keep_daily,
        keep_weekly=config.keep_weekly,
    )
