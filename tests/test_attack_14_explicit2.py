"""Second attack on issue 14.3's explicit create_backup() outside the manager's lock: close() giving up a
background compaction still writing at its deadline must not leave a create_backup() waiting for that
compaction blocked for ever."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import in_thread, make, pos

from posstate import ManagerClosedError
from posstate.manager import compaction as _compaction

WAIT = 30.0  # a bound for a thread that would hang, never a measured time


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_close_giving_up_a_compaction_still_writing_does_not_leave_an_explicit_backup_waiting_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    m = make(tmp_path, durability=durability)
    m._close_wait = 0.2  # type: ignore[misc]  # close() gives the compaction up while its attempt still writes
    m.set_position(pos("A", 1))
    m.save()
    m.set_position(pos("B", 2))
    entered, go = threading.Event(), threading.Event()
    original = _compaction.BackgroundCompaction._bg_attempt

    def held(self: Any, job: Any) -> Any:
        entered.set()
        assert go.wait(WAIT)
        return original(self, job)

    monkeypatch.setattr(_compaction.BackgroundCompaction, "_bg_attempt", held)
    backup, result = in_thread(m.create_backup)
    assert entered.wait(WAIT)
    m.close()  # the attempt is still writing at its deadline: the segments stay, the next load replays them
    go.set()
    backup.join(WAIT)
    assert not backup.is_alive(), "create_backup() still waits for a compaction close() gave up"
    assert len(result) == 1 and isinstance(result[0], ManagerClosedError)
