"""Issue 14.2 (session 13): the verified-backup cache kept across restarts in ``positions.json.verdicts``,
authenticated under the key. Failure paths first: nothing on disk without the key's tag plants a verdict, a
verdict never outlives a change of its backup, a failing disk costs checks and never a prune."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import logging
import os
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import Position, PositionStateManager, StateConfig
from posstate.backup import background as _background
from posstate.backup import ledger as _ledger
from posstate.storage import fileops as fs

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def pos(symbol: str, contracts: int = 1) -> Position:
    return Position(symbol=symbol, side="long", contracts=Decimal(contracts), entry_price=Decimal("10"))


def cfg_in(d: Path, backup_dir: Path | None = None, **kw: Any) -> StateConfig:
    kw.setdefault("backup_interval", 0.0)
    kw.setdefault("durability", "snapshot")
    kw.setdefault("max_backups", 20)
    cfg = StateConfig.in_dir(d, **kw)
    return cfg if backup_dir is None else dataclasses.replace(cfg, backup_dir=str(backup_dir))


def cache(m: PositionStateManager) -> Any:
    return _background.service(m._files).cache


def with_backups(d: Path, n: int, key: bytes = KEY, **kw: Any) -> None:
    """A state with *n* backups its manager made (each verified when created), its verdicts kept at close."""
    with PositionStateManager(cfg_in(d, **kw), key=key) as m:
        for i in range(n):
            m.save_positions([pos("A", i + 1)])
            assert m.wait_for_backups(30)
        m.prune_old_backups()  # the prune writes the verdict file


def first_prune_checks(d: Path, key: bytes = KEY, **kw: Any) -> tuple[int, list[dict[str, Any]]]:
    """A restarted manager's first prune: how many backups it fully checked, and its error events."""
    with PositionStateManager(cfg_in(d, **kw), key=key) as m:
        errors: list[dict[str, Any]] = []
        m.on("error", errors.append)
        m.load_positions()
        m.prune_old_backups()
        return cache(m).full_checks, errors


def verdicts(d: Path) -> Path:
    return d / "positions.json.verdicts"


def quarantined(d: Path) -> list[str]:
    q = d / "quarantine"
    return sorted(n for n in os.listdir(q) if "untrusted-verdicts" in n) if q.exists() else []


def sealed(body: bytes, key: bytes) -> bytes:
    """A verdict file tagged under *key* (the format, written by a test that holds a key)."""
    mac_key = hmac.new(key, b"posstate/verdict-key/v1", hashlib.sha256).digest()
    return body + hmac.new(mac_key, body, hashlib.sha256).digest()


# ------------------------------------------------------------------------------------------ nothing plants a verdict


def test_a_verdict_file_planted_without_the_key_is_quarantined_and_every_backup_checked(tmp_path: Path) -> None:
    with_backups(tmp_path, 3)
    good = verdicts(tmp_path).read_bytes()
    planted = good[:-32] + bytes(32)  # same verdicts, a tag made without the key
    verdicts(tmp_path).write_bytes(planted)
    checks, errors = first_prune_checks(tmp_path)
    assert checks == 3
    assert len(quarantined(tmp_path)) == 1 and (tmp_path / "quarantine" / quarantined(tmp_path)[0]).read_bytes() == planted
    assert errors and errors[0]["context"] == "backup verdicts" and "tag" in errors[0]["error"]
    assert KEY.hex() not in str(errors)


def test_a_verdict_file_of_another_key_is_not_trusted(tmp_path: Path) -> None:
    """The right format and a real tag, under another key: a copied-in file of another bot."""
    other = tmp_path / "other"
    with_backups(other, 2, key=OTHER_KEY)
    with_backups(tmp_path / "mine", 2)
    shutil.copyfile(verdicts(other), verdicts(tmp_path / "mine"))
    checks, _ = first_prune_checks(tmp_path / "mine")
    assert checks == 2 and len(quarantined(tmp_path / "mine")) == 1


@pytest.mark.parametrize("content", [b"", b"posstate-verdicts/v1\n", b"garbage" * 10, os.urandom(100)])
def test_a_short_or_garbage_verdict_file_is_quarantined(tmp_path: Path, content: bytes) -> None:
    with_backups(tmp_path, 2)
    verdicts(tmp_path).write_bytes(content)
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 2 and len(quarantined(tmp_path)) == 1


def test_an_oversized_verdict_file_is_quarantined_without_being_read(tmp_path: Path) -> None:
    with_backups(tmp_path, 1)
    with open(verdicts(tmp_path), "wb") as f:
        f.truncate(_ledger.MAX_BYTES + 1)
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 1 and len(quarantined(tmp_path)) == 1


def test_a_directory_at_the_verdict_path_is_moved_whole_to_quarantine(tmp_path: Path) -> None:
    with_backups(tmp_path, 2)
    verdicts(tmp_path).unlink()
    verdicts(tmp_path).mkdir()
    (verdicts(tmp_path) / "inside").write_bytes(b"kept")
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 2
    (moved,) = quarantined(tmp_path)
    assert (tmp_path / "quarantine" / moved / "inside").read_bytes() == b"kept"
    assert verdicts(tmp_path).is_file()  # a new verdict file in its place


def test_a_verdict_file_that_cannot_be_quarantined_is_never_replaced(tmp_path: Path) -> None:
    """Its move to quarantine fails (a read-only quarantine folder): it is not used, and stays as it was."""
    with_backups(tmp_path, 2)
    verdicts(tmp_path).write_bytes(b"planted")
    (tmp_path / "quarantine").mkdir(mode=0o700, exist_ok=True)

    class NoQuarantine(fs.FileOps):
        def link(self, src: fs.StrPath, dst: fs.StrPath) -> None:
            if "quarantine" in str(dst):
                raise OSError(errno.EROFS, "injected EROFS", str(dst))
            super().link(src, dst)

    with fs.use(NoQuarantine()):
        checks, _ = first_prune_checks(tmp_path)
    assert checks == 2
    assert verdicts(tmp_path).read_bytes() == b"planted"


def test_a_backup_changed_between_two_runs_is_checked_again(tmp_path: Path) -> None:
    """The bit flip keeps the trailer, size and mtime: only the ctime tells; the verdict is not used."""
    with_backups(tmp_path, 3)
    victim = sorted((tmp_path / "backups").iterdir())[1]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[120] ^= 0x01
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 1
    assert not victim.exists()  # damaged: quarantined by the prune, as without the verdict file


def test_a_backup_renamed_over_between_two_runs_is_checked_again(tmp_path: Path) -> None:
    with_backups(tmp_path, 3)
    a, b, _ = sorted((tmp_path / "backups").iterdir())
    tmp = b.with_name(".swap")
    shutil.copyfile(a, tmp)
    os.replace(tmp, b)  # a valid backup under another's name: its inode and ctime are new
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 1


def test_an_older_verdict_file_put_back_is_set_aside_before_it_is_replaced(tmp_path: Path) -> None:
    """A replayed verdict file vouches only for backups whose probe still matches; the manager never writes
    over a file it did not read verified (it is moved to quarantine first)."""
    with_backups(tmp_path, 2)
    old = verdicts(tmp_path).read_bytes()
    with_backups(tmp_path, 2)  # two more backups, a newer verdict file
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        m.load_positions()
        m.prune_old_backups()  # reads the newer file
        verdicts(tmp_path).write_bytes(old)  # put back behind the manager's back
        m.save_positions([pos("B")])
        assert m.wait_for_backups(30)
        m.prune_old_backups()  # writes its verdicts: the replayed file goes to quarantine first
    assert len(quarantined(tmp_path)) == 1
    assert (tmp_path / "quarantine" / quarantined(tmp_path)[0]).read_bytes() == old
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 0


def test_a_verdict_file_for_another_backup_folder_is_not_used(tmp_path: Path) -> None:
    with_backups(tmp_path, 2)
    shutil.copytree(tmp_path / "backups", tmp_path / "elsewhere")
    checks, errors = first_prune_checks(tmp_path, backup_dir=tmp_path / "elsewhere")
    assert checks == 2 and not errors and not quarantined(tmp_path)


def test_a_verdict_read_from_the_file_is_confirmed_in_process_before_a_removal(tmp_path: Path) -> None:
    """Verdicts from the file count as not checked here: a prune that removes backups for the newest kept
    one checks that one in this process first."""
    with_backups(tmp_path, 4)
    with PositionStateManager(cfg_in(tmp_path, max_backups=2), key=KEY) as m:
        m.load_positions()
        result = m.prune_old_backups()
        assert len(result.removed) == 2
        assert cache(m).full_checks == 1  # the newest kept, in process; none of the others


def test_without_a_key_no_verdict_file_is_written(tmp_path: Path) -> None:
    with PositionStateManager(cfg_in(tmp_path, encryption=False)) as m:
        m.save_positions([pos("A")])
        assert m.wait_for_backups(30)
        m.prune_old_backups()
    assert not verdicts(tmp_path).exists()


def test_the_state_file_may_not_be_named_like_a_verdict_file(tmp_path: Path) -> None:
    from posstate import ConfigError

    with pytest.raises(ConfigError, match="verdicts"):
        StateConfig(state_file=str(tmp_path / "x.verdicts"))


# ------------------------------------------------------------------------------------------ a failing disk


class FailVerdictWrites(fs.FileOps):
    """*err* at the verdict file's temp (open, fsync) or rename: a full or failing disk under it."""

    def __init__(self, at: str, err: int = errno.ENOSPC) -> None:
        self.at, self.err = at, err

    def _fail(self, op: str, path: object) -> None:
        if op == self.at and ".verdicts" in str(path):
            raise OSError(self.err, f"injected {errno.errorcode[self.err]}", str(path))

    def open(self, path: fs.StrPath, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT:
            self._fail("open", path)
        return super().open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.at == "write" and os.readlink(f"/proc/self/fd/{fd}").find(".verdicts") >= 0:
            raise OSError(self.err, "injected", "")
        return super().write(fd, data)

    def replace(self, src: fs.StrPath, dst: fs.StrPath) -> None:
        self._fail("replace", dst)
        super().replace(src, dst)


@pytest.mark.parametrize("at", ["open", "write", "replace"])
def test_a_failed_verdict_write_costs_checks_never_the_prune(tmp_path: Path, at: str, caplog: pytest.LogCaptureFixture) -> None:
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        for i in range(2):
            m.save_positions([pos("A", i + 1)])
            assert m.wait_for_backups(30)
        verdicts(tmp_path).unlink()  # as if never written
        with fs.use(FailVerdictWrites(at)), caplog.at_level(logging.WARNING, logger="posstate"):
            m.save_positions([pos("A", 3)])
            assert m.wait_for_backups(30)  # its prune tries to write the verdicts of three backups
        assert "backup verdicts not written" in caplog.text
        assert not verdicts(tmp_path).exists()
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # the temp was removed
        m.save_positions([pos("A", 9)])
        assert m.wait_for_backups(30)
        m.prune_old_backups()  # the next prune writes it
    assert verdicts(tmp_path).exists()
    checks, _ = first_prune_checks(tmp_path)
    assert checks == 0


def test_a_temp_left_by_a_killed_writer_is_swept(tmp_path: Path) -> None:
    with_backups(tmp_path, 1)
    left = tmp_path / ".positions.json.verdicts.0123456789abcdef.tmp"
    left.write_bytes(b"half")
    first_prune_checks(tmp_path)
    assert not left.exists()
    assert (tmp_path / "positions.json").exists()


# ------------------------------------------------------------------------------------------ what it is for


def test_a_restarted_bot_checks_no_backup_it_verified_before(tmp_path: Path) -> None:
    with_backups(tmp_path, 5)
    data = verdicts(tmp_path).read_bytes()
    assert data.startswith(_ledger.MAGIC) and oct(verdicts(tmp_path).stat().st_mode & 0o777) == "0o600"
    assert KEY not in data and KEY.hex().encode() not in data
    checks, errors = first_prune_checks(tmp_path)
    assert checks == 0 and not errors


def test_passphrase_state_keeps_its_verdicts_across_a_restart(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"passphrase": "correct horse battery staple"}
    with PositionStateManager(cfg_in(tmp_path), **kw) as m:
        for i in range(2):
            m.save_positions([pos("A", i + 1)])
            assert m.wait_for_backups(30)
        m.prune_old_backups()
    with PositionStateManager(cfg_in(tmp_path), **kw) as m:
        m.load_positions()
        m.prune_old_backups()
        assert cache(m).full_checks == 0


def test_keeping_verdicts_before_the_first_check_reads_the_file_first(tmp_path: Path) -> None:
    """session 13 attack: a manager that remembers a backup and keeps its verdicts before any prune read the
    verdict file merges with it (the bot's own file is not set aside as unread)."""
    from posstate.backup.verified import probe

    with_backups(tmp_path, 2)
    with PositionStateManager(cfg_in(tmp_path), key=KEY) as m:
        m.load_positions()
        newest = m.list_backups()[0]
        c = cache(m)
        seen = probe(newest.path)
        assert seen is not None
        c.remember(newest.path.name, seen, newest)
        c.keep()
        assert not quarantined(tmp_path)
    checks, errors = first_prune_checks(tmp_path)
    assert checks == 0 and not errors


def test_the_backup_taken_at_close_is_in_the_verdict_file(tmp_path: Path) -> None:
    """session 13 (guard): the journal modes' backup of the acknowledged state at close() keeps its verdict
    (checked when written), so the next start does not check it again."""
    with_backups(tmp_path, 2)
    with PositionStateManager(cfg_in(tmp_path, durability="sync", backup_interval=3600), key=KEY) as m:
        m.load_positions()
        m.set_position(pos("C", 3))  # acknowledged, in no backup: close() backs it up
    assert len(os.listdir(tmp_path / "backups")) == 3
    checks, errors = first_prune_checks(tmp_path)
    assert checks == 0 and not errors
