"""Issue 15 (points 1-7) attack: the online backup, the backup of the acknowledged state, close(), keys,
asyncio and generations, tried as an attacker, a failing disk and a wrong clock would."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.storage import fileops as fs


def pos(symbol: str, contracts: int) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("100"))


class _BlockingSync(fs.FileOps):
    """fdatasync blocks (once armed) until released: a slow disk under a group commit."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        super().fdatasync(fd)


def test_acknowledged_copy_never_waits_for_a_group_sync_under_the_managers_lock(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 attack: the timed backup's copy of memory (group mode) waits for the pending group sync
    outside the manager's lock: the bot's other threads are not blocked behind a slow fdatasync."""
    cfg = StateConfig.in_dir(tmp_path / "s", durability="group", backup_interval=1e9)
    ops = _BlockingSync()
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))  # a plain record from here on
        drained = threading.Event()
        journal = m._journal
        real_drain = journal.drain

        def drain() -> None:
            drained.set()
            real_drain()

        journal.drain = drain  # type: ignore[method-assign]
        got: list[Any] = []
        with fs.use(ops):
            ops.armed = True
            writer = threading.Thread(target=m.set_position, args=(pos("A", 3),))
            writer.start()
            assert ops.entered.wait(30)  # the writer leads a group sync that is stuck in fdatasync
            copier = threading.Thread(target=lambda: got.append(m._files.acknowledged()))
            copier.start()
            assert drained.wait(30)
            free = m._lock.acquire(timeout=2)  # the bot's other threads need this lock now
            if free:
                m._lock.release()
            ops.release.set()
            writer.join(30)
            copier.join(30)
        assert free, "the manager's lock was held while waiting for a group fdatasync"
        assert got and got[0] is not None
        assert int(got[0].positions[("A", "long")].contracts) == 3


class _StuckBackup(fs.FileOps):
    """The background backup thread blocks at its first fsync until released (a stuck disk)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def fsync(self, fd: int) -> None:
        if threading.current_thread().name == "posstate-backup" and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(60)
        super().fsync(fd)


def test_close_backup_is_bounded_when_a_background_backup_is_stuck(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.2 attack: close() with journaled changes no backup holds, while a timed backup is stuck in a file
    operation: the close backup gives up within close()'s bound (it never waits on the folder lock forever),
    close() releases the writer lock and reports what it left."""
    from posstate.backup import background as _background

    monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.05)
    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    m = PositionStateManager(cfg, key=key)
    failed: list[dict[str, Any]] = []
    m.on("backupFailed", failed.append)
    m.set_position(pos("A", 1))
    m.set_position(pos("A", 2))
    assert m.wait_for_backups(30)  # the first snapshot's timed backup is done: the next one is ours
    stuck = _StuckBackup()
    with fs.use(stuck):
        svc = _background.service(m._files)
        m._files.last_backup_at = float("-inf")
        svc.request()
        assert stuck.reached.wait(30)
        m.set_position(pos("A", 3))  # memory is ahead of anything a backup holds: close wants a backup
        closer = threading.Thread(target=m.close)
        closer.start()
        closer.join(20)
        done = not closer.is_alive()
        stuck.release.set()
        closer.join(60)
    assert done, "close() waited for a stuck background backup without bound"
    assert m.closed
    assert any(f["operation"] == "close" for f in failed)
    with PositionStateManager(cfg, key=key) as again:  # the writer lock was released
        assert int(again.get_position("A", "long").contracts) == 3  # type: ignore[union-attr]


def test_close_releases_the_lock_when_the_close_backup_raises_unexpectedly(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.2 attack: the close backup failing with an unexpected exception (a bug, MemoryError) never
    keeps the writer lock or the journal open: close() finishes, reports backupFailed, and raises nothing."""
    from posstate.backup import acked as _acked

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("boom")

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    m = PositionStateManager(cfg, key=key)
    failed: list[dict[str, Any]] = []
    m.on("backupFailed", failed.append)
    m.set_position(pos("A", 1))
    m.set_position(pos("A", 2))
    monkeypatch.setattr(_acked, "from_memory", boom)
    m.close()
    assert m.closed
    assert failed and failed[-1]["operation"] == "close"
    with PositionStateManager(cfg, key=key) as again:
        assert int(again.get_position("A", "long").contracts) == 2  # type: ignore[union-attr]


class _FullBackupFolder(fs.FileOps):
    """ENOSPC for every write into the backup folder (the disk filled up): the state file itself is fine."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.fds: set[int] = set()
        self.fired = 0

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        if str(path).startswith(self.folder):
            self.fds.add(fd)
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd in self.fds:
            self.fired += 1
            raise OSError(28, "injected ENOSPC")
        return super().write(fd, data)


def test_close_backup_on_a_full_disk_releases_everything_and_reports(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 attack: the backup at close() hits ENOSPC: close() still closes the journal and releases the
    writer lock, reports backupFailed (operation "close"), leaves no temp, and the state loads whole."""
    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    m = PositionStateManager(cfg, key=key)
    failed: list[dict[str, Any]] = []
    m.on("backupFailed", failed.append)
    m.set_position(pos("A", 1))
    assert m.wait_for_backups(30)  # the first snapshot's timed backup
    m.set_position(pos("A", 2))  # journaled: no backup holds it, none is due
    before = sorted(p.name for p in cfg.backup_path.iterdir())
    full = _FullBackupFolder(cfg.backup_path)
    with fs.use(full):
        m.close()
    assert m.closed and full.fired
    assert failed and failed[-1]["operation"] == "close" and "ENOSPC" in failed[-1]["reason"]
    assert sorted(p.name for p in cfg.backup_path.iterdir()) == before  # no temp, no partial backup
    with PositionStateManager(cfg, key=key) as again:
        assert int(again.get_position("A", "long").contracts) == 2  # type: ignore[union-attr]


def test_backups_verify_is_not_fooled_by_a_backup_the_bot_pruned_meanwhile(
    tmp_path: Path, key: bytes, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.3 attack: `backups verify` beside a running bot: a backup retention removed between the listing
    and its check is said to be gone, not DAMAGED, and verify exits 0 (no false alarm at 3 a.m.)."""
    from click.testing import CliRunner

    from posstate.cli import backups_cmd
    from posstate.cli.main import cli

    state = tmp_path / "state"
    with PositionStateManager(StateConfig.in_dir(state, backup_interval=1e9), key=key) as m:
        m.set_position(pos("A", 1))
        first = m.create_backup()
        m.set_position(pos("A", 2))
        m.create_backup()
    real = backups_cmd.validate_file

    def pruned_meanwhile(path: Path, **kw: Any) -> Any:
        if path == first.path and path.exists():
            path.unlink()  # the bot's retention, between the listing and this check
        return real(path, **kw)

    monkeypatch.setattr(backups_cmd, "validate_file", pruned_meanwhile)
    base = ["--state-dir", str(state), "--key-file", str(key_file)]
    r = CliRunner().invoke(cli, [*base, "backups", "verify"])
    assert r.exit_code == 0, r.output
    assert "gone" in r.output and "DAMAGED" not in r.output
    r = CliRunner().invoke(cli, [*base, "--json", "backups", "verify"])
    assert r.exit_code == 0, r.output

    def all_pruned(path: Path, **kw: Any) -> Any:
        path.unlink(missing_ok=True)
        return real(path, **kw)

    monkeypatch.setattr(backups_cmd, "validate_file", all_pruned)
    r = CliRunner().invoke(cli, [*base, "backups", "verify"])
    assert r.exit_code == 6 and "removed meanwhile" in r.output + r.stderr  # nothing checked is not "valid"


def test_online_temp_dated_far_in_the_future_is_swept(tmp_path: Path, key: bytes) -> None:
    """issue 15.3 attack (wrong clock, planted file): an online-backup temp whose time is over an hour in the
    future (the clock was stepped back, or it was planted so) is garbage, not "young": the lock holder sweeps it;
    one dated now is left alone."""
    import os
    import time

    cfg = StateConfig.in_dir(tmp_path / "state", durability="snapshot", backup_interval=1e9)
    cfg.backup_path.mkdir(parents=True)
    future = cfg.backup_path / ".online-positions_20990101_000000.json.0123456789abcdef.tmp"
    young = cfg.backup_path / ".online-positions_20260101_000000.json.fedcba9876543210.tmp"
    future.write_bytes(b"x")
    young.write_bytes(b"y")
    ahead = time.time() + 2 * 86400
    os.utime(future, (ahead, ahead))
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.save()
        m.create_backup()
    assert young.exists() and not future.exists()


@pytest.mark.parametrize("how", ["single", "transaction"])
def test_first_bot_metadata_goes_into_a_schema_2_snapshot_not_only_the_journal(tmp_path: Path, key: bytes, how: str) -> None:
    """issue 15.7 attack (an older reader): the first bot metadata is written into a snapshot (schema 2), never
    only as a journal record over a schema-1 snapshot: the release before it takes an unknown record for damage,
    "recovers" without it and drops every later acknowledged change (0 generations lost), while a schema-2
    snapshot makes it refuse the file (UnsupportedVersionError) and touch nothing."""
    from posstate.storage import codec as _codec

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))  # journaled over the first snapshot (schema 1)
        if how == "single":
            m.set_bot_metadata({"step": 1})
        else:
            with m.transaction():
                m.set_position(pos("B", 1))
                m.set_bot_metadata({"step": 1})
        header = _codec.inspect(cfg.state_path.read_bytes())
        assert header.schema_version == 2, "bot metadata sits only in the journal over a schema-1 snapshot"
        m.set_bot_metadata({"step": 2})  # later ones are journaled as usual
        m.set_position(pos("C", 1))
    with PositionStateManager(cfg, key=key) as again:
        assert again.get_bot_metadata() == {"step": 2}
        assert again.get_position("C", "long") is not None
        assert again.last_recovery is None


@pytest.mark.parametrize("live", [False, True], ids=["quarantined", "quarantined-and-live"])
def test_planted_journal_with_a_huge_revision_cannot_push_generations_out_of_range(tmp_path: Path, live: bool) -> None:
    """issue 15.4 attack (keyless, an attacker who can write the directory): a journal planted in quarantine
    (and one at the live name) whose records claim revisions near 2**53 does not push the generation past what
    a journal can be created at: after the recovery the bot still saves and journals."""
    import shutil

    from posstate.journal import format as _jformat

    def cfg(d: Path) -> StateConfig:
        return StateConfig.in_dir(d, encryption=False, backup_interval=1e9)

    evil, victim = tmp_path / "evil", tmp_path / "victim"
    with PositionStateManager(cfg(evil)) as m:
        m.set_position(pos("A", 1))
        m._files.raise_generation(2**53 - 10)
        m.set_position(pos("A", 2))
        m.set_position(pos("A", 3))
        shutil.copy(evil / "positions.json.journal", tmp_path / "planted")
    with PositionStateManager(cfg(victim)) as m:
        m.set_position(pos("B", 1))
        m.save()
        m.create_backup()
    (victim / "quarantine").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "planted", victim / "quarantine" / "positions.json.journal.20260101T000000Z.journal")
    if live:
        shutil.copy(tmp_path / "planted", victim / "positions.json.journal")
    (victim / "positions.json").write_bytes(b"garbage" * 10)
    with PositionStateManager(cfg(victim)) as m:
        m.load_positions()
        assert m.generation <= _jformat.MAX_BASE
        for i in range(3):
            m.set_position(pos("B", i + 5))
        m.save()
        m.set_position(pos("B", 9))
    with PositionStateManager(cfg(victim)) as m:
        assert int(m.get_position("B", "long").contracts) == 9  # type: ignore[union-attr]


def test_nested_atransaction_is_part_of_the_outer_block(tmp_path: Path, key: bytes) -> None:
    """issue 15.6 attack: an atransaction() nested in another (same task) is part of the outer block, as a nested
    transaction() is: the outer block raising afterwards applies neither; a raising inner block drops only its
    own changes; a successful pair is one journal record."""
    import asyncio

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))

        async def outer_raises() -> None:
            async with m.atransaction() as tx:
                tx.set_position(pos("B", 1))
                async with m.atransaction() as inner:
                    inner.set_position(pos("C", 1))
                raise RuntimeError("abort")

        with pytest.raises(RuntimeError):
            asyncio.run(outer_raises())
        assert set(m.get_positions()) == {("A", "long")}

        before = m._journal.records

        async def inner_raises() -> None:
            async with m.atransaction() as tx:
                tx.set_position(pos("B", 2))
                with pytest.raises(RuntimeError):
                    async with m.atransaction() as inner:
                        inner.set_position(pos("C", 2))
                        raise RuntimeError("inner only")
                async with m.atransaction() as inner:
                    inner.set_position(pos("D", 2))

        asyncio.run(inner_raises())
        assert set(m.get_positions()) == {("A", "long"), ("B", "long"), ("D", "long")}
        assert m._journal.records == before + 1


def test_async_writers_inside_an_atransaction_block_are_refused(tmp_path: Path, key: bytes) -> None:
    """issue 15.6 attack: `await m.aset_position(p)` inside `async with m.atransaction()` would apply at once,
    outside the block's all-or-nothing (kept when the block then raises): refused with TransactionError that
    says to use tx.set_position; nothing applied."""
    import asyncio

    from posstate import TransactionError

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))

        async def mixed() -> None:
            async with m.atransaction() as tx:
                tx.set_position(pos("B", 1))
                await m.aset_position(pos("C", 1))
                raise RuntimeError("never reached")

        with pytest.raises(TransactionError, match="tx"):
            asyncio.run(mixed())
        assert set(m.get_positions()) == {("A", "long")}

        async def other_task_may_write() -> None:  # another task's writer is not inside the block
            async with m.atransaction() as tx:
                tx.set_position(pos("B", 1))
                await asyncio.ensure_future(asyncio.to_thread(lambda: None))
            await m.aset_position(pos("C", 1))

        asyncio.run(other_task_may_write())
        assert set(m.get_positions()) == {("A", "long"), ("B", "long"), ("C", "long")}


def test_online_read_that_loses_every_race_says_busy_not_damaged(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.3 attack: a bot that compacts between every snapshot read and journal read of an online backup
    (a new snapshot each time) exhausts the retries: the error says the state kept changing and to try again
    (StateLockedError, exit 5), never that the journal is damaged and `posstate repair` should run."""
    from posstate import CorruptStateError, StateLockedError
    from posstate.backup import acked as _acked
    from posstate.journal import current as _current
    from posstate.storage import statefile as _statefile
    from posstate.storage.crypto import Keyring

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))
    real = _current.read_current
    calls = 0

    def churning(config: StateConfig, options: Any) -> Any:
        nonlocal calls
        calls += 1
        cur = real(config, options)
        loaded = type(cur.loaded)(
            **{**{f: getattr(cur.loaded, f) for f in cur.loaded.__dataclass_fields__}, "checksum": f"c{calls}"}
        )
        err = CorruptStateError(
            config.journal_path, "journal X holds records up to 9, but the snapshot belongs to Y", kind="journal"
        )
        return type(cur)(loaded=loaded, state=cur.state, error=err)

    monkeypatch.setattr(_acked, "read_current", churning)
    options = _statefile.ReadOptions(keyring=Keyring(key=key))
    with pytest.raises(StateLockedError) as info:
        _acked.consistent_current(cfg, options)
    assert calls == _acked.ATTEMPTS
    assert "repair" not in str(info.value) and "try again" in str(info.value)


def test_online_read_of_a_journal_not_its_snapshots_is_reported_at_once(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.3 attack: the same snapshot read twice with a journal that is not its own is real damage (no
    compaction happened in between): reported after the second read, not retried twenty times."""
    from posstate import CorruptStateError
    from posstate.backup import acked as _acked
    from posstate.journal import current as _current
    from posstate.storage import statefile as _statefile
    from posstate.storage.crypto import Keyring

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))
    real = _current.read_current
    calls = 0

    def damaged(config: StateConfig, options: Any) -> Any:
        nonlocal calls
        calls += 1
        cur = real(config, options)
        err = CorruptStateError(
            config.journal_path, "journal X holds records up to 9, but the snapshot belongs to Y", kind="journal"
        )
        return type(cur)(loaded=cur.loaded, state=cur.state, error=err)

    monkeypatch.setattr(_acked, "read_current", damaged)
    with pytest.raises(CorruptStateError):
        _acked.consistent_current(cfg, _statefile.ReadOptions(keyring=Keyring(key=key)))
    assert calls == 2


def test_clean_close_after_a_save_still_leaves_a_fresh_backup(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 attack: in a journal mode, when the last change before a clean close() went into a snapshot
    (save(), a compaction, the first bot metadata) and no timed backup was due, close() still leaves a backup
    of that state: "nothing journaled" is not "backed up"."""
    from posstate.backup import backups as _backups

    cfg = StateConfig.in_dir(tmp_path / "state")
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        assert m.wait_for_backups(30)
        m.set_position(pos("B", 2))
        m.save()
        want = m.generation
    newest = _backups.scan(cfg.backup_path)[0]
    assert newest.generation == want


def test_create_backup_inside_a_transaction_never_deadlocks_with_a_timed_backup(
    tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15.2 attack: a timed backup of memory holds the backup folder and wants the manager's lock, while
    the bot, inside transaction() (holding that lock), calls create_backup() (which wants the folder): the
    timed backup gives up its turn instead of waiting forever; the bot's call returns (here: refused, as any
    backup inside a transaction is) and the manager keeps working."""
    from posstate import PosStateError
    from posstate.backup import background as _background

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9)
    m = PositionStateManager(cfg, key=key)
    m.set_position(pos("A", 1))
    m.set_position(pos("A", 2))
    assert m.wait_for_backups(30)
    wants_lock = threading.Event()
    from posstate.manager.files import ManagerFiles

    real = ManagerFiles.acknowledged
    real_ask = ManagerFiles.request_compaction

    def acknowledged(self: ManagerFiles) -> Any:
        wants_lock.set()
        return real(self)

    def request_compaction(self: ManagerFiles) -> Any:  # issue 14.2: the timed backup asks for a compaction
        wants_lock.set()
        return real_ask(self)

    monkeypatch.setattr(ManagerFiles, "acknowledged", acknowledged)
    monkeypatch.setattr(ManagerFiles, "request_compaction", request_compaction)
    outcome: list[object] = []

    def bot() -> None:
        with m.transaction():
            m.set_position(pos("B", 1))
            svc = _background.service(m._files)
            m._files.last_backup_at = float("-inf")
            svc.request()
            assert wants_lock.wait(30)  # the timed backup holds the folder and waits for our lock
            try:
                m.create_backup()
                outcome.append("created")
            except PosStateError as exc:
                outcome.append(exc)
        outcome.append("done")

    t = threading.Thread(target=bot, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "deadlock: create_backup() inside transaction() against a timed backup of memory"
    assert outcome[-1] == "done"
    m.set_position(pos("C", 1))
    m.close()


def test_restore_warns_when_it_drops_positions_even_at_the_same_count() -> None:
    """issue 15.2 attack: a backup holding as many positions as the current state, but other ones, still drops
    open positions: the loud warning names how many, not only when the count is lower."""
    from posstate.cli.restore_preview import fewer_positions_warning
    from posstate.model.document import StateData

    cur = StateData(positions={("BTC/USDT", "long"): pos("BTC/USDT", 1), ("ETH/USDT", "long"): pos("ETH/USDT", 1)})
    bak = StateData(positions={("BTC/USDT", "long"): pos("BTC/USDT", 1), ("SOL/USDT", "long"): pos("SOL/USDT", 1)})
    warning = fewer_positions_warning(cur, bak, "20260101_000000")
    assert warning is not None and "drops 1 open position" in warning and "ETH/USDT" in warning
    assert fewer_positions_warning(cur, cur, "x") is None
    fewer = fewer_positions_warning(cur, StateData(positions={("BTC/USDT", "long"): pos("BTC/USDT", 1)}), "b")
    assert fewer is not None and fewer.startswith("WARNING: backup b holds 1 position(s) but the current state holds 2")


def test_infinite_backup_interval_never_kills_the_backup_thread(tmp_path: Path, key: bytes) -> None:
    """issue 15.2 attack (hostile config): backup_interval=inf (an "infinite" interval: timed backups never due)
    in a journal mode does not kill the backup thread with an OverflowError in its timer wait: a backup asked
    for later still runs."""
    from posstate.backup import background as _background

    died: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)
    try:
        cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=float("inf"))
        with PositionStateManager(cfg, key=key) as m:
            m.set_position(pos("A", 1))
            m.set_position(pos("A", 2))
            assert m.wait_for_backups(30)
            svc = _background.service(m._files)
            m._files.last_backup_at = float("-inf")
            taken = svc.taken
            assert svc.request()
            assert m.wait_for_backups(30)  # issue 14.2: and for the compaction it asked for, whose snapshot it copies
            assert svc.taken == taken + 1
            assert svc._thread is not None and svc._thread.is_alive()
    finally:
        threading.excepthook = old_hook
    assert died == []


def test_first_bot_metadata_snapshot_failing_changes_nothing(tmp_path: Path, key: bytes) -> None:
    """issue 15.7 attack (disk full): the first bot metadata, written as a snapshot, fails with ENOSPC: a
    PersistenceError (outcome known), memory and disk without it; the next try succeeds."""
    import errno

    from posstate import PersistenceError
    from posstate.selftest.harness import Fault, HarnessOps

    cfg = StateConfig.in_dir(tmp_path / "s", durability="group", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))
        gen = m.generation
        full = HarnessOps(fault=Fault(at=1, errno=errno.ENOSPC, persistent=True, ops=frozenset({"write"})))
        with fs.use(full), pytest.raises(PersistenceError) as info:
            m.set_bot_metadata({"step": 1})
        assert not info.value.outcome_unknown
        assert m.get_bot_metadata() is None and m.generation == gen
        m.set_bot_metadata({"step": 2})
    with PositionStateManager(cfg, key=key) as again:
        assert again.get_bot_metadata() == {"step": 2}
        assert int(again.get_position("A", "long").contracts) == 2  # type: ignore[union-attr]


def test_restore_preview_says_when_the_current_journal_cannot_be_replayed(tmp_path: Path, key: bytes, key_file: Path) -> None:
    """issue 15.2 attack: the diff before a restore is against the current state with its journal replayed;
    when the journal is damaged part-way the preview says it shows only what could be read (it never passes a
    partial state off as the current one)."""
    from click.testing import CliRunner

    from posstate.cli.main import cli

    state = tmp_path / "state"
    cfg = StateConfig.in_dir(state, backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        old = m.create_backup()
        for i in range(2, 6):
            m.set_position(pos("B", i))  # journal records
    data = bytearray(cfg.journal_path.read_bytes())
    data[120] ^= 0x40  # inside an early record: damage before the last one
    cfg.journal_path.write_bytes(bytes(data))
    r = CliRunner().invoke(
        cli, ["--state-dir", str(state), "--key-file", str(key_file), "backups", "restore", old.id, "--dry-run"]
    )
    assert "could not be replayed in full" in r.output + r.stderr, r.output


class _CutOnFirstSync(fs.FileOps):
    """At the first fdatasync, cut the journal back to *size* first: the bot's failed group sync cutting its
    unacknowledged records off, between the online backup's read and its confirmation."""

    def __init__(self, journal: Path, size: int) -> None:
        self.journal = journal
        self.size = size
        self.cut = False

    def fdatasync(self, fd: int) -> None:
        if not self.cut:
            self.cut = True
            import os

            os.truncate(self.journal, self.size)
        super().fdatasync(fd)


def test_online_backup_never_holds_a_record_cut_after_it_was_read(tmp_path: Path, key: bytes) -> None:
    """issue 15.3 attack (a record never acknowledged): the online backup makes the journal records it read
    durable itself and reads again; a record the bot cut off meanwhile (its sync failed: the caller was told
    it failed) is not in the backup."""
    from posstate.backup import acked as _acked
    from posstate.storage import statefile as _statefile
    from posstate.storage.crypto import Keyring

    cfg = StateConfig.in_dir(tmp_path / "s", durability="sync", backup_interval=1e9, journal_preallocate=0)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.set_position(pos("A", 2))
        size = cfg.journal_path.stat().st_size
        m.set_position(pos("A", 3))  # the record the bot will "fail" and cut
    keyring = Keyring(key=key)
    options = _statefile.ReadOptions(keyring=keyring)
    ops = _CutOnFirstSync(cfg.journal_path, size)
    with fs.use(ops):
        info = _acked.online(cfg, options, write_keyring=keyring)
    assert ops.cut
    got = _statefile.read(info.path, options=options, what="backup").state
    assert int(got.positions[("A", "long")].contracts) == 2


def test_quarantined_header_claiming_2_62_does_not_push_generations(tmp_path: Path, key: bytes) -> None:
    """issue 15.4 attack: a quarantined state-file copy whose (keyless, unauthenticated) header claims generation
    2**62 is not believed: after the recovery the generation stays within what a journal can start at, and the
    bot saves and journals on."""
    import re

    from posstate.journal import format as _jformat

    cfg = StateConfig.in_dir(tmp_path / "s", backup_interval=1e9)
    with PositionStateManager(cfg, key=key) as m:
        m.set_position(pos("A", 1))
        m.save()
        m.create_backup()
    data = cfg.state_path.read_bytes()
    lied = re.sub(rb" g=[0-9a-f]+", lambda mt: b" g=" + b"%0*x" % (len(mt.group(0)) - 3, 2**62), data, count=1)
    assert lied != data
    cfg.quarantine_dir.mkdir(parents=True, exist_ok=True)
    (cfg.quarantine_dir / "positions.json.20260101T000000Z.corrupt").write_bytes(lied)
    cfg.state_path.write_bytes(b"\0" * 200)
    with PositionStateManager(cfg, key=key) as m:
        m.load_positions()
        assert m.generation <= _jformat.MAX_BASE
        m.set_position(pos("A", 2))
        m.save()
        m.set_position(pos("A", 3))
    with PositionStateManager(cfg, key=key) as m:
        assert int(m.get_position("A", "long").contracts) == 3  # type: ignore[union-attr]
