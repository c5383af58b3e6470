"""Issue 14 attack (the background turn, posstate/storage/turns.py): a holder stuck in a file read, and a wait
for the turn (or a pause) interrupted by an exception, must not stop every other manager's background work."""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import backups as _backups
from posstate.storage import fileops as fs
from posstate.storage import turns as _turns

KEY = bytes(range(32))


def pos(i: int, contracts: int = 1) -> Position:
    return Position(symbol=f"S{i:05d}", side="long", contracts=Decimal(contracts), entry_price=Decimal("10.5"))


@pytest.fixture(autouse=True)
def fresh_turns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own turn object: a leaked ticket (the bug) must not hang the rest of the suite."""
    monkeypatch.setattr(_turns, "_turns", _turns._Turns())
    yield


class _StuckReads(fs.FileOps):
    """A disk on which reading one folder's files hangs (a dead NFS mount) until *release* is set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.entered = threading.Event()
        self.release = threading.Event()

    def read_file(self, path: fs.StrPath, limit: int | None = None, max_size: int | None = fs.DEFAULT_MAX_READ_BYTES) -> bytes:
        if Path(path).parent == self.folder:
            self.entered.set()
            assert self.release.wait(60)
        return super().read_file(path, limit, max_size=max_size)


def test_a_backup_check_stuck_in_a_read_does_not_hold_the_turn(tmp_path: Path) -> None:
    """issue 14.3 attack: one manager's background full check stuck reading its backup (a hung disk) keeps
    no turn, so another manager's compaction in the same process still finishes (its journal stays bounded)."""
    other = StateConfig.in_dir(tmp_path / "b", durability="sync", backup_interval=1e9)
    with PositionStateManager(other, key=KEY) as mb:
        mb.save_positions([pos(i) for i in range(50)])
        mb.create_backup()
        info = mb.list_backups()[0]
        options = mb._read
    cfg = StateConfig.in_dir(tmp_path / "a", durability="sync", backup_interval=1e9)
    stuck = _StuckReads(other.backup_path)
    with PositionStateManager(cfg, key=KEY) as m, fs.use(stuck):
        m.save_positions([pos(i) for i in range(100)])
        checker = threading.Thread(target=_backups.full_check, args=(info,), kwargs={"options": options, "pause": _turns.pause})
        checker.start()
        try:
            assert stuck.entered.wait(30)
            for i in range(5):
                m.set_position(pos(i, 9))
            assert m.compact(wait=True, timeout=20)  # was False: the stuck reader held the turn
        finally:
            stuck.release.set()
            checker.join(30)
        want = m.get_positions()
    with PositionStateManager(cfg, key=KEY) as again:
        assert again.load_positions() == want


class _Stop(BaseException):
    """A KeyboardInterrupt-like exception delivered to the main thread by a signal."""


_fired = threading.Event()


def _interrupt_main_when(pred: object, first: threading.Event | None = None) -> threading.Thread:
    """A thread that waits for *first*, then (on the turn's condition) until *pred* holds, then signals the
    main thread until its handler has run (a signal that lands just before the main thread blocks in a lock
    wait does not interrupt that wait: it is sent again)."""
    turns = _turns._turns

    def run() -> None:
        assert first is None or first.wait(30)
        with turns.cond:
            assert turns.cond.wait_for(pred, 30)  # type: ignore[arg-type]
        for _ in range(300):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
            if _fired.wait(0.1):
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def stop_on_sigusr1() -> Iterator[None]:
    """SIGUSR1 raises _Stop in the main thread, once (a signal sent again after that is ignored)."""
    _fired.clear()

    def handler(signum: int, frame: object) -> None:
        if not _fired.is_set():
            _fired.set()
            raise _Stop

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


def _holder() -> tuple[threading.Thread, threading.Event, threading.Event]:
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _turns.turn():
            inside.set()
            assert release.wait(30)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert inside.wait(30)
    return t, inside, release


def _can_take_turn() -> bool:
    got = threading.Event()

    def take() -> None:
        with _turns.turn():
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return got.wait(20)


@pytest.mark.usefixtures("stop_on_sigusr1")
def test_an_interrupted_wait_for_the_turn_leaks_no_ticket() -> None:
    """issue 14.3 attack: a caller's main thread interrupted (Ctrl-C) while it waits for the turn (an
    explicit prune_old_backups) gives up its place: the next background job still gets the turn."""
    turns = _turns._turns
    holder, _, release = _holder()
    _interrupt_main_when(lambda: turns.issued >= turns.serving + 2)
    with pytest.raises(_Stop), _turns.turn():
        pytest.fail("the turn was taken while another thread held it")
    release.set()
    holder.join(30)
    assert _can_take_turn()  # was False: serving stopped at the abandoned ticket for ever


@pytest.mark.usefixtures("stop_on_sigusr1")
def test_an_interrupted_pause_gives_no_second_turn() -> None:
    """issue 14.3 attack: an exception while a pause waits to take the turn back neither hands the turn to a
    second thread while the first holds it, nor leaks the interrupted thread's place."""
    turns = _turns._turns
    other_in, other_release = threading.Event(), threading.Event()
    third_in = threading.Event()

    def other() -> None:
        with _turns.turn():
            other_in.set()
            assert other_release.wait(30)

    def third() -> None:
        with _turns.turn():
            third_in.set()

    with pytest.raises(_Stop), _turns.turn():
        threading.Thread(target=other, daemon=True).start()
        with turns.cond:
            assert turns.cond.wait_for(lambda: turns.issued >= 2, 30)
        threading.Thread(target=third, daemon=True).start()
        with turns.cond:
            assert turns.cond.wait_for(lambda: turns.issued >= 3, 30)
        # the pause hands the turn to `other`, then waits behind `third`: interrupted there
        _interrupt_main_when(lambda: turns.issued >= 4, first=other_in)
        _turns.pause()
    assert other_in.is_set()
    assert not third_in.is_set()
    with turns.cond:
        assert turns.serving == 1  # `other` still holds the turn (was 2: `third` let in beside it)
    other_release.set()
    assert third_in.wait(20)
    assert _can_take_turn()


def test_a_backup_of_memory_cancelled_by_close_adds_no_backup_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2 attack: close() that gives up on a background backup of memory (here waiting for the turn
    behind another job) and reports "cancelled ... no backup was added" is right: no backup appears after
    the writer lock is released."""
    from posstate.backup import background as _background
    from posstate.backup import viacompaction as _via

    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=0.05)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(100)])
    assert m.wait_for_backups(30)
    turns = _turns._turns
    holder, _, release = _holder()  # another manager's long job holds the turn
    # Issue 14.2: a timed backup backs memory up only as the fallback when compactions keep failing.
    monkeypatch.setattr(_via, "decide", lambda svc: "memory")
    try:
        m.set_position(pos(1, 9))  # acknowledged in the journal: the timer backs memory up, in slices
        with turns.cond:  # the backup thread waits for the turn
            assert turns.cond.wait_for(lambda: turns.issued >= turns.serving + 2, 30)
        svc = _background.service(m._files)
        worker = svc._thread
        before = sorted(p.name for p in cfg.backup_path.iterdir())
        failed: list[dict[str, object]] = []
        m.on("backupFailed", failed.append)
        monkeypatch.setattr(_background, "CLOSE_TIMEOUT", 0.2)
        m.close()
    finally:
        release.set()
        holder.join(30)
    assert worker is not None
    worker.join(30)
    assert not worker.is_alive()
    said = [str(e.get("reason")) for e in failed]
    assert any("no backup was added" in s for s in said), said
    assert sorted(p.name for p in cfg.backup_path.iterdir()) == before, said  # one appeared after close


def test_a_planted_backups_scrypt_does_not_block_the_bots_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.3 attack: a backup planted with its own salt makes the background check derive a key with
    scrypt (up to 2**17, ~0.4 s); the bot's save (or a journal rotation) needs the keyring too and must not
    wait for that derivation."""
    from posstate.storage import crypto as _crypto
    from posstate.storage.crypto import Keyring

    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9)
    with PositionStateManager(cfg, passphrase="correct horse") as m:
        m.save_positions([pos(i) for i in range(20)])
        assert m.wait_for_backups(30)  # the first backup's prune is over: the planted file is checked below only
        attacker = Keyring(passphrase="attacker", log2_n=10)
        planted = _backups.write_backup(
            m._state.copy(),
            backup_dir=cfg.backup_path,
            keyring=attacker,
            compression_level=None,
            options=dataclasses.replace(m._read, keyring=attacker),
            now=1_700_000_000,
        )
        ours = m._write_keyring.write_material()[1]
        entered, release = threading.Event(), threading.Event()
        real = _crypto.derive_key

        def slow_scrypt(passphrase: str, salt: bytes, log2_n: int = 15) -> bytes:
            if salt != ours:  # the planted salt: a long derivation
                entered.set()
                assert release.wait(60)
            return real(passphrase, salt, log2_n)

        monkeypatch.setattr(_crypto, "derive_key", slow_scrypt)
        checker = threading.Thread(
            target=_backups.full_check, args=(planted,), kwargs={"options": m._read, "pause": _turns.pause}, daemon=True
        )
        checker.start()
        saved = threading.Event()

        def bot() -> None:
            m.set_position(pos(1, 5))
            m.save()
            saved.set()

        try:
            assert entered.wait(30)
            threading.Thread(target=bot, daemon=True).start()
            assert saved.wait(20)  # was blocked on the keyring's lock until the planted derivation ended
        finally:
            release.set()
            checker.join(30)


def test_close_from_a_background_backup_event_handler_closes(tmp_path: Path) -> None:
    """issue 14.2 attack: a bot that closes its manager from a backupCreated handler (run on the backup
    thread) gets a closed manager and a released lock, not RuntimeError("cannot join current thread") with
    the writer lock still held; the backup thread then prunes nothing in a directory it no longer owns."""
    from posstate.backup import prune as _prune

    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=0.05)
    m = PositionStateManager(cfg, key=KEY)
    m.save_positions([pos(i) for i in range(10)])
    assert m.wait_for_backups(30)
    done = threading.Event()
    errors: list[str] = []
    prunes: list[bool] = []
    real_prune = _prune.prune_backups

    def counting_prune(files: Any, **kw: Any) -> Any:
        prunes.append(m.closed)
        return real_prune(files, **kw)

    def handler(event: dict[str, Any]) -> None:
        if event.get("background") and threading.current_thread().name == "posstate-backup":
            try:
                m.close()
            except BaseException as exc:  # what the bot would see
                errors.append(repr(exc))
            done.set()

    m.on("backupCreated", handler)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_prune, "prune_backups", counting_prune)
        m.set_position(pos(1, 5))  # acknowledged in the journal: the timer backs memory up
        assert done.wait(30)
        worker = _background_thread(m)
        if worker is not None:
            worker.join(30)
    assert errors == [] and m.closed
    assert True not in prunes  # no prune after the manager closed
    with PositionStateManager(cfg, key=KEY) as again:  # the writer lock was released
        assert again.load_positions()[pos(1).key].contracts == 5


def _background_thread(m: PositionStateManager) -> threading.Thread | None:
    svc = m._files.backups
    return None if svc is None else svc._thread


def test_a_backup_of_memory_is_not_checked_again_by_the_prune_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.2 attack: a timed backup of memory (the fallback when compactions keep failing) is fully verified
    once, as it is written (in slices); the prune that follows takes that verdict from the cache instead of
    decrypting and validating it again."""
    from posstate.backup import background as _background
    from posstate.backup import viacompaction as _via

    monkeypatch.setattr(_via, "decide", lambda svc: "memory")

    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=0.05)
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(200)])
        assert m.wait_for_backups(30)
        m.prune_old_backups()  # every backup on disk is in the cache now
        cache = _background.service(m._files).cache
        before = cache.full_checks
        created: list[dict[str, Any]] = []
        done = threading.Event()

        def seen(e: dict[str, Any]) -> None:
            if e.get("acknowledged"):
                created.append(e)
                done.set()

        m.on("backupCreated", seen)
        m.set_position(pos(1, 5))  # in the journal only: the timer backs memory up
        assert done.wait(30)
        assert m.wait_for_backups(30)
        assert cache.full_checks == before  # was before + 1: the new backup decrypted and validated twice
        assert m.prune_old_backups().kept
        assert cache.full_checks == before


def test_save_gives_up_a_compaction_waiting_for_the_turn_at_once(tmp_path: Path) -> None:
    """issue 14.3 attack: save() (manager lock held) gives up a pending background compaction; one that waits
    for the turn behind another job is dropped at once instead of the bot waiting for that job, then for the
    compaction's whole O(state) encode, only to throw it away."""
    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9, compaction="thread")
    turns = _turns._turns
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(100)])
        holder, _, release = _holder()  # another manager's long job holds the turn
        saved = threading.Event()
        try:
            m.set_position(pos(1, 4))
            assert m.compact(wait=False)  # rotates; the compaction thread queues for the turn
            with turns.cond:
                assert turns.cond.wait_for(lambda: turns.issued >= turns.serving + 2, 30)

            def bot() -> None:
                m.set_position(pos(2, 6))
                m.save()
                saved.set()

            threading.Thread(target=bot, daemon=True).start()
            assert saved.wait(20)  # was blocked until the other job gave the turn back
        finally:
            release.set()
            holder.join(30)
        assert m.compact(wait=True, timeout=30)
        want = m.get_positions()
    assert _can_take_turn()
    with PositionStateManager(cfg, key=KEY) as again:
        assert again.load_positions() == want


def test_a_compaction_given_up_stops_at_its_next_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.3 attack: a save() that gives up a background compaction in the middle of its O(state) work
    waits for one slice of it, not for the rest of the view and encode (which would be thrown away)."""
    cfg = StateConfig.in_dir(tmp_path, durability="sync", backup_interval=1e9, compaction="thread")
    turns = _turns._turns
    with PositionStateManager(cfg, key=KEY) as m:
        m.save_positions([pos(i) for i in range(20_000)])
        in_work, go = threading.Event(), threading.Event()
        after: list[int] = []
        real_pause = _turns.pause

        def pause() -> None:
            if threading.current_thread().name.startswith("posstate-compact"):
                if not in_work.is_set():
                    in_work.set()
                    assert go.wait(30)
                else:
                    after.append(1)
            real_pause()

        monkeypatch.setattr(_turns, "pause", pause)
        m.set_position(pos(1, 4))
        assert m.compact(wait=False)
        assert in_work.wait(30)
        job = m._bg_job
        assert job is not None
        saved = threading.Event()

        def bot() -> None:
            m.save()
            saved.set()

        threading.Thread(target=bot, daemon=True).start()
        with turns.cond:  # the save set the job's cancelled flag (and woke the turn's waiters)
            assert turns.cond.wait_for(lambda: job.cancelled, 30)
        go.set()
        assert saved.wait(30)
        assert after == []  # was one per remaining slice of the view and the encode
        want = m.get_positions()
    with PositionStateManager(cfg, key=KEY) as again:
        assert again.load_positions() == want
