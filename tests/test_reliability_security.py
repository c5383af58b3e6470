"""Security: private modes, planted symlinks never followed, the key never leaks, nonces never repeat."""

from __future__ import annotations

import base64
import errno
import logging
import os
import stat
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from posstate import PersistenceError, Position, PositionStateManager, PosStateError, StateConfig, WrongKeyError, generate_key
from posstate.core.events import EVENTS
from posstate.selftest.harness import Fault, HarnessOps
from posstate.storage import atomic as _atomic
from posstate.storage import codec as _codec
from posstate.storage import fileops as _fileops
from posstate.storage.crypto import Keyring


def _cfg(d: Path, **kw: Any) -> StateConfig:
    return StateConfig.in_dir(d, backup_interval=1e9, durability="snapshot", **kw)


def _pos(n: int) -> Position:
    return Position(symbol="BTC/USDT", side="long", contracts=Decimal(n), entry_price=Decimal("100.5"))


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_files_are_0600_and_directories_0700_even_with_umask_0(tmp_path: Path) -> None:
    """State dir, state file, .bak, lock and quarantine are private whatever the umask."""
    old = os.umask(0)
    try:
        d = tmp_path / "a" / "state"
        with PositionStateManager(_cfg(d), key=generate_key()) as m:
            m.save_positions([_pos(1)])
            m.save_positions([_pos(2)])
            (d / "positions.json").write_bytes(b"PSTATE01 damaged")  # next save quarantines it
            os.chmod(d / "positions.json", 0o600)
            m.save_positions([_pos(3)])
    finally:
        os.umask(old)
    assert _mode(d) == 0o700 and _mode(d.parent) == 0o700
    for name in ("positions.json", "positions.json.bak", "positions.json.lock"):
        assert _mode(d / name) == 0o600, name
    q = d / "quarantine"
    assert _mode(q) == 0o700
    assert [_mode(p) for p in q.iterdir()] == [0o600]


def test_symlink_planted_at_the_temp_path_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_EXCL|O_NOFOLLOW: a symlink where the temp file goes fails the save; its target is untouched."""
    d = tmp_path / "s"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    with PositionStateManager(_cfg(d), key=generate_key()) as m:
        m.save_positions([_pos(1)])
        planted = d / ".positions.json.planted.tmp"
        planted.symlink_to(victim)
        monkeypatch.setattr(_atomic, "temp_name", lambda target: planted)
        with pytest.raises(PersistenceError) as info:
            m.save_positions([_pos(2)])
        assert info.value.errno == errno.EEXIST
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink()


def test_temp_names_are_unpredictable(tmp_path: Path) -> None:
    """Each save's temp file has a new random name (an attacker cannot pre-plant it)."""
    names = {_atomic.temp_name(tmp_path / "positions.json").name for _ in range(1000)}
    assert len(names) == 1000


def test_symlink_planted_at_the_state_path_is_not_followed_on_load(tmp_path: Path) -> None:
    """positions.json -> another state file: load refuses (ELOOP from O_NOFOLLOW), never reads the target."""
    key = generate_key()
    other = tmp_path / "other"
    with PositionStateManager(_cfg(other), key=key) as m:
        m.save_positions([_pos(42)])
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    (d / "positions.json").symlink_to(other / "positions.json")
    with PositionStateManager(_cfg(d), key=key) as m, pytest.raises(PosStateError) as info:
        m.load_positions()
    assert isinstance(info.value, PersistenceError) and info.value.errno == errno.ELOOP
    assert str(d / "positions.json") in str(info.value)


def test_symlink_planted_at_the_state_path_is_not_written_through(tmp_path: Path) -> None:
    """A symlink swapped in at positions.json before a save: the save fails, the target is untouched."""
    d = tmp_path / "s"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    with PositionStateManager(_cfg(d), key=generate_key()) as m:
        m.save_positions([_pos(1)])
        (d / "positions.json").unlink()
        (d / "positions.json").symlink_to(victim)
        with pytest.raises(PersistenceError):
            m.save_positions([_pos(2)])
    assert victim.read_bytes() == b"precious"


def test_symlink_planted_at_the_bak_path_is_replaced_not_followed(tmp_path: Path) -> None:
    """rename() replaces a symlink at positions.json.bak with the real file; the target is untouched."""
    d = tmp_path / "s"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    with PositionStateManager(_cfg(d), key=generate_key()) as m:
        m.save_positions([_pos(1)])
        (d / "positions.json.bak").symlink_to(victim)
        m.save_positions([_pos(2)])
    assert victim.read_bytes() == b"precious"
    assert not (d / "positions.json.bak").is_symlink()


def _load(d: Path, **kw: Any) -> None:
    with PositionStateManager(_cfg(d), **kw) as m:
        m.load_positions()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            self.texts.append(repr(record.exc_info[1]))


def test_the_key_never_appears_in_logs_exceptions_reprs_or_events(tmp_path: Path) -> None:
    """A whole run (saves, loads, wrong key, damage, faults, passphrase) captured and scanned for the key."""
    key = generate_key()
    passphrase = "correct horse battery staple 9f3k"
    secrets = [key, base64.b64encode(key), base64.urlsafe_b64encode(key), key.hex().encode(), key.hex().upper().encode()]
    secrets.append(passphrase.encode())
    seen: list[str] = []
    handler = _Capture()
    log = logging.getLogger("posstate")
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)

    class Stats:
        def log_stats(self, stats: dict[str, Any]) -> None:
            seen.append(repr(stats))

    def on_any(payload: dict[str, Any]) -> None:
        seen.append(repr(payload))

    def attempt(fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            seen.extend([str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)])

    try:
        d = tmp_path / "s"
        for kw in ({"key": key}, {"passphrase": passphrase}):
            dd = d / next(iter(kw))
            with PositionStateManager(_cfg(dd), stats_logger=Stats(), **kw) as m:  # type: ignore[arg-type]
                for e in EVENTS:
                    m.on(e, on_any)
                seen.extend([repr(m), str(m), repr(m.config), repr(m._keyring)])
                m.load_positions()
                m.save_positions([_pos(1)])
                m.set_symbol_metadata("BTC/USDT", {"k": 1})
                m.save()
                attempt(lambda m=m: m.validate_state())
                with _fileops.use(HarnessOps(fault=Fault(at=2, errno=errno.EIO))):
                    attempt(m.save)
                m.save()
                attempt(lambda dd=dd, kw=kw: PositionStateManager(_cfg(dd), **kw))  # locked
            attempt(lambda dd=dd: _load(dd, key=generate_key()))  # wrong key
            (dd / "positions.json").write_bytes((dd / "positions.json").read_bytes()[:-5])
            attempt(lambda dd=dd, kw=kw: _load(dd, **kw))  # damaged
        attempt(lambda: Keyring(key=key[:31]))
        attempt(lambda: PositionStateManager(_cfg(tmp_path / "nokey")))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    blob = "\n".join(seen + handler.texts).encode()
    assert len(seen) > 30 and handler.texts  # the capture really captured a run
    # Damage now goes through automatic recovery: its events (stateCorrupted, stateRepaired) were captured too.
    assert any("WrongKeyError" in s for s in seen)
    assert any("recovered" in t for t in handler.texts)  # the damaged load went through recovery, logged
    assert any("PersistenceError" in s for s in seen) and any("StateLockedError" in s for s in seen)
    for secret in secrets:
        assert secret not in blob
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink())
    for secret in secrets:
        assert secret not in files


def test_wrong_key_error_names_key_ids_only(tmp_path: Path) -> None:
    """A wrong key is reported with both public key ids, never the key."""
    key, other = generate_key(), generate_key()
    with PositionStateManager(_cfg(tmp_path), key=key) as m:
        m.save()
    with PositionStateManager(_cfg(tmp_path), key=other) as m, pytest.raises(WrongKeyError) as info:
        m.load_positions()
    assert info.value.file_key_id == Keyring(key=key).key_id
    assert other.hex() not in str(info.value)


NONCES = int(os.environ.get("POSSTATE_RELIABILITY_NONCES", "100000"))


def test_no_nonce_repeats_in_100k_encodes() -> None:
    """100,000 encodings under one key draw 100,000 distinct 96-bit nonces (each in its file's header)."""
    keyring = Keyring(key=generate_key())
    nonces = set()
    for _ in range(NONCES):
        enc = _codec.encode(b"{}", generation=1, written_at_ms=1, position_count=0, compression_level=None, keyring=keyring)
        nonces.add(enc.header.nonce)
    assert len(nonces) == NONCES
    assert bytes(12) not in nonces
