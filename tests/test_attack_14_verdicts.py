"""Issue 14.2 attack (session 13): the verdict file (posstate/backup/ledger.py) under passphrase keyrings, key
rotation, a failing disk around its write, and the threads it runs on. Failure paths first."""

from __future__ import annotations

import errno
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import ledger as _ledger
from posstate.storage import crypto as _crypto
from posstate.storage import fileops as fs

KEY = bytes(range(32))
PASS = "correct horse battery staple"


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def cfg_in(d: Path, **kw: Any) -> StateConfig:
    kw.setdefault("backup_interval", 0.0)
    kw.setdefault("durability", "snapshot")
    kw.setdefault("max_backups", 20)
    return StateConfig.in_dir(d, **kw)


def cache(m: PositionStateManager) -> Any:
    return _background.service(m._files).cache


def verdicts(d: Path) -> Path:
    return d / "positions.json.verdicts"


def quarantined(d: Path) -> list[str]:
    q = d / "quarantine"
    return sorted(n for n in os.listdir(q) if "untrusted-verdicts" in n) if q.exists() else []


def with_backups(d: Path, n: int, **kw: Any) -> None:
    """*n* backups a manager made and verified, their verdicts kept in the verdict file."""
    secret: dict[str, Any] = {"passphrase": kw.pop("passphrase")} if "passphrase" in kw else {"key": kw.pop("key", KEY)}
    with PositionStateManager(cfg_in(d, **kw), **secret) as m:
        for i in range(n):
            m.save_positions([pos("A", i + 1)])
            assert m.wait_for_backups(30)
        m.prune_old_backups()
    assert verdicts(d).exists()


def restart_prune(d: Path, *, load: bool, **secret: Any) -> tuple[int, list[dict[str, Any]]]:
    """A new manager's first prune (after a load, or without one as ``posstate backups prune`` runs it): how many
    backups it checked fully, and its error events."""
    with PositionStateManager(cfg_in(d), **secret) as m:
        errors: list[dict[str, Any]] = []
        m.on("error", errors.append)
        if load:
            m.load_positions()
        m.prune_old_backups()
        return cache(m).full_checks, errors


# ------------------------------------------------------------------------------------------ passphrase keyrings


def test_a_passphrase_prune_before_any_load_trusts_the_verdict_file(tmp_path: Path) -> None:
    """issue 14.2: a passphrase manager that prunes before it loads (``posstate backups prune``) has no write salt
    yet; the verdict file's key must not be taken under a fresh random salt (which set the bot's good file aside,
    emitted an error and wrote one the bot's next start sets aside again)."""
    with_backups(tmp_path, 3, passphrase=PASS)
    checks, errors = restart_prune(tmp_path, load=False, passphrase=PASS)
    assert (checks, errors, quarantined(tmp_path)) == (0, [], [])
    checks, errors = restart_prune(tmp_path, load=True, passphrase=PASS)
    assert (checks, errors, quarantined(tmp_path)) == (0, [], [])


def test_cli_backups_prune_with_a_passphrase_keeps_the_bots_verdict_file(tmp_path: Path) -> None:
    """issue 14.2: ``posstate backups prune --yes`` (POSSTATE_PASSPHRASE, the bot stopped) neither sets the bot's
    verdict file aside nor leaves one the bot's next start sets aside."""
    from test_cli import run

    with_backups(tmp_path, 3, passphrase=PASS)
    r = run(["--state-dir", str(tmp_path), "backups", "prune", "--yes"], env={"POSSTATE_PASSPHRASE": PASS})
    assert r.exit_code == 0, r.stderr
    assert quarantined(tmp_path) == []
    checks, errors = restart_prune(tmp_path, load=True, passphrase=PASS)
    assert (checks, errors, quarantined(tmp_path)) == (0, [], [])


def test_a_passphrase_verdict_file_outlives_a_change_of_the_write_salt(tmp_path: Path) -> None:
    """issue 14.2: the write salt of a passphrase keyring follows the last file loaded (here a restore of a backup
    written under another salt, by a manager that took no backup after it); verdicts kept under the old salt are
    still the key's own, not planted: the next start must not set them aside and report an error."""
    with_backups(tmp_path, 2, passphrase=PASS)
    other = tmp_path / "other"
    with_backups(other, 1, passphrase=PASS)  # the same passphrase under its own random salt
    (foreign,) = sorted((other / "backups").iterdir())
    os.link(foreign, tmp_path / "backups" / "positions_20200101_000000.json")
    with PositionStateManager(cfg_in(tmp_path, backup_interval=1e9), passphrase=PASS) as m:
        m.load_positions()
        salt_before = m._keyring.write_material()[1]
        m.restore_from_backup("20200101_000000", accept_older=True)
        assert m._keyring.write_material()[1] != salt_before  # the state file is under the other salt now
    _checks, errors = restart_prune(tmp_path, load=True, passphrase=PASS)
    assert (errors, quarantined(tmp_path)) == ([], [])


def test_a_planted_verdict_file_with_its_own_salt_never_runs_scrypt_on_the_bots_thread(tmp_path: Path) -> None:
    """issue 14.2: a verdict file planted with another salt and a costly scrypt parameter is refused without a key
    derivation at that cost, and the derivation the ledger does run is never on the thread of set_position."""
    with_backups(tmp_path, 2, passphrase=PASS)
    data = verdicts(tmp_path).read_bytes()
    planted = data.replace(b'"log2_n":' + str(_crypto.DEFAULT_SCRYPT_LOG2_N).encode(), b'"log2_n":17')
    assert planted != data
    verdicts(tmp_path).write_bytes(planted)
    costs: list[tuple[int, str]] = []
    real = _crypto.derive_key

    def spy(passphrase: str, salt: bytes, log2_n: int = _crypto.DEFAULT_SCRYPT_LOG2_N) -> bytes:
        costs.append((log2_n, threading.current_thread().name))
        return real(passphrase, salt, log2_n)

    mp = pytest.MonkeyPatch()
    mp.setattr(_crypto, "derive_key", spy)
    try:
        with PositionStateManager(cfg_in(tmp_path), passphrase=PASS) as m:
            m.load_positions()
            costs.clear()
            m.set_position(pos("B"))
            m.save()  # then a background backup and its prune
            assert m.wait_for_backups(30)
            assert len(quarantined(tmp_path)) == 1
    finally:
        mp.undo()
    assert all(n != 17 for n, _ in costs)
    assert all(name != threading.current_thread().name for _, name in costs)


# ------------------------------------------------------------------------------------------ key rotation


def test_rekey_leaves_no_verdict_file_under_the_old_key(tmp_path: Path) -> None:
    """issue 14.2: ``posstate rekey`` rewrites every backup under the new key; a verdict file tagged under the old
    key is no longer the key's own, and the first start under the new key must not report it as planted."""
    from test_cli import run, write_key

    new = _crypto.generate_key()
    with_backups(tmp_path, 2)
    r = run(
        [
            "--state-dir",
            str(tmp_path),
            "--key-file",
            str(write_key(tmp_path / "old.key", KEY)),
            "rekey",
            "--new-key-file",
            str(write_key(tmp_path / "new.key", new)),
            "--yes",
        ]
    )
    assert r.exit_code == 0, r.stderr
    checks, errors = restart_prune(tmp_path, load=True, key=new)
    assert (checks, errors, quarantined(tmp_path)) == (2, [], [])


# ------------------------------------------------------------------------------------------ a failing disk


class FailOnce(fs.FileOps):
    """*err* once at the *at*-th file operation touching the verdict file or its temp."""

    def __init__(self, at: int, err: int = errno.EIO) -> None:
        self.at, self.err, self.seen, self.fired, self.last = at, err, 0, "", ""
        self._fds: set[int] = set()

    def _hit(self, op: str, *paths: object) -> None:
        if not any(".verdicts" in str(p) for p in paths):
            return
        self.seen += 1
        self.last = op
        if self.seen == self.at:
            self.fired = op
            raise OSError(self.err, f"injected at {op}", str(paths[0]))

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        self._hit("open", path)
        fd = super().open(path, flags, mode)
        if ".verdicts" in str(path):
            self._fds.add(fd)
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd in self._fds:
            self._hit("write", ".verdicts")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if fd in self._fds:
            self._hit("fsync", ".verdicts")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            self._hit("close", ".verdicts")
        super().close(fd)

    def replace(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        self._hit("replace", src, dst)
        super().replace(src, dst)

    def fsync_dir(self, path: fs.StrPath) -> None:
        if self.last == "replace":
            self._hit("fsync_dir", ".verdicts")  # the directory fsync right after the verdict file's rename
        super().fsync_dir(path)

    def lstat(self, path: fs.StrPath) -> os.stat_result:
        self._hit("lstat", path)
        return super().lstat(path)


@pytest.mark.parametrize("at", range(1, 9))
def test_one_fault_at_each_operation_of_a_verdict_write_never_reports_our_own_file_as_planted(tmp_path: Path, at: int) -> None:
    """issue 14.2: one EIO at any operation of the verdict file's save (its check of what is there, temp open,
    write, fsync, close, rename, the directory fsync, the stat after it): the next save must not take the file
    this manager wrote for someone else's (no quarantine, no error event), and a restart checks nothing."""
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        errors: list[dict[str, Any]] = []
        m.on("error", errors.append)
        m.save_positions([pos("A", 1)])
        assert m.wait_for_backups(30)
        m.prune_old_backups()
        fault = FailOnce(at)
        with fs.use(fault):
            m.save_positions([pos("A", 2)])
            assert m.wait_for_backups(30)  # its prune saves the verdicts, with one fault
        assert fault.fired  # lstat, open, write, fsync, close, rename, directory fsync, lstat
        for i in range(2):
            m.save_positions([pos("A", 3 + i)])
            assert m.wait_for_backups(30)
        assert (errors, quarantined(tmp_path)) == ([], []), fault.fired
    checks, errors = restart_prune(tmp_path, load=True, key=KEY)
    assert (checks, errors, quarantined(tmp_path)) == (0, [], [])
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_verdict_file_that_cannot_leave_the_state_directory_is_quarantined_once(tmp_path: Path) -> None:
    """issue 14.2: a planted verdict file linked into quarantine whose unlink keeps failing (EIO) is not linked
    into quarantine again at every prune (a quarantine entry and a warning each time)."""
    with_backups(tmp_path, 1)
    verdicts(tmp_path).write_bytes(b"planted")

    class NoUnlink(fs.FileOps):
        def unlink(self, path: fs.StrPath) -> None:
            if str(path).endswith(".verdicts"):
                raise OSError(errno.EIO, "injected EIO", str(path))
            super().unlink(path)

    with fs.use(NoUnlink()), PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        m.load_positions()
        for i in range(3):
            m.save_positions([pos("A", 10 + i)])
            assert m.wait_for_backups(30)
    assert len(quarantined(tmp_path)) == 1
    assert verdicts(tmp_path).read_bytes() == b"planted"


def test_the_ledger_is_never_read_or_written_on_the_thread_of_set_position(tmp_path: Path) -> None:
    """issue 14.2: in the journal modes the verdict file is read and written by the backup thread only."""
    with_backups(tmp_path, 2)
    threads: list[str] = []
    real_load, real_save = _ledger.VerdictFile.load, _ledger.VerdictFile.save

    def load(self: _ledger.VerdictFile) -> Any:
        threads.append(threading.current_thread().name)
        return real_load(self)

    def save(self: _ledger.VerdictFile, v: Any) -> None:
        threads.append(threading.current_thread().name)
        real_save(self, v)

    mp = pytest.MonkeyPatch()
    mp.setattr(_ledger.VerdictFile, "load", load)
    mp.setattr(_ledger.VerdictFile, "save", save)
    try:
        with PositionStateManager(cfg_in(tmp_path, durability="sync", backup_interval=0.0), key=KEY) as m:
            m.load_positions()
            for i in range(3):
                m.set_position(pos("S", i + 1))
                m.save()
                assert m.wait_for_backups(30)
    finally:
        mp.undo()
    assert threads and set(threads) == {"posstate-backup"}


def test_a_failed_verdict_write_is_retried_by_the_next_prune_even_when_nothing_changed(tmp_path: Path) -> None:
    """issue 14.2: the save after a prune fails (ENOSPC); the next prune finds every verdict unchanged in memory
    and must still write them (the last prune before close is often such a one), not leave the file stale."""
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        for i in range(2):
            m.save_positions([pos("A", i + 1)])
            assert m.wait_for_backups(30)
        m.prune_old_backups()
        with fs.use(FailOnce(2, errno.ENOSPC)):  # the temp's open
            m.save_positions([pos("A", 3)])
            assert m.wait_for_backups(30)  # a third backup; its verdict is not written
        m.prune_old_backups()  # nothing changed since: the verdicts are written now
    checks, errors = restart_prune(tmp_path, load=True, key=KEY)
    assert (checks, errors) == (0, [])


def test_verdicts_of_more_backups_than_the_file_may_hold_keep_the_newest_and_stay_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 14.2: a verdict file over MAX_BYTES is refused at the next load (quarantine, an error event, every
    backup checked, at every start); the writer keeps only the newest verdicts that fit instead."""
    monkeypatch.setattr(_ledger, "MAX_BYTES", 1500)  # four or five entries
    with_backups(tmp_path, 8)
    assert verdicts(tmp_path).stat().st_size <= 1500
    checks, errors = restart_prune(tmp_path, load=True, key=KEY)
    assert (errors, quarantined(tmp_path)) == ([], [])
    assert 0 < checks < 8  # the oldest ones did not fit: checked; the newest were not


def _vouch_for_damage(d: Path) -> Path:
    """What a backup changed under its probe looks like (a FAT folder, a lying disk): the newest backup's ciphertext
    changed under a recomputed trailer, and the verdict file (sealed here: the test holds the key) vouching for the
    changed file's probe. Returns the backup."""
    from posstate.backup.verified import probe
    from posstate.storage import container as _format
    from posstate.storage.crypto import Keyring

    kept = _ledger.VerdictFile(
        verdicts(d), folder=d / "backups", keyring=Keyring(key=KEY), quarantine_dir=d / "quarantine", emit=lambda *a: None
    )
    entries = kept.load()
    newest = max((d / "backups").iterdir())
    data = newest.read_bytes()
    body = bytearray(data[: -_format.TRAILER_SIZE])
    body[_format.HEADER_SIZE + 5] ^= 0x01
    newest.write_bytes(bytes(body) + _format.trailer_for(bytes(body)))
    seen = probe(newest)
    assert seen is not None
    entries[newest.name] = (seen, entries[newest.name][1])
    assert kept.save(entries)
    return newest


def test_a_contradicted_verdict_from_the_file_is_reported_as_such_and_dropped_from_the_file(tmp_path: Path) -> None:
    """issue 14.2: a verdict read from the verdict file that the in-process check contradicts is named as the
    file's (not a worker's), the worker is not given up for it, and the file no longer vouches for that backup (the
    next start does not fail its first prune again)."""
    with_backups(tmp_path, 3, compaction="process")
    changed = _vouch_for_damage(tmp_path)
    from posstate import PersistenceError

    with PositionStateManager(cfg_in(tmp_path, max_backups=1, compaction="process"), key=KEY) as m:
        m.load_positions()
        remote = cache(m).remote
        with pytest.raises(PersistenceError) as err:
            m.prune_old_backups()
        assert "worker" not in str(err.value) and "verdict file" in str(err.value)
        assert cache(m).remote is remote
    assert len(list((tmp_path / "backups").iterdir())) == 3  # nothing removed
    with PositionStateManager(cfg_in(tmp_path, max_backups=1), key=KEY) as m:
        m.load_positions()
        result = m.prune_old_backups()  # checks the changed backup itself (it fills no slot); no error
        assert [d.backup.path for d in result.kept if d.backup.valid] == [
            max(d.backup.path for d in result.removed + result.kept if d.backup.path != changed)
        ]


_KILL_CHILD = r"""
import os, sys
from decimal import Decimal
from pathlib import Path
from posstate import Position, PositionStateManager, StateConfig
from posstate.storage import fileops as fs

d, at = Path(sys.argv[1]), int(sys.argv[2])
fds = set()
seen = [0]

def hit(*paths):
    if any(".verdicts" in str(p) for p in paths):
        seen[0] += 1
        if seen[0] == at:
            os._exit(9)  # as SIGKILL: nothing after this operation runs

class Kill(fs.FileOps):
    def open(self, path, flags, mode=0o600):
        hit(path)
        fd = super().open(path, flags, mode)
        if ".verdicts" in str(path):
            fds.add(fd)
        return fd
    def write(self, fd, data):
        if fd in fds:
            hit(".verdicts")
        return super().write(fd, data)
    def fsync(self, fd):
        if fd in fds:
            hit(".verdicts")
        super().fsync(fd)
    def replace(self, src, dst):
        hit(src, dst)
        super().replace(src, dst)
    def lstat(self, path):
        hit(path)
        return super().lstat(path)

cfg = StateConfig.in_dir(d, backup_interval=0.0, durability="snapshot", max_backups=20)
with PositionStateManager(cfg, key=bytes(range(32))) as m:
    m.load_positions()
    with fs.use(Kill()):
        m.save_positions([Position(symbol="K", side="long", contracts=Decimal(1), entry_price=Decimal(10))])
        assert m.wait_for_backups(30)
print("ran", seen[0])
"""


def test_a_kill_at_each_operation_of_a_verdict_write_leaves_an_authentic_file_and_no_temp(tmp_path: Path) -> None:
    """issue 14.2: a process killed at any operation of the verdict file's save (its lstat, the temp's open, write,
    fsync, rename, the lstat after it): the next start reports nothing, sets nothing aside, leaves no temp, and
    checks at most the backup whose verdict was being written."""
    import subprocess
    import sys

    at = 0
    while True:
        at += 1
        d = tmp_path / f"k{at}"
        with_backups(d, 2)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        r = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(d), str(at)], env=env, capture_output=True, timeout=120)
        if r.returncode == 0:
            assert r.stdout.decode().startswith("ran ") and at > 5, r.stdout
            break
        assert r.returncode == 9, r.stderr.decode()[-2000:]
        checks, errors = restart_prune(d, load=True, key=KEY)
        assert (errors, quarantined(d)) == ([], []), at
        assert checks <= 1, at
        assert not [n for n in os.listdir(d) if n.endswith(".tmp")], at


def test_verdicts_checked_before_close_stopped_a_prune_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 14.2: close() stops the first prune after a restart half way (a bot restarted by its supervisor, or
    in a crash loop); the backups it did check are in the verdict file, so the next start does not check them
    again (else a bot that never lives through one whole first prune checks every backup at every start)."""
    from posstate.backup import backups as _backups

    with_backups(tmp_path, 4)
    verdicts(tmp_path).unlink()  # none kept: every old backup is checked by the first prune
    real = _backups.full_check
    done: list[str] = []
    with PositionStateManager(cfg_in(tmp_path, compaction="thread"), key=KEY) as m:
        svc = _background.service(m._files)

        def counted(info: Any, **kw: Any) -> Any:
            out = real(info, **kw)
            done.append(info.path.name)
            if len(done) == 2:
                svc._stop_checks = True  # what close() sets: the prune's checks stop at their next slice
            return out

        monkeypatch.setattr(_backups, "full_check", counted)
        m.load_positions()
        m.save_positions([pos("Z")])
        assert m.wait_for_backups(30)
        monkeypatch.setattr(_backups, "full_check", real)
        assert len(done) == 2
    checks, errors = restart_prune(tmp_path, load=True, key=KEY)
    assert (checks, errors) == (2, [])  # the two the stopped prune never reached
