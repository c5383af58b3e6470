"""Scenarios for the replay and damage tests: a recorded save to replay, a state file of a chosen size to
damage, every damage case of a file, and what a fresh manager makes of one crash state."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posstate.core.config import StateConfig
from posstate.core.errors import PosStateError
from posstate.manager.manager import PositionStateManager
from posstate.selftest.crashchild import Seen, fresh_load, save_step, workload_digest
from posstate.selftest.harness import Fault, HarnessOps, Op
from posstate.selftest.replay import CrashState, materialize, snapshot
from posstate.storage import fileops as _fileops


def damage_cases(data: bytes, *, bit_step: int = 1, seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(family, label, damaged bytes): every *bit_step*-th single-bit flip, every truncation length, appended
    garbage, and each 512-byte sector zeroed."""
    for bit in range(0, len(data) * 8, bit_step):
        buf = bytearray(data)
        buf[bit // 8] ^= 1 << (bit % 8)
        yield "bit-flip", f"bit {bit}", bytes(buf)
    for n in range(len(data)):
        yield "truncation", f"length {n}", data[:n]
    rnd = random.Random(seed)
    for extra in (b"\n", b"\0", bytes(512), rnd.randbytes(4096), data):
        yield "appended", f"+{len(extra)} bytes", data + extra
    for start in range(0, len(data), 512):
        end = min(start + 512, len(data))
        yield "sector-zeroed", f"sector {start // 512}", data[:start] + bytes(end - start) + data[end:]


def sized_state(state_dir: Path, *, key: bytes, size: int = 4096) -> tuple[bytes, dict[Any, Any]]:
    """Write a state file of exactly *size* bytes (encrypted, uncompressed, a padded metadata entry) over
    a valid ``.bak``; return the file's bytes and the ``.bak``'s positions (what recovery must bring back)."""
    from decimal import Decimal

    from posstate.model.position import Position
    from posstate.storage.crypto import Keyring
    from posstate.storage.statefile import ReadOptions, read

    rnd = random.Random(11)
    positions = [
        Position(
            symbol=f"S{i}/USDT",
            side="long",
            contracts=Decimal(rnd.randint(1, 10**9)) / 10**4,
            entry_price=Decimal(rnd.randint(1, 10**9)) / 10**3,
        )
        for i in range(20)
    ]
    cfg = StateConfig.in_dir(state_dir, backup_interval=1e9, compression=False, durability="snapshot")
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        pad = 0
        for _ in range(6):
            m.set_symbol_metadata("PAD", {"pad": "p" * pad})
            m.save_positions(positions)
            got = len(_fileops.read_file(state_dir / "positions.json"))
            if got == size:
                break
            pad += size - got
            if pad < 0:
                raise ValueError(f"cannot make a state file as small as {size} bytes")
        else:
            raise RuntimeError(f"could not make a state file of exactly {size} bytes")
        # Keep a different, valid state as the .bak, then write the sized one again over it (header
        # fields are fixed-width, so the size is the same).
        m.save_positions(positions[:10])
        m.save_positions(positions)
    bak = read(state_dir / "positions.json.bak", options=ReadOptions(keyring=Keyring(key=key)))
    return _fileops.read_file(state_dir / "positions.json"), dict(bak.state.positions)


@dataclass(frozen=True, slots=True)
class Recorded:
    """A recorded save: the directory before it, its operations, and the old and new fingerprints."""

    root: Path
    before: dict[str, bytes]
    ops: list[Op]
    old: Seen
    new: Seen


def record_save(state_dir: Path, *, key: bytes, warmup: int = 2, fault: Fault | None = None) -> Recorded:
    """Warm *state_dir* up with *warmup* saves, then record the next save (optionally with a fault)."""
    cfg = StateConfig.in_dir(state_dir, backup_interval=1e9, durability="snapshot")
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        for _ in range(warmup):
            save_step(m, m.generation + 1)
    old = fresh_load(state_dir, key=key)
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        before = snapshot(state_dir)
        ops = HarnessOps(keep_data=True, fault=fault)
        step = m.generation + 1
        with _fileops.use(ops):
            gen = save_step(m, step)
    return Recorded(state_dir, before, list(ops.ops), old, Seen(gen, workload_digest(step)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a fresh manager made of one crash state."""

    state: CrashState
    result: str  # "old", "new", "error" or "other" (a state that is neither: a mix or an older one)
    detail: str = ""

    @property
    def lost(self) -> bool:
        """Acknowledged data lost: an error, a foreign state, or the old state after the save returned."""
        return self.result in ("error", "other") or (self.state.complete and self.result != "new")


def load_state(state: CrashState, into: Path, *, key: bytes, old: Seen, new: Seen) -> Outcome:
    """Materialize *state* in the empty directory *into*, load it with a fresh manager, classify."""
    materialize(state, into)
    try:
        seen = fresh_load(into, key=key, backup_interval=1e9, durability="snapshot")
    except PosStateError as exc:
        return Outcome(state, "error", f"{type(exc).__name__}: {exc}")
    # Compare contents; a recovery that rewrote the file may give the recovered state a newer generation.
    if seen.digest == old.digest and seen.generation >= old.generation:
        return Outcome(state, "old", "" if seen == old else f"recovered as generation {seen.generation}")
    if seen.digest == new.digest and seen.generation >= new.generation:
        return Outcome(state, "new", "" if seen == new else f"recovered as generation {seen.generation}")
    return Outcome(state, "other", repr(seen))


__all__ = ["Outcome", "Recorded", "damage_cases", "load_state", "record_save", "sized_state"]
