"""Issue 14 (the group-mode tail): a timed backup of memory is encoded and verified in slices on the backup
thread (never one whole-document orjson call holding the GIL), and one O(state) background job runs at a time
in a process (posstate/storage/turns.py)."""

from __future__ import annotations

import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, SchemaValidationError, StateConfig
from posstate.backup import background as _background
from posstate.backup import backups as _backups
from posstate.model import document as _document
from posstate.storage import statefile as _statefile
from posstate.storage import turns as _turns

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


def _backup_of_memory(m: PositionStateManager, change: Any) -> list[dict[str, Any]]:
    """Run *change*, then wait for the first background backup (or failed backup) that follows; returns the
    events seen until then."""
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def seen(e: dict[str, Any]) -> None:
        events.append(e)
        if e["event"] == "backupFailed" or e.get("background"):
            done.set()

    m.on("backupCreated", seen)
    m.on("backupFailed", seen)
    change()
    assert done.wait(60), events
    m.on("backupCreated", lambda e: None)
    m.on("backupFailed", lambda e: None)
    return events


def _memory_backup_on_the_backup_thread(m: PositionStateManager) -> None:
    """The backup of memory the service falls back to when compactions keep failing (issue 14.2; timed backups
    in the journal modes are otherwise copies of a compaction's snapshot), run on a thread named as its own."""
    svc = _background.service(m._files)
    t = threading.Thread(target=svc._from_memory, args=("backup",), name="posstate-backup")
    t.start()
    t.join(60)


def _whole_document_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every whole-document serialization (dumps) and parse (statefile.parse), with its thread."""
    seen: list[tuple[str, str]] = []
    real_parse, real_dumps = _statefile.parse, _document.dumps

    def parse(data: bytes, **kw: Any) -> Any:
        seen.append(("parse", threading.current_thread().name))
        return real_parse(data, **kw)

    def dumps(doc: Any) -> bytes:
        seen.append(("dumps", threading.current_thread().name))
        return real_dumps(doc)

    monkeypatch.setattr(_backups._statefile, "parse", parse)
    monkeypatch.setattr(_statefile._document, "dumps", dumps)
    return seen


@pytest.mark.parametrize("durability", ["sync", "group"])
def test_timed_backup_of_memory_is_encoded_and_verified_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """issue 14 tail: a background backup of the acknowledged state in memory (journal modes; since issue 14.2
    the fallback when compactions fail) is serialized and verified a slice at a time on the backup thread,
    holding the background turn; it loads as memory."""
    cfg = StateConfig.in_dir(tmp_path, durability=durability, backup_interval=1e9)  # type: ignore[arg-type]
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(300)])
        assert m.wait_for_backups(30)
        seen = _whole_document_calls(monkeypatch)
        turns_seen: list[int] = []
        real_pause = _turns.pause

        def pause() -> None:
            turns_seen.append(getattr(_turns._turns.local, "depth", 0))
            real_pause()

        monkeypatch.setattr(_turns, "pause", pause)

        def change() -> None:
            for i in range(5):
                m.set_position(pos(i, 7))  # acknowledged, in the journal only: the backup is taken from memory
            _memory_backup_on_the_backup_thread(m)

        created = _backup_of_memory(m, change)
        assert m.wait_for_backups(30)
        want = m.get_positions()
    assert created and created[-1].get("acknowledged") is True
    assert [c for c in seen if c[1] == "posstate-backup"] == []
    assert len(turns_seen) > 4 and all(d >= 1 for d in turns_seen)  # in slices, in the background turn
    loaded = _statefile.read(Path(created[-1]["path"]), options=_statefile.ReadOptions(keyring=m._keyring))
    assert loaded.state.positions == want


def test_a_backup_of_memory_that_does_not_verify_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14 tail: the sliced read-back check has the same verdict: a backup whose bytes fail it is
    removed and reported (backupFailed), never listed."""
    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(50)])
        assert m.wait_for_backups(30)

        def bad(data: bytes, **kw: Any) -> Any:
            raise SchemaValidationError(kw["path"], "$", "test", "injected")

        monkeypatch.setattr(_backups._sliced, "check_bytes_in_slices", bad)
        before = sorted(p.name for p in cfg.backup_path.iterdir())

        def change() -> None:
            m.set_position(pos(1, 9))
            _memory_backup_on_the_backup_thread(m)

        failed = _backup_of_memory(m, change)
        assert failed[-1]["event"] == "backupFailed" and "verify backup" in failed[-1]["reason"]
        assert m.wait_for_backups(30)
        assert sorted(p.name for p in cfg.backup_path.iterdir()) == before


def test_one_background_turn_at_a_time_handed_over_at_pauses() -> None:
    """issue 14 tail: while one thread holds the background turn another waits (asleep) for it; a pause
    hands it over when someone waits, and takes it back after; no two threads are ever inside at once."""
    inside: list[str] = []
    overlap: list[tuple[str, ...]] = []
    log: list[str] = []
    a_in = threading.Event()
    b_waiting = threading.Event()

    def work(name: str, slices: int) -> None:
        with _turns.turn():
            for _ in range(slices):
                inside.append(name)
                if len(inside) > 1:
                    overlap.append(tuple(inside))
                log.append(name)
                if name == "a":
                    a_in.set()
                    assert b_waiting.wait(30)
                inside.remove(name)
                _turns.pause()

    ta = threading.Thread(target=work, args=("a", 3))
    ta.start()
    assert a_in.wait(30)

    def b() -> None:
        work("b", 3)

    tb = threading.Thread(target=b)
    tb.start()
    # b has taken its ticket once issued moved past a's: wait on the condition, never on time
    with _turns._turns.cond:
        assert _turns._turns.cond.wait_for(lambda: _turns._turns.issued >= _turns._turns.serving + 2, 30)
    b_waiting.set()
    ta.join(30)
    tb.join(30)
    assert not ta.is_alive() and not tb.is_alive()
    assert overlap == []
    assert log[0] == "a" and log[1] == "b"  # a's first pause handed the turn to the waiting b
    assert sorted(log) == ["a"] * 3 + ["b"] * 3
    assert _turns._turns.issued == _turns._turns.serving  # everything given back


def test_turn_is_reentrant_and_pause_outside_a_turn_only_yields() -> None:
    """issue 14 tail: a nested turn in one thread does not wait for itself; pause() outside a turn takes none."""
    with _turns.turn():
        with _turns.turn():
            _turns.pause()
        assert _turns._turns.issued == _turns._turns.serving + 1
    _turns.pause()
    assert _turns._turns.issued == _turns._turns.serving


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_holds_no_turn() -> None:
    """issue 14 tail: a child forked while the parent's thread holds the turn can take a turn at once."""
    with _turns.turn():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                with _turns.turn():
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_compaction_and_prune_share_the_turn_and_both_finish(tmp_path: Path) -> None:
    """issue 14 tail: a background compaction that starts while a prune verifies unverified backups (each
    in the background turn) finishes, the prune too, with writers going on; nothing is lost."""
    cfg = StateConfig.in_dir(tmp_path, durability="group", backup_interval=0.05, journal_max_records=50)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(2000)])
        assert m.wait_for_backups(30)
        st = m._state.copy()
        for k in range(6):  # backups this process never verified: the next prune checks each in full
            _backups.write_backup(
                st,
                backup_dir=cfg.backup_path,
                keyring=m._write_keyring,
                compression_level=cfg.compression_level,
                options=m._read,
                now=1_700_000_000 + 3600 * k,
            )
        # A timed backup (the copy of a compaction's snapshot, issue 14.2), then a prune checks the six in full.
        _backup_of_memory(m, lambda: m.set_position(pos(1, 5)))

        def writer(t: int) -> None:
            for j in range(60):
                m.set_position(pos(t * 500 + j, 3 + j))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert m.compact(wait=True, timeout=60)
        assert m.wait_for_backups(60)
        want = m.get_positions()
    assert _turns._turns.issued == _turns._turns.serving
    with PositionStateManager(cfg, key=KEY) as m2:
        assert m2.load_positions() == want


def _memory_backup_dir(d: Path) -> PositionStateManager:
    cfg = StateConfig.in_dir(d, durability="sync", backup_interval=1e9)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(200)])
    assert m.wait_for_backups(30)
    for i in range(3):
        m.set_position(pos(i, 40 + i))  # acknowledged in the journal only: the backup is taken from memory
    return m


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "backups").iterdir())


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_fault_at_each_operation_of_a_sliced_backup_of_memory(tmp_path: Path, persistent: bool) -> None:
    """issue 14 tail: EIO at every operation of a background backup of memory (encoded and verified in
    slices), once and persistent: the state file and journal are untouched, backupFailed or a whole backup,
    nothing invalid listed, no temp left after the next backup, and every acknowledged change loads."""
    from posstate.backup import background as _background
    from posstate.selftest.harness import MUTATING_AND_READS, Fault, HarnessOps
    from posstate.storage import fileops as fs

    m = _memory_backup_dir(tmp_path / "probe")
    counting = HarnessOps(ignore_threads=frozenset())
    with fs.use(counting):
        assert _background.service(m._files)._from_memory("backup") is not None
    m.close()
    total = sum(1 for op in counting.ops if op.name in MUTATING_AND_READS)
    assert total > 5
    outcomes = set()
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        m = _memory_backup_dir(d)
        want = m.get_positions()
        state, journal, before = m.path.read_bytes(), m.config.journal_path.read_bytes(), _listing(d)
        events: list[dict[str, Any]] = []
        m.on("backupFailed", events.append)
        m.on("backupCreated", events.append)
        ops = HarnessOps(fault=Fault(at=k, persistent=persistent, ops=MUTATING_AND_READS), ignore_threads=frozenset())
        with fs.use(ops):
            _background.service(m._files)._from_memory("backup")
        assert ops.fired >= 1 and events, k
        outcomes.add(events[-1]["event"])
        assert m.path.read_bytes() == state and m.config.journal_path.read_bytes() == journal, k
        for b in m.list_backups():
            assert b.valid and m.validate_backup(b.id).valid, (k, b.id)
        if events[-1]["event"] == "backupFailed" and not persistent:
            assert [n for n in _listing(d) if not n.startswith(".")] == [n for n in before if not n.startswith(".")], k
        m.create_backup()  # the next backup sweeps a temp the failed one left
        assert not [n for n in _listing(d) if n.startswith(".")], k
        m.close()
        with PositionStateManager(m.config, key=KEY) as again:
            assert again.load_positions() == want, k
    assert "backupFailed" in outcomes


_KILL_CHILD = """
import sys
from decimal import Decimal
from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.selftest.harness import Fault, HarnessOps, MUTATING_AND_READS
from posstate.storage import fileops as fs

d, at, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability="sync"), key=bytes(range(32)))
m.load_positions()
m.set_position(Position(symbol="S00001", side="long", contracts=Decimal(77), entry_price=Decimal("10.5")))
fault = None if at == 0 else Fault(at=at, action="crash_" + when, ops=MUTATING_AND_READS)
ops = HarnessOps(fault=fault, ignore_threads=frozenset())
with fs.use(ops):
    _background.service(m._files)._from_memory("backup")
print(sum(1 for op in ops.ops if op.name in MUTATING_AND_READS), flush=True)
"""


def test_sigkill_at_every_operation_of_a_sliced_backup_of_memory(tmp_path: Path) -> None:
    """issue 14 tail: a child killed with SIGKILL before and after each operation of a backup of memory
    (encoded and verified in slices) leaves every acknowledged change loadable, no backup listed that does
    not validate, and its temp swept by the next backup."""
    import shutil
    import signal
    import subprocess
    import sys

    from posstate.selftest.harness import copy_tree

    root = Path(__file__).resolve().parents[1]
    seed = tmp_path / "seed"
    m = _memory_backup_dir(seed)
    m.close()
    env = dict(os.environ, PYTHONPATH=str(root))
    probe = tmp_path / "probe"
    copy_tree(seed, probe)
    out = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(probe), "0", "before"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.strip())
    assert total > 5
    for k in range(1, total + 1):
        for when in ("before", "after"):
            d = tmp_path / f"k{k}{when}"
            copy_tree(seed, d)
            run = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(d), str(k), when], env=env, capture_output=True)
            assert run.returncode == -signal.SIGKILL, (k, when, run.stderr)
            with PositionStateManager(StateConfig.in_dir(d, backup_interval=1e9, durability="sync"), key=KEY) as again:
                got = again.load_positions()
                assert got[pos(1).key].contracts == 77, (k, when)  # acknowledged before the backup began
                for b in again.list_backups():
                    assert b.valid and again.validate_backup(b.id).valid, (k, when, b.id)
                again.create_backup()  # the next backup sweeps a killed one's temp
            assert not [n for n in _listing(d) if n.startswith(".")], (k, when)
            shutil.rmtree(d)
