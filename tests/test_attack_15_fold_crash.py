"""Issue 15.4 attack: SIGKILL before and after each mutating operation of an explicit save() in "sync" and
"group" mode (the fold record's pwrite included). After each kill a load holds every acknowledged change, no
generation number is given to a second content (leftover copies, quarantine, .bak and the fold record
included), and when the state file is then damaged, recovery never reports fewer generations lost than
were (the content of every generation on disk is known, so the count is checked exactly from above)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.selftest.crashchild import _child_env
from posstate.storage import container as _container

CHILD = r"""
import sys
from decimal import Decimal
from pathlib import Path
from posstate import Position, PositionStateManager, StateConfig
from posstate.selftest.harness import MUTATING, Fault, HarnessOps
from posstate.storage import fileops as _fileops

d, mode, at, when = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = StateConfig.in_dir(d, durability=mode, backup_interval=1e9)
def pos(sym, n):
    return Position(symbol=sym, side="long", contracts=Decimal(n), entry_price=Decimal("100"))
with PositionStateManager(cfg) as m:
    m.set_position(pos("A", 1))
    m.save()
    m.set_position(pos("A", 2))
    m.set_position(pos("B", 3))
    print("acked", m.generation, flush=True)
    ops = HarnessOps(fault=Fault(at=at, action="crash_" + when, ops=MUTATING) if at else None)
    with _fileops.use(ops):
        g = m.save()
    print("saved", g, ",".join(o.name for o in ops.ops if o.name in MUTATING), flush=True)
    import os
    os._exit(0)
"""


def _child(d: Path, key: bytes, mode: str, at: int, when: str) -> tuple[int, list[str]]:
    env = _child_env(key)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(d), mode, str(at), when], env=env, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout.splitlines()


def _generations(d: Path) -> set[int]:
    """Every generation a state-file copy anywhere under *d* claims (temps, .bak, quarantine, backups)."""
    out = set()
    for p in d.rglob("*"):
        if p.is_file() and "journal" not in p.name:
            with contextlib.suppress(OSError, _container.FormatProblem):  # not a state file
                out.add(_container.parse_header(p.read_bytes()).generation)
    return out


def _pos(sym: str, n: int) -> Position:
    return Position(symbol=sym, side="long", contracts=Decimal(n), entry_price=Decimal("100"))


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_kill_at_each_operation_of_a_save(tmp_path: Path, key: bytes, mode: str) -> None:
    """issue 15.4 attack: SIGKILL before/after each mutating op of save(): every ack survives, numbers are never reused."""
    rc, lines = _child(tmp_path / "probe", key, mode, 0, "before")
    assert rc == 0, lines
    names = lines[-1].split()[2].split(",")
    assert "write" in names
    bad: list[str] = []
    for k in range(1, len(names) + 1):
        for when in ("before", "after"):
            d = tmp_path / f"{mode}-{k}-{when}"
            rc, lines = _child(d, key, mode, k, when)
            assert rc != 0 and lines and lines[0].startswith("acked"), (k, when, lines)
            label = f"kill {when} op {k} ({names[k - 1]})"
            seen = _generations(d)
            cfg = StateConfig.in_dir(d, durability=mode, backup_interval=1e9)
            with PositionStateManager(cfg, key=key) as m:
                got = {k2[0]: int(p.contracts) for k2, p in m.load_positions().items()}
                if got != {"A": 2, "B": 3}:
                    bad.append(f"{label}: loaded {got}")
                m.set_position(_pos("C", 4))
                g = m.save()
                if g in seen:
                    bad.append(f"{label}: generation {g} reused (seen {sorted(seen)})")
    assert bad == []
