"""Test helper: many backups cheaply. One real backup of a small state, then hard links of it under the names
of further backups taken in the same second (``_2``, ``_3``, ...): each is a valid backup to check."""

from __future__ import annotations

import os
from pathlib import Path

from test_compaction_process import make, pos

from posstate.storage.statefile import ReadOptions


def linked_backups(tmp_path: Path, n: int) -> tuple[Path, ReadOptions]:
    """*n* backups in ``tmp_path/backups`` (one written by a closed manager, *n* - 1 links of it), and the
    read options of that manager (its keyring)."""
    folder = tmp_path / "backups"
    with make(tmp_path, durability="snapshot", max_backups=10) as m:
        m.save_positions([pos("A", 1)])
        assert m.wait_for_backups(30)
        options = m._read
    (one,) = sorted(folder.glob("positions_*.json"))
    for i in range(2, n + 1):
        os.link(one, folder / f"{one.name[:-5]}_{i}.json")
    return folder, options
