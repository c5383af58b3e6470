"""An explicit create_backup() whose fold's snapshot never became durable (a save gave its compaction up,
then failed): the genuine older state file is not reported as replaced behind the writer lock; memory is
backed up instead, or, when memory cannot be copied either, the caller is told to call again."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from test_explicit_outside_lock import backup_symbols, make, pos
from test_lock_order import open_a_transaction

from posstate import CorruptStateError, PersistenceError, PositionStateManager
from posstate.manager.files import ManagerFiles

WAIT = 30.0  # a bound for a thread that would hang, never a measured time


def fold_given_up(monkeypatch: pytest.MonkeyPatch, m: PositionStateManager, then: Any = None) -> None:
    """The fold returns the generation it waited for, but no snapshot of it was written (given up)."""

    def fold(self: ManagerFiles) -> int:
        least = m._state.generation + 1
        if then is not None:
            then()
        return least

    monkeypatch.setattr(ManagerFiles, "fold_journal", fold)


def test_a_given_up_fold_backs_up_memory_without_calling_the_state_file_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    m.set_position(pos("B", 2))
    fold_given_up(monkeypatch, m)
    with caplog.at_level(logging.INFO, logger="posstate"):
        info = m.create_backup()
    assert backup_symbols(m, info.path) == {"A", "B"}
    assert "does not verify" not in caplog.text and "given up" in caplog.text
    m.close()


def test_a_given_up_fold_with_memory_busy_tells_the_caller_to_call_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = make(tmp_path)
    m.set_position(pos("A", 1))
    m.save()
    m.set_position(pos("B", 2))
    ends: list[threading.Event] = []
    fold_given_up(monkeypatch, m, then=lambda: ends.append(open_a_transaction(m)))
    with pytest.raises(PersistenceError) as caught:
        m.create_backup()
    ends[0].set()
    assert not isinstance(caught.value, CorruptStateError)
    text = str(caught.value)
    assert "call create_backup() again" in text and "behind the writer lock" not in text
    assert "no backup was taken" in text
    monkeypatch.undo()
    assert backup_symbols(m, m.create_backup().path) == {"A", "B"}
    m.close()
