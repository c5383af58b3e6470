"""The state in memory (:class:`StateData`) and the time text of a document; nothing here parses or validates."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from posstate.model.position import Position, PositionKey

#: The newest document schema this release reads. Version 2 adds ``bot_metadata`` (issue 15.7); a document
#: without it is written as version 1, which every earlier release reads.
SCHEMA_VERSION = 2
#: The version a document without bot metadata is written as.
SCHEMA_VERSION_PLAIN = 1
#: How far in the future ``written_at`` may be before the document is refused (clock skew between hosts).
DEFAULT_CLOCK_SKEW = 300.0


@dataclass(slots=True)
class StateData:
    """Everything a state file holds, in memory. The manager owns one and copies it before a change."""

    generation: int = 0
    written_at: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    account: dict[str, str] | None = None
    positions: dict[PositionKey, Position] = field(default_factory=dict)
    position_revs: dict[PositionKey, int] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata_revs: dict[str, int] = field(default_factory=dict)
    position_tombstones: dict[PositionKey, int] = field(default_factory=dict)
    metadata_tombstones: dict[str, int] = field(default_factory=dict)
    journal: dict[str, Any] | None = None
    #: The bot's own data that belongs to no symbol (``set_bot_metadata``), None when never set; its revision.
    bot_metadata: dict[str, Any] | None = None
    bot_metadata_rev: int = 0

    def copy(self) -> StateData:
        """A copy whose dicts can change without touching this one (values are immutable or copied on set)."""
        return StateData(
            generation=self.generation,
            written_at=self.written_at,
            writer=dict(self.writer),
            account=dict(self.account) if self.account is not None else None,
            positions=dict(self.positions),
            position_revs=dict(self.position_revs),
            metadata=dict(self.metadata),
            metadata_revs=dict(self.metadata_revs),
            position_tombstones=dict(self.position_tombstones),
            metadata_tombstones=dict(self.metadata_tombstones),
            journal=dict(self.journal) if self.journal is not None else None,
            bot_metadata=self.bot_metadata,  # replaced, never changed in place (like metadata values)
            bot_metadata_rev=self.bot_metadata_rev,
        )

    @property
    def schema_version(self) -> int:
        """The schema version this state is written as: 2 only when it holds bot metadata."""
        return SCHEMA_VERSION if self.bot_metadata is not None else SCHEMA_VERSION_PLAIN


def utc_text(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def parse_utc_text(text: str) -> float:
    return (
        datetime.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S")
        .replace(tzinfo=timezone.utc)
        .timestamp()
    )
