"""Issue 14.1/14.3 (cause 3): the first record of a new journal segment does not pay for creating its file.

A thread prepares ``positions.json.journal.next`` ahead of time (blank: zeros only, synced, the directory
synced); the rotation adopts it, so the caller's first record is one pwrite + fdatasync. These tests prove the
caller's operations, every reader's view of a blank ``.next``, a SIGKILL at each step of the preparation in a
real child process, and faults at each step (the bot goes on by creating the segment itself, and says so).
Nothing here sleeps or asserts a time: the tests wait on the journal's condition (``wait_spare``).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from posstate import PositionStateManager, PosStateError, StateConfig
from posstate.cli.main import cli
from posstate.journal import format as jf
from posstate.journal import spare as spare_mod
from posstate.journal.files import is_blank, next_path
from posstate.journal.spare import SPARE_THREAD, JournalSpare
from posstate.model.position import Position
from posstate.selftest.harness import MUTATING_AND_READS, Fault, HarnessOps, copy_tree
from posstate.storage import fileops as fs
from posstate.storage.crypto import encode_key_text
from tests.test_background_compaction import held

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parent.parent
MAX = 10  # journal_max_records: the spare is wanted from 5 records on, the rotation comes at 10
CLEAN_ENV = {"POSSTATE_KEY": None, "POSSTATE_KEY_FILE": None, "POSSTATE_PASSPHRASE": None, "POSSTATE_DIR": None}


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


def cfg_of(d: Path, **kw: Any) -> StateConfig:
    kw.setdefault("journal_max_records", MAX)
    return StateConfig.in_dir(d, backup_interval=1e9, **kw)


def make(d: Path, **kw: Any) -> PositionStateManager:
    return PositionStateManager(cfg_of(d, **kw), key=KEY)


def contracts(m: PositionStateManager) -> dict[str, int]:
    return {k[0]: int(p.contracts) for k, p in m.get_positions().items()}


def settle(m: PositionStateManager) -> None:
    """Wait until no spare preparation is in flight (no-op where the journal has none)."""
    wait = getattr(m._journal, "wait_spare", None)
    if wait is not None:
        assert wait(60), "the spare segment's thread never finished"


def spare_ready(m: PositionStateManager) -> bool:
    return bool(getattr(m._journal, "spare_ready", False))


def fill_until_spare(m: PositionStateManager, start: int = 0) -> int:
    """Update until the journal holds half its threshold and the spare is prepared; returns the next index."""
    i = start
    while m._journal.records < MAX // 2 + 1:
        m.set_position(pos(f"S{i % 4}", i + 1))
        i += 1
    settle(m)
    return i


def caller_creates(ops: list[Any]) -> list[str]:
    """The operations of the caller's thread that create, rename or sync a directory entry."""
    out = []
    for op in ops:
        if op.name == "open" and op.flags is not None and op.flags & os.O_CREAT:
            out.append(f"open(O_CREAT) {op.path}")
        elif op.name in ("fsync_dir", "replace", "link"):
            out.append(f"{op.name} {op.path}")
    return out


def run(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, env=CLEAN_ENV, catch_exceptions=False)


def keyed(d: Path) -> list[str]:
    key_file = d.parent / f"{d.name}.key.txt"
    if not key_file.exists():
        key_file.write_text(encode_key_text(KEY) + "\n")
        key_file.chmod(0o600)
    return ["--state-dir", str(d), "--key-file", str(key_file)]


# ------------------------------------------------------------------------------------------ the caller's path
@pytest.mark.parametrize("mode", ["sync", "group"])
def test_first_record_after_a_rotation_creates_no_file_on_the_callers_thread(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3: the update that rotates writes the new segment's header and its record into the spare (a
    pwrite at offset 0 and, in sync mode, an fdatasync): no O_CREAT, no rename, no directory fsync."""
    with held(monkeypatch) as gate, make(tmp_path, durability=mode) as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        probe = HarnessOps(skip_thread_prefix="posstate-compact")
        with fs.use(probe):
            while not m._journal.rotating:
                m.set_position(pos(f"S{i % 4}", i + 1))
                i += 1
        assert caller_creates(probe.ops) == []
        starts = [op.index for op in probe.ops if op.name == "write" and op.offset == 0]  # (pwrite is a "write")
        assert len(starts) == 1, probe.ops
        if mode == "sync":
            assert probe.ops[starts[0] + 1].name == "fdatasync"
        head = jf.parse_header(next_path(m.config.journal_path).read_bytes())
        assert head.follows(jf.parse_header(m.config.journal_path.read_bytes()))
        gate.release.set()
        assert m.compact(wait=True)
        want = contracts(m)
    with make(tmp_path, durability=mode) as m:
        assert contracts(m) == want


def test_first_record_after_a_save_uses_the_spare_and_the_thread_renames_it(tmp_path: Path) -> None:
    """issue 14.3: after save() the journal the snapshot names starts in the spare too (no file created on
    the caller's thread); the spare's thread then renames it over the journal's name and prepares the next
    spare. A crash image taken before that rename loads every record and validates."""
    gate, entered = threading.Event(), threading.Event()
    real = JournalSpare._promote_live

    def held(self: JournalSpare) -> None:
        entered.set()
        assert gate.wait(60), "test never released the rename"
        real(self)

    image = tmp_path / "image"
    with make(tmp_path / "live") as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        m.save()
        probe = HarnessOps(skip_thread_prefix="posstate-compact")
        JournalSpare._promote_live = held  # type: ignore[method-assign]
        try:
            with fs.use(probe):
                m.set_position(pos("S0", 1000))
            assert caller_creates(probe.ops) == []
            assert entered.wait(60)
            m.set_position(pos("S1", 1001))  # the live journal is .next until the rename
            copy_tree(tmp_path / "live", image)
        finally:
            JournalSpare._promote_live = real  # type: ignore[method-assign]
            gate.set()
        settle(m)
        cfg = m.config
        assert jf.parse_header(cfg.journal_path.read_bytes()).id_hex == m._journal.journal_id
        assert spare_ready(m) and is_blank(next_path(cfg.journal_path).read_bytes())
        for k in range(i, i + MAX + 3):  # through a rotation: the new spare is adopted
            m.set_position(pos(f"S{k % 4}", k + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    with make(tmp_path / "live") as m:
        assert contracts(m) == want
    with make(image) as m:
        got = contracts(m)
        assert got["S0"] == 1000 and got["S1"] == 1001
    val = run([*keyed(image), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr


def test_close_removes_the_unused_spare(tmp_path: Path) -> None:
    """issue 14.3: close() leaves no blank .next behind (a crash may; it is harmless and replaced)."""
    with make(tmp_path) as m:
        fill_until_spare(m)
        assert spare_ready(m)
        nxt = next_path(m.config.journal_path)
        assert nxt.exists() and is_blank(nxt.read_bytes())
    assert not nxt.exists()


# ---------------------------------------------------------------------------------------------- the readers
@pytest.fixture
def spare_image(tmp_path: Path) -> Path:
    """A copy of a live directory holding an unused spare (as a SIGKILL would leave it)."""
    live, img = tmp_path / "live", tmp_path / "image"
    with make(live) as m:
        m.save()
        assert m.wait_for_backups(60)
        fill_until_spare(m)
        assert spare_ready(m)
        copy_tree(live, img)
    nxt = next_path(cfg_of(img).journal_path)
    assert nxt.exists() and is_blank(nxt.read_bytes()) and nxt.stat().st_size > jf.HEADER_SIZE
    return img


def test_validate_history_and_show_accept_a_prepared_spare(spare_image: Path) -> None:
    """issue 14.3: validate exits 0 and reads no segment in a blank .next; history and show see the journal
    only; nothing is written."""
    before = {p: p.read_bytes() for p in spare_image.rglob("*") if p.is_file()}
    val = run([*keyed(spare_image), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr
    assert "segment" not in val.stdout
    hist = run([*keyed(spare_image), "history", "--json"])
    assert hist.exit_code == 0, hist.stderr
    show = run([*keyed(spare_image), "show", "--json"])
    assert show.exit_code == 0, show.stderr
    assert {p: p.read_bytes() for p in spare_image.rglob("*") if p.is_file()} == before


def test_doctor_accepts_a_prepared_spare(spare_image: Path) -> None:
    """issue 14.3: doctor on a directory holding an unused spare finds nothing wrong with it."""
    from posstate.selftest.doctor import format_report, run_doctor

    report = run_doctor(spare_image, self_test=False)
    assert report.verdict in ("ok", "warn"), format_report(report)
    assert not [f for f in report.findings if "next" in f.detail]


def test_load_recovery_and_repair_leave_a_blank_spare_out_of_quarantine(spare_image: Path) -> None:
    """issue 14.3: a load replays no segment from a blank .next; recovery and repair never quarantine it
    (nothing in it to keep) and lose nothing."""
    with make(spare_image) as m:
        want = contracts(m)
        assert m.last_recovery is None
        report = m.repair_state()
        assert report is not None
        assert contracts(m) == want
    q = cfg_of(spare_image).quarantine_dir
    assert not [p.name for p in q.iterdir() if ".next" in p.name] if q.exists() else True
    with make(spare_image) as m:
        assert contracts(m) == want


@pytest.mark.parametrize("size", [0, 50, jf.HEADER_SIZE, jf.HEADER_SIZE + 65536], ids=["empty", "short", "header", "full"])
def test_a_planted_or_torn_blank_next_is_harmless(tmp_path: Path, size: int) -> None:
    """issue 14.3: a blank .next of any length (a crash during its preparation, or planted) is no segment: the
    load ignores it, validate passes, the next rotation replaces it, and nothing goes to quarantine."""
    with make(tmp_path) as m:
        m.set_position(pos("A", 1))
    next_path(cfg_of(tmp_path).journal_path).write_bytes(bytes(size))
    val = run([*keyed(tmp_path), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr
    with make(tmp_path) as m:
        assert contracts(m) == {"A": 1}
        for k in range(2 * MAX):
            m.set_position(pos(f"S{k % 4}", k + 1))
        assert m.compact(wait=True)
        want = contracts(m)
    q = cfg_of(tmp_path).quarantine_dir
    assert not (q.exists() and [p for p in q.iterdir() if ".next" in p.name])
    with make(tmp_path) as m:
        assert contracts(m) == want


def test_a_spare_replaced_on_disk_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.3 (SECURITY.md): a file renamed over the prepared spare (here a copy of the journal, records
    the key authenticates) is not written into: the rotation moves it to quarantine and creates the segment,
    and every acknowledged record is loaded."""
    with held(monkeypatch) as gate, make(tmp_path) as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        nxt = next_path(m.config.journal_path)
        forged = tmp_path / "forged"
        forged.write_bytes(m.config.journal_path.read_bytes())
        os.replace(forged, nxt)
        while not m._journal.rotating:
            m.set_position(pos(f"S{i % 4}", i + 1))
            i += 1
        m.set_position(pos("S0", 999))
        want = contracts(m)
        head = jf.parse_header(nxt.read_bytes())
        assert head.follows(jf.parse_header(m.config.journal_path.read_bytes()))
        assert [p for p in m.config.quarantine_dir.iterdir() if ".next" in p.name]
        gate.release.set()
    with make(tmp_path) as m:
        assert contracts(m) == want


# ------------------------------------------------------------------------------ failures of the preparation
def _spare_ops(d: Path) -> list[str]:
    """The mutating operations (and reads) of one preparation, in order."""
    probe = HarnessOps(thread_prefix=SPARE_THREAD)
    with make(d) as m, fs.use(probe):
        fill_until_spare(m)
        assert spare_ready(m)
    return [op.name for op in probe.ops if op.name in MUTATING_AND_READS]


@pytest.mark.parametrize("step", [None, 16 * 1024], ids=["one-step", "stepped"])
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_fault_at_each_step_of_the_spare_preparation(
    tmp_path: Path, err: str, persistent: bool, step: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3: ENOSPC/EIO at each step of the preparation (once, or from then on): every update succeeds
    (the rotation creates the segment itself), the failure is reported (``error`` event, ``spare_error``),
    what the failure left is harmless, and a reload holds every change. *stepped*: zeros written and synced
    16 KiB at a time (``SPARE_STEP``), a fault at each write and sync of them."""
    if step is not None:
        monkeypatch.setattr(spare_mod, "SPARE_STEP", step)
    names = _spare_ops(tmp_path / "probe")
    assert {"open", "write", "fsync", "fsync_dir"} <= set(names), names
    assert step is None or names.count("fdatasync") >= 4, names
    code = getattr(errno, err)
    for k in range(1, len(names) + 1):
        d = tmp_path / f"k{k}"
        errors: list[dict[str, Any]] = []
        ops = HarnessOps(fault=Fault(at=k, errno=code, persistent=persistent, ops=MUTATING_AND_READS), thread_prefix=SPARE_THREAD)
        with make(d) as m:
            m.on("error", errors.append)
            with fs.use(ops):
                i = fill_until_spare(m)
                assert not spare_ready(m), names[k - 1]
                assert m._journal.spare_error is not None
                for n in range(i, i + 2 * MAX):  # through a rotation: the fallback creates the segment
                    m.set_position(pos(f"S{n % 4}", n + 1))
                settle(m)
            assert m.compact(wait=True)
            want = contracts(m)
        assert [e["context"] for e in errors][:1] == ["journal segment preparation"], names[k - 1]
        assert ops.fired >= 1
        val = run([*keyed(d), "validate"])
        assert val.exit_code == 0, (names[k - 1], val.stdout + val.stderr)
        with make(d) as m:
            assert contracts(m) == want, names[k - 1]


_CHILD = textwrap.dedent(
    """
    import sys
    from decimal import Decimal
    from posstate import PositionStateManager, StateConfig, Position
    from posstate.journal.spare import SPARE_THREAD
    from posstate.selftest.harness import MUTATING, Fault, HarnessOps
    from posstate.storage import fileops as fs

    d, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = StateConfig.in_dir(d, backup_interval=1e9, journal_max_records=10)
    fault = Fault(at=k, action="crash_" + when, ops=MUTATING) if k else None
    ops = HarnessOps(fault=fault, thread_prefix=SPARE_THREAD)
    with fs.use(ops), PositionStateManager(cfg, key=bytes(range(32))) as m:
        m.load_positions()
        for i in range(1, 31):
            m.set_position(Position(symbol=f"S{i % 4}", side="long", contracts=Decimal(i), entry_price=Decimal(1)))
            print(f"ack {i}", flush=True)
            m._journal.wait_spare(60)  # the crash, if any, happens here: the preparation is the only I/O
        print("ops", ",".join(op.name for op in ops.ops if op.name in MUTATING), flush=True)
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_at_each_step_of_the_spare_preparation(tmp_path: Path, when: str) -> None:
    """issue 14.3: a real child is killed (SIGKILL) before/after each operation of a spare's preparation; the
    parent loads every acknowledged update, validate exits 0, and updates go on through rotations."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(d: Path, k: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _CHILD, str(d), str(k), when], env=env, capture_output=True, text=True, timeout=120
        )

    probe = child(tmp_path / "probe", 0)
    assert probe.returncode == 0, probe.stderr
    names = next(line.split()[1] for line in probe.stdout.splitlines() if line.startswith("ops")).split(",")
    per_spare = names.index("fsync_dir") + 1  # the first preparation's steps (more follow in later cycles)
    assert {"open", "write", "fsync"} <= set(names[:per_spare]), names
    for k in range(1, per_spare + 1):
        d = tmp_path / f"k{k}"
        out = child(d, k)
        assert out.returncode == -9, (k, out.returncode, out.stderr)
        acked = [int(w[1]) for line in out.stdout.splitlines() if len(w := line.split()) == 2 and w[0] == "ack"]
        assert acked, k
        last = max(acked)

        def upto(n: int) -> dict[str, int]:
            return {f"S{i % 4}": i for i in range(max(1, n - 3), n + 1)}

        with make(d) as m:  # the update in flight when the preparation started may be durable too
            assert contracts(m) in (upto(last), upto(last + 1)), (k, names[k - 1])
        val = run([*keyed(d), "validate"])
        assert val.exit_code == 0, (k, val.stdout + val.stderr)
        with make(d) as m:
            for i in range(last + 1, last + 1 + 2 * MAX):
                m.set_position(pos(f"S{i % 4}", i))
            assert m.compact(wait=True)
            want = contracts(m)
        with make(d) as m:
            assert contracts(m) == want, k


def test_replica_ships_no_spare_and_restores_over_a_blank_next(tmp_path: Path) -> None:
    """issue 14.3: the replica shipper never ships a blank spare as a segment; a restore into a directory
    holding only a blank .next (a crash's leftover) is allowed and loads every acknowledged change."""
    from tests.replica_util import rcfg, restore_into

    url = f"file://{tmp_path}/rep"
    with PositionStateManager(rcfg(tmp_path / "bot", url, journal_max_records=MAX), key=KEY) as m:
        fill_until_spare(m)
        assert spare_ready(m)
        assert m.flush_replica(30)
        want = contracts(m)
    new = tmp_path / "new"
    new.mkdir(mode=0o700)
    next_path(StateConfig.in_dir(new).journal_path).write_bytes(bytes(jf.HEADER_SIZE + 4096))
    cfg, _ = restore_into(new, url, None, KEY)
    with PositionStateManager(StateConfig.in_dir(cfg.state_dir), key=KEY) as m:
        assert contracts(m) == want


def _record_rotation_with(d: Path, key: bytes, name: str) -> Any:
    """Record the update that rotates into a spare prepared during it, with the first sync called *name* (of
    any thread: the spare's come first, the rotation waits for them) made a no-op."""
    from posstate.selftest import reljournal as rj
    from posstate.selftest.crashjournal import config, counters, expected_positions, update_position
    from posstate.selftest.replay import snapshot

    rj.warm(d, key=key, kind="compaction")
    ops = HarnessOps(keep_data=True, fault=Fault(at=1, action="skip", ops=frozenset({name})), counting=False)
    with fs.use(ops), PositionStateManager(config(d), key=key) as m:
        old = m.load_positions()
        i = counters(old).get(0, 0) + 1
        before = snapshot(d)
        mark = len(ops.ops)
        open_fds = ops.open_files()
        ops.counting = True
        m.set_position(update_position(0, i))
        ops.counting = False
        recorded = list(ops.ops[mark:])
    return rj.RecordedUpdate(d, before, recorded, open_fds, old, expected_positions(i), True)


@pytest.mark.parametrize("name", ["fdatasync", "fsync", "fsync_dir"])
def test_each_sync_of_the_spare_preparation_under_power_loss(tmp_path: Path, name: str) -> None:
    """issue 14.3: power-loss replay (every subset of unsynced writes and directory operations) of a rotation
    into a spare whose first step's fdatasync, file fsync or directory fsync was made a no-op. Without the
    directory fsync the acknowledged record can be lost with the spare's name: the replay notices. The
    file's syncs are not needed for durability (the record's fdatasync persists the blocks it needs) but for
    speed (that fdatasync then commits no metadata); the replay loses nothing without either."""
    from posstate import generate_key
    from posstate.selftest import reljournal as rj

    key = generate_key()
    rec = _record_rotation_with(tmp_path / "s", key, name)
    skipped = [op for op in rec.ops if op.faulted == "skip"]
    assert [op.name for op in skipped] == [name] and skipped[0].thread.startswith(SPARE_THREAD)
    lost = [o for o in rj.replay(rec, tmp_path / "w", key=key) if o.lost]
    assert bool(lost) == (name == "fsync_dir"), [(o.state.label, o.result, o.detail) for o in lost][:3]


@pytest.mark.parametrize("after", ["rotation", "save"])
def test_group_sync_failure_of_the_first_record_in_the_spare(tmp_path: Path, after: str) -> None:
    """issue 14.3: in group mode the first record in the spare is made durable by the group's fdatasync; when
    that fails the change fails, the file is cut back to the segment's header (never to an empty journal the
    snapshot names), and the next change, a reload and validate lose nothing acknowledged."""
    with make(tmp_path, durability="group") as m:
        i = fill_until_spare(m)
        assert spare_ready(m)
        if after == "save":
            m.save()
        else:
            while m._journal.records < MAX - 1:
                m.set_position(pos(f"S{i % 4}", i + 1))
                i += 1
        ops = HarnessOps(fault=Fault(at=1, ops=frozenset({"fdatasync"})), skip_thread_prefix="posstate-compact")
        with fs.use(ops), pytest.raises(PosStateError):
            m.set_position(pos("S0", 5000))  # starts the segment in the spare; its group sync fails
        assert ops.fired == 1
        settle(m)
        copy_tree(tmp_path, tmp_path.parent / f"{tmp_path.name}-image")  # as a crash now would leave it
        before = contracts(m)
        m.set_position(pos("S1", 5001))
        assert m.compact(wait=True)
        want = contracts(m)
        assert want["S0"] != 5000 and want["S1"] == 5001
    val = run([*keyed(tmp_path), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr
    with make(tmp_path, durability="group") as m:
        assert contracts(m) == want
    image = tmp_path.parent / f"{tmp_path.name}-image"
    with make(image, durability="group") as m:
        assert contracts(m) == before and m.last_recovery is None
    val = run([*keyed(image), "validate"])
    assert val.exit_code == 0, val.stdout + val.stderr


@pytest.mark.parametrize("mode", ["sync", "group"])
def test_the_background_compaction_starts_after_the_rotations_first_record(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.3: the change that rotates writes (and syncs) the new segment's first record before the
    background compaction does anything (its first slices hold the interpreter lock, and for a small state
    its fsync would share the disk with that record's fdatasync)."""
    from posstate.journal import spare as _spare

    monkeypatch.setattr(_spare, "SEGMENT_START_WAIT", 60.0)  # the order, not the bound, is under test
    with make(tmp_path, durability=mode) as m:
        fill_until_spare(m)
        assert spare_ready(m)
        rec = HarnessOps(ignore_threads=frozenset())
        with fs.use(rec):
            while not m._journal.rotating:
                m.set_position(pos("S0", m._journal.records + 100))
            assert m.compact(wait=True)
    syncs = [op.index for op in rec.ops if op.name == "fdatasync" and not op.thread.startswith("posstate-compact")]
    background = [op.index for op in rec.ops if op.thread.startswith("posstate-compact-positions")]
    assert syncs and background
    assert max(syncs) < min(background), [(op.thread, op.name) for op in rec.ops]
