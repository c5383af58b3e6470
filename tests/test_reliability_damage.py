"""Damage on disk: every bit flip, truncation, appended garbage and zeroed sector is detected (and recovered)."""

from __future__ import annotations

import collections
import os
import random
from pathlib import Path
from typing import Any

import pytest

from posstate import CorruptStateError, Position, PositionStateManager, StateConfig, generate_key
from posstate.selftest.harness import copy_tree
from posstate.selftest.scenarios import damage_cases, sized_state
from posstate.storage.crypto import Keyring
from posstate.storage.statefile import ReadOptions, parse

State = tuple[Path, bytes, bytes, dict[Any, Position]]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> State:
    """A 4096-byte encrypted state file over a valid .bak holding a different state."""
    d = tmp_path_factory.mktemp("damage") / "s"
    key = generate_key()
    data, bak_positions = sized_state(d, key=key, size=4096)
    assert len(data) == 4096
    return d, key, data, bak_positions


def _bit_step() -> int:
    # POSSTATE_RELIABILITY_FULL=1 tries all 32,768-odd flips (benchmarks/reliability.py --full always does).
    return 1 if os.environ.get("POSSTATE_RELIABILITY_FULL") == "1" else 7


def test_every_damage_is_detected(state: State) -> None:
    """Bit flips (every 7th bit; all with --full), every truncation, garbage, zeroed sectors: CorruptStateError."""
    d, key, data, _ = state
    opts = ReadOptions(keyring=Keyring(key=key))
    parse(data, path=d / "positions.json", options=opts)  # the intact file loads
    tried: collections.Counter[str] = collections.Counter()
    missed = []
    for family, label, damaged in damage_cases(data, bit_step=_bit_step()):
        tried[family] += 1
        try:
            parse(damaged, path=d / "positions.json", options=opts)
        except CorruptStateError:
            continue
        except Exception as exc:  # another error type is a detection, but the wrong one
            missed.append((family, label, repr(exc)))
            continue
        missed.append((family, label, "loaded"))
    assert missed == []
    assert tried["truncation"] == len(data)
    assert tried["sector-zeroed"] == (len(data) + 511) // 512
    assert tried["bit-flip"] == (32_768 if _bit_step() == 1 else 32_768 // 7 + 1)


def _recovery_dirs(state: State, work: Path, sample: int) -> list[tuple[str, Path]]:
    d, _, data, _ = state
    cases = list(damage_cases(data, bit_step=97))
    picks = random.Random(3).sample(cases, sample)
    out = []
    for i, (family, label, damaged) in enumerate(picks):
        case = work / f"c{i}"
        copy_tree(d, case)
        (case / "positions.json").write_bytes(damaged)
        out.append((f"{family} {label}", case))
    return out


def test_damaged_state_file_with_intact_bak_is_recovered(state: State, tmp_path: Path) -> None:
    """With an intact .bak, a load after any damage returns the .bak's positions (never an error, never empty)."""
    _, key, _, want = state
    failures = []
    for label, case in _recovery_dirs(state, tmp_path, 24):
        try:
            with PositionStateManager(StateConfig.in_dir(case, backup_interval=1e9), key=key) as m:
                got = m.load_positions()
        except Exception as exc:
            failures.append((label, repr(exc)[:120]))
            continue
        if got != want:
            failures.append((label, "wrong positions"))
    assert failures == []


def test_damaged_state_file_is_refused_not_started_empty(state: State, tmp_path: Path) -> None:
    """Until recovery runs, a damaged main file is a typed CorruptStateError, never an empty state."""
    _, key, _, want = state
    for label, case in _recovery_dirs(state, tmp_path, 6):
        with PositionStateManager(StateConfig.in_dir(case, backup_interval=1e9), key=key) as m:
            try:
                got = m.load_positions()
            except CorruptStateError:
                continue
            assert got == want, label
