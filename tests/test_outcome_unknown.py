"""Issue 12.8: a change reported as failed never comes back silently.

When the record (or snapshot) may be on disk although the call failed, the error says the outcome is
unknown (``PersistenceError.outcome_unknown``), the manager refuses every later change
(``OutcomeUnknownError``) until it is reopened, and the next load reports the change (event
``outcomeUnknown`` and ``last_recovery.unknown_outcomes``).
"""

from __future__ import annotations

import errno
import stat
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import OutcomeUnknownError, PersistenceError, Position, PositionStateManager, StateConfig
from posstate.selftest.harness import Fault, HarnessOps
from posstate.storage import fileops as fs
from posstate.storage import unknown as _unknown

KEY = bytes(range(32))
#: A disk that fails every sync and every truncate from now on; writes still reach the page cache.
SYNC_AND_CUT = frozenset({"fdatasync", "ftruncate"})
#: The same, and the marker file cannot be written either (its temp's fsync fails).
EVERYTHING_DURABLE = SYNC_AND_CUT | {"fsync", "fsync_dir"}


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def make(d: Path, **kw: Any) -> PositionStateManager:
    return PositionStateManager(StateConfig.in_dir(d, **kw), key=KEY)


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    _unknown.forget_all()
    yield
    _unknown.forget_all()


def persistent(ops: frozenset[str], errno_: int = errno.EIO) -> HarnessOps:
    return HarnessOps(fault=Fault(at=1, errno=errno_, persistent=True, ops=ops))


@pytest.mark.parametrize("code", [pytest.param(errno.EIO, id="EIO"), pytest.param(errno.EROFS, id="EROFS")])
def test_sync_mode_record_written_sync_and_cut_fail(tmp_path: Path, code: int) -> None:
    """issue 12.8: sync mode, persistent EIO/EROFS: the record is written, fdatasync and the rollback truncate
    fail: outcome_unknown, memory keeps the old value, further changes are refused, and after a restart the
    load reports the change (from the 0600 marker) with the value it found, then forgets it."""
    cfg = StateConfig.in_dir(tmp_path)
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        with fs.use(persistent(SYNC_AND_CUT, code)), pytest.raises(PersistenceError) as info:
            m.set_position(pos("A", 2))
        err = info.value
        assert err.outcome_unknown and err.errno == code
        assert "outcome is unknown" in str(err) and "reopen the manager (a new PositionStateManager)" in str(err)
        assert "recorded for the next load to report" in str(err)
        assert contracts(m) == {"A": 1}  # memory keeps the old value
        with pytest.raises(OutcomeUnknownError, match="reopen the manager"):
            m.set_position(pos("B", 1))
        with pytest.raises(OutcomeUnknownError):
            m.delete_position("A", "long")
    marker = _unknown.marker_path(cfg.state_path)
    assert marker.name == "positions.json.unknown" and stat.S_IMODE(marker.stat().st_mode) == 0o600
    assert b"A" not in marker.read_bytes().replace(b"PSJ", b"")  # sequence numbers only, no symbol
    _unknown.forget_all()  # a restart: only the marker knows
    events: list[dict[str, Any]] = []
    with make(tmp_path) as m2:
        m2.on("outcomeUnknown", events.append)
        assert contracts(m2) == {"A": 2}  # the "failed" value is on disk...
        report = m2.last_recovery
        assert report is not None  # ...and the load says so
        (change,) = report.unknown_outcomes
        assert change["kind"] == "journal" and change["found_on_disk"] is True and change["seq_lo"] == change["seq_hi"]
        assert report.to_dict()["unknown_outcomes"][0]["found_on_disk"] is True
        assert len(events) == 1 and events[0]["cleared"] is True
    assert not marker.exists()
    with make(tmp_path) as m3:
        assert contracts(m3) == {"A": 2} and m3.last_recovery is None


def test_marker_write_fails_too_reopen_in_process_still_reports(tmp_path: Path) -> None:
    """issue 12.8: when even the marker cannot be written, the error says a restart will not report it, and
    a reopen in the same process still does (the in-process registry)."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        with fs.use(persistent(EVERYTHING_DURABLE)), pytest.raises(PersistenceError) as info:
            m.delete_position("A", "long")
        assert info.value.outcome_unknown and "after a restart it will not be reported" in str(info.value)
        assert contracts(m) == {"A": 1}
    assert not _unknown.marker_path(StateConfig.in_dir(tmp_path).state_path).exists()
    with make(tmp_path) as m2:
        assert contracts(m2) == {}
        report = m2.last_recovery
        assert report is not None and [c["found_on_disk"] for c in report.unknown_outcomes] == [True]


def test_cut_succeeds_outcome_known(tmp_path: Path) -> None:
    """issue 12.8: fdatasync fails once but the truncate and its sync succeed: the record is provably gone,
    the error is an ordinary PersistenceError (outcome known) and the manager goes on."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        once = HarnessOps(fault=Fault(at=1, errno=errno.EIO, ops=frozenset({"fdatasync"})))
        with fs.use(once), pytest.raises(PersistenceError) as info:
            m.set_position(pos("A", 2))
        assert not info.value.outcome_unknown
        m.set_position(pos("A", 3))
    with make(tmp_path) as m2:
        assert contracts(m2) == {"A": 3} and m2.last_recovery is None


def test_group_mode_leader_failure_affects_every_follower(tmp_path: Path) -> None:
    """issue 12.8: group mode, the leader's fdatasync and the cut fail: every caller whose record was in the
    failed group gets outcome_unknown, all are undone in memory, and the next load reports the range. A caller
    that reaches the detached journal after the failure is refused before writing (seen about 1 run in 25)."""
    threads_n = 6
    with make(tmp_path, durability="group") as m:
        m.set_position(pos("warmup", 1))
        errors: list[BaseException] = []
        barrier = threading.Barrier(threads_n)

        def work(t: int) -> None:
            barrier.wait()
            try:
                m.set_position(pos(f"T{t}", t + 1))
            except PosStateErrorTypes as exc:
                errors.append(exc)

        with fs.use(persistent(SYNC_AND_CUT)):
            threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert len(errors) == threads_n
        failed = [e for e in errors if isinstance(e, PersistenceError) and e.outcome_unknown]
        # a caller that reached the journal after the failed group (a thread late past the barrier) is refused
        # before anything is written: the journal is detached, nothing of its record is on disk
        late = [e for e in errors if isinstance(e, PersistenceError) and not e.outcome_unknown]
        assert failed and all("no usable journal" in str(e) for e in late), late
        assert all(isinstance(e, PersistenceError | OutcomeUnknownError) for e in errors)
        assert contracts(m) == {"warmup": 1}
        with pytest.raises(OutcomeUnknownError):
            m.set_position(pos("late", 1))
    _unknown.forget_all()
    with make(tmp_path, durability="group") as m2:
        got = contracts(m2)
        report = m2.last_recovery
        assert report is not None and report.unknown_outcomes
        assert all(c["kind"] == "journal" for c in report.unknown_outcomes)
        on_disk = {k for k in got if k != "warmup"}
        assert len(on_disk) <= len(failed)  # only records of failed callers can be there
        assert any(c["found_on_disk"] for c in report.unknown_outcomes) == bool(on_disk)


PosStateErrorTypes = (PersistenceError, OutcomeUnknownError)


def test_snapshot_mode_batch_save_rename_done_dir_fsync_failed(tmp_path: Path) -> None:
    """issue 12.8: snapshot mode, batch_save_positions renamed into place, the directory fsync fails (and
    stays failing): outcome_unknown, memory keeps the old positions, the next load reports generation G."""
    with make(tmp_path, durability="snapshot") as m:
        m.save_positions([pos("A", 1)])
        with fs.use(persistent(frozenset({"fsync_dir"}))), pytest.raises(PersistenceError) as info:
            m.batch_save_positions([pos("B", 1)], deletes=[("A", "long")])
        assert info.value.outcome_unknown and info.value.operation == "fsync_dir"
        assert contracts(m) == {"A": 1}
        with pytest.raises(OutcomeUnknownError):
            m.save()
    with make(tmp_path, durability="snapshot") as m2:
        assert contracts(m2) == {"B": 1}
        report = m2.last_recovery
        assert report is not None
        assert [(c["kind"], c["found_on_disk"]) for c in report.unknown_outcomes] == [("snapshot", True)]


def test_outcome_unknown_blocks_every_writer(tmp_path: Path) -> None:
    """issue 12.8: after an outcome-unknown failure every public writer raises OutcomeUnknownError and
    changes nothing; reads return memory."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
        m.create_backup()
        m.set_position(pos("A", 5))  # starts the journal: the next record is a plain append
        with fs.use(persistent(SYNC_AND_CUT)), pytest.raises(PersistenceError):
            m.set_position(pos("A", 2))
        writers = {
            "set_position": lambda: m.set_position(pos("B", 1)),
            "delete_position": lambda: m.delete_position("A", "long"),
            "set_symbol_metadata": lambda: m.set_symbol_metadata("A", {"x": 1}),
            "delete_symbol_metadata": lambda: m.delete_symbol_metadata("A"),
            "transaction": lambda: m.transaction().__enter__(),
            "save": lambda: m.save(),
            "save_positions": lambda: m.save_positions([]),
            "batch_save_positions": lambda: m.batch_save_positions([pos("B", 1)]),
            "load_positions": lambda: m.load_positions(),
            "create_backup": lambda: m.create_backup(),
            "prune_old_backups": lambda: m.prune_old_backups(),
            "restore_from_backup": lambda: m.restore_from_backup("latest", accept_older=True),
            "attempt_recovery": lambda: m.attempt_recovery(),
            "repair_state": lambda: m.repair_state(),
        }
        for name, call in writers.items():
            with pytest.raises(OutcomeUnknownError):
                call()
            assert contracts(m) == {"A": 5}, name
        assert m.get_position("A", "long") is not None and m.prune_old_backups(dry_run=True) is not None


def test_snapshot_mode_save_rename_done_dir_fsync_failed(tmp_path: Path) -> None:
    """issue 15 attack (12.8 in snapshot mode): save() of unsaved changes renamed into place, the directory
    fsync fails: the new file may load after a crash, so the outcome is unknown (not "failed, known")."""
    with make(tmp_path, durability="snapshot") as m:
        m.save_positions([pos("A", 1)])
        m.set_position(pos("A", 2))  # snapshot mode: in memory only until save()
        with fs.use(persistent(frozenset({"fsync_dir"}))), pytest.raises(PersistenceError) as info:
            m.save()
        assert info.value.operation == "fsync_dir"
        assert info.value.outcome_unknown
        with pytest.raises(OutcomeUnknownError):
            m.set_position(pos("A", 3))
    with make(tmp_path, durability="snapshot") as m2:
        assert contracts(m2) == {"A": 2}  # the "failed" save's file: the caller was told it may be there
        report = m2.last_recovery
        assert report is not None
        assert [(c["kind"], c["found_on_disk"]) for c in report.unknown_outcomes] == [("snapshot", True)]


def test_snapshot_mode_save_of_nothing_new_dir_fsync_failed_is_known(tmp_path: Path) -> None:
    """issue 15 attack: a save() with no unsaved change whose directory fsync fails rewrites the same content:
    failed, outcome known (old and new file hold the same positions), and the manager still accepts changes."""
    with make(tmp_path, durability="snapshot") as m:
        m.save_positions([pos("A", 1)])
        with fs.use(persistent(frozenset({"fsync_dir"}))), pytest.raises(PersistenceError) as info:
            m.save()
        assert not info.value.outcome_unknown
        m.set_position(pos("A", 2))
        m.save()
    with make(tmp_path, durability="snapshot") as m2:
        assert contracts(m2) == {"A": 2}
