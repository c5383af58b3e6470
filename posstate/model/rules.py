"""Decoding a document the fast path refused but jsonschema accepted, and the rules a schema cannot express
(keys that match their positions, tombstones that conflict, revisions after the generation, times in the future).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from posstate.core.errors import SchemaValidationError
from posstate.model.position import Position, PositionKey, parse_position_key, position_key_text
from posstate.model.state import DEFAULT_CLOCK_SKEW, StateData, parse_utc_text, utc_text


def _slow_decode(doc: dict[str, Any], *, path: str | Path | None) -> StateData:
    """Build from a document jsonschema accepted but the fast path did not (ints written as 1.0 and the like)."""
    positions: dict[PositionKey, Position] = {}
    revs: dict[PositionKey, int] = {}
    for key, entry in doc["positions"].items():
        raw = dict(entry["position"])
        if "timestamp" in raw:
            raw["timestamp"] = int(raw["timestamp"])
        try:
            p = Position.from_dict(raw)
        except SchemaValidationError as exc:
            raise SchemaValidationError(path, f"$.positions[{key!r}].position{exc.json_path[1:]}", exc.rule, exc.detail) from exc
        # Keyed by what the position says; relationship_errors() reports a key that disagrees.
        positions[p.key] = p
        revs[p.key] = int(entry["rev"])
    tomb = doc["tombstones"]
    return StateData(
        generation=int(doc["generation"]),
        written_at=doc["written_at"],
        writer=doc["writer"],
        account=doc.get("account"),
        positions=positions,
        position_revs=revs,
        metadata={s: e["data"] for s, e in doc["symbol_metadata"].items()},
        metadata_revs={s: int(e["rev"]) for s, e in doc["symbol_metadata"].items()},
        position_tombstones={parse_position_key(k): int(r) for k, r in tomb["positions"].items()},
        metadata_tombstones={s: int(r) for s, r in tomb["symbol_metadata"].items()},
        journal=doc.get("journal"),
        bot_metadata=doc["bot_metadata"]["data"] if "bot_metadata" in doc else None,
        bot_metadata_rev=int(doc["bot_metadata"]["rev"]) if "bot_metadata" in doc else 0,
    )


def relationship_errors(
    doc: dict[str, Any], state: StateData, *, now: float | None = None, skew: float = DEFAULT_CLOCK_SKEW
) -> list[tuple[str, str, str]]:
    """Rules beyond the schema, as (json path, rule, message)."""
    errors: list[tuple[str, str, str]] = []
    for key, entry in doc["positions"].items():
        p = entry["position"]
        if key != f"{p['symbol']}|{p['side']}":
            errors.append(
                (
                    f"$.positions[{key!r}]",
                    "key-matches-position",
                    f"key {key!r} does not match symbol {p['symbol']!r} and side {p['side']!r}",
                )
            )
    if len(state.positions) != len(doc["positions"]):
        errors.append(("$.positions", "unique", "two entries hold the same (symbol, side)"))
    for k, p in state.positions.items():
        if p.contracts < 0:
            errors.append(
                (
                    f"$.positions[{position_key_text(k)!r}].position.contracts",
                    "minimum",
                    f"contracts must be >= 0, got {p.contracts}",
                )
            )
    for k in state.positions.keys() & state.position_tombstones.keys():
        errors.append(
            (f"$.tombstones.positions[{position_key_text(k)!r}]", "tombstone-conflict", "a live position also has a tombstone")
        )
    for s in state.metadata.keys() & state.metadata_tombstones.keys():
        errors.append((f"$.tombstones.symbol_metadata[{s!r}]", "tombstone-conflict", "live metadata also has a tombstone"))
    g = state.generation
    for k, r in state.position_revs.items():
        if r > g:
            errors.append(
                (
                    f"$.positions[{position_key_text(k)!r}].rev",
                    "rev-not-after-generation",
                    f"revision {r} is after generation {g}",
                )
            )
    for s, r in state.metadata_revs.items():
        if r > g:
            errors.append((f"$.symbol_metadata[{s!r}].rev", "rev-not-after-generation", f"revision {r} is after generation {g}"))
    if state.bot_metadata_rev > g:
        errors.append(
            ("$.bot_metadata.rev", "rev-not-after-generation", f"revision {state.bot_metadata_rev} is after generation {g}")
        )
    now = time.time() if now is None else now
    try:
        written = parse_utc_text(state.written_at)
    except ValueError:
        errors.append(("$.written_at", "date-time", f"{state.written_at!r} is not a valid UTC time"))
    else:
        if written > now + skew:
            errors.append(
                ("$.written_at", "not-in-future", f"{state.written_at} is in the future (clock now {utc_text(int(now * 1000))})")
            )
    return errors
