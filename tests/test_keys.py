"""Keys: key=, passphrase=, the environment, and errors that never echo key material."""

from __future__ import annotations

import base64
import logging
import os
from decimal import Decimal
from pathlib import Path

import pytest

from posstate import ConfigError, MissingKeyError, Position, PositionStateManager, StateConfig, WrongKeyError, generate_key
from posstate.storage import crypto as _crypto
from posstate.storage.container import OFFSETS

P = Position(symbol="BTC/USDT", side="long", contracts=Decimal(1), entry_price=Decimal(2))


def test_generate_key() -> None:
    """generate_key() returns 32 fresh random bytes."""
    a, b = generate_key(), generate_key()
    assert len(a) == 32 and isinstance(a, bytes) and a != b


def test_missing_key_at_construction(cfg: StateConfig) -> None:
    """Encryption on and no key anywhere: MissingKeyError (a LookupError) when the manager is created."""
    with pytest.raises(MissingKeyError) as info:
        PositionStateManager(cfg)
    assert isinstance(info.value, LookupError) and "POSSTATE_KEY" in str(info.value)
    assert not cfg.lock_path.exists()


def test_no_key_needed_without_encryption(cfg: StateConfig) -> None:
    """encryption=False needs no key."""
    with PositionStateManager(cfg.replace(encryption=False)) as m:
        assert m.save_positions([P]) == 1


@pytest.mark.parametrize("bad", [b"short", b"x" * 33, "not-bytes"], ids=["short", "long", "str"])
def test_bad_raw_key(cfg: StateConfig, bad: object) -> None:
    """A key that is not 32 bytes (nor a key's base64 text) is a ConfigError, without echoing it (issue 15.5)."""
    with pytest.raises(ConfigError) as info:
        PositionStateManager(cfg, key=bad)  # type: ignore[arg-type]
    assert "32 raw bytes" in str(info.value) and str(bad) not in str(info.value)


def test_wrong_key_names_key_ids(cfg: StateConfig, key: bytes) -> None:
    """Loading with another key: WrongKeyError naming the file's key id and ours."""
    with PositionStateManager(cfg, key=key) as m:
        m.save_positions([P])
    other = generate_key()
    with PositionStateManager(cfg, key=other) as m, pytest.raises(WrongKeyError) as info:
        m.load_positions()
    assert info.value.file_key_id == _crypto.key_id(key) and info.value.our_key_id == _crypto.key_id(other)
    assert _crypto.key_id(key) in str(info.value) and _crypto.key_id(other) in str(info.value)


def test_env_key(monkeypatch: pytest.MonkeyPatch, cfg: StateConfig, key: bytes) -> None:
    """POSSTATE_KEY (base64) is used when no key= is given; the file opens with key= the same bytes."""
    monkeypatch.setenv("POSSTATE_KEY", base64.b64encode(key).decode())
    with PositionStateManager(cfg) as m:
        m.save_positions([P])
    monkeypatch.delenv("POSSTATE_KEY")
    with PositionStateManager(cfg, key=key) as m:
        assert m.get_position("BTC/USDT", "long") == P


def test_env_key_file(monkeypatch: pytest.MonkeyPatch, cfg: StateConfig, key: bytes, tmp_path: Path) -> None:
    """POSSTATE_KEY_FILE names a file holding the base64 key (trailing newline allowed)."""
    kf = tmp_path / "key"
    kf.write_text(base64.b64encode(key).decode() + "\n")
    kf.chmod(0o600)
    monkeypatch.setenv("POSSTATE_KEY_FILE", str(kf))
    with PositionStateManager(cfg) as m:
        m.save_positions([P])
    monkeypatch.delenv("POSSTATE_KEY_FILE")
    with PositionStateManager(cfg, key=key) as m:
        assert m.load_positions() == {P.key: P}


def test_key_file_readable_by_others_warns(tmp_path: Path, key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A key file with group/other permissions is used but logged as a warning (without the key)."""
    kf = tmp_path / "key"
    kf.write_text(base64.b64encode(key).decode())
    kf.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="posstate"):
        assert _crypto.read_key_file(kf) == key
    assert "chmod 600" in caplog.text and base64.b64encode(key).decode() not in caplog.text


def test_missing_key_file(monkeypatch: pytest.MonkeyPatch, cfg: StateConfig, tmp_path: Path) -> None:
    """POSSTATE_KEY_FILE pointing nowhere: MissingKeyError naming the file."""
    monkeypatch.setenv("POSSTATE_KEY_FILE", str(tmp_path / "nope"))
    with pytest.raises(MissingKeyError, match="key file not found"):
        PositionStateManager(cfg)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("c2VjcmV0LWtleS1tYXRlcmlhbA!!", id="bad-chars"),
        pytest.param("c2VjcmV0LWtleS1tYXRlcmlhbA", id="bad-padding"),
        pytest.param(base64.b64encode(b"secret-key-material-16").decode(), id="wrong-length"),
    ],
)
def test_malformed_base64_does_not_echo(monkeypatch: pytest.MonkeyPatch, cfg: StateConfig, text: str) -> None:
    """A malformed POSSTATE_KEY raises MissingKeyError that contains neither the text nor its decoding."""
    monkeypatch.setenv("POSSTATE_KEY", text)
    with pytest.raises(MissingKeyError) as info:
        PositionStateManager(cfg)
    msg = str(info.value) + repr(info.value)
    assert "POSSTATE_KEY" in msg
    assert text not in msg and text[:12] not in msg and "secret" not in msg


def test_passphrase_round_trip_and_salt_reuse(cfg: StateConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """passphrase= stretches with scrypt (salt in the header); a reload reuses the file's salt; env form works."""
    with PositionStateManager(cfg, passphrase="hunter2 but longer") as m:
        m.save_positions([P])
        m.save()
    data = cfg.state_path.read_bytes()
    f, s = OFFSETS["f"], OFFSETS["s"]
    assert data[f[0] : f[0] + 2] == b"07"  # compressed | encrypted | passphrase
    monkeypatch.setenv("POSSTATE_PASSPHRASE", "hunter2 but longer")
    with PositionStateManager(cfg) as m:
        assert m.load_positions() == {P.key: P}
        m.save()
    assert cfg.state_path.read_bytes()[s[0] : s[0] + 32] == data[s[0] : s[0] + 32] != b"0" * 32  # same salt
    monkeypatch.delenv("POSSTATE_PASSPHRASE")
    with PositionStateManager(cfg, passphrase="wrong") as m, pytest.raises(WrongKeyError):
        m.load_positions()


def test_key_and_passphrase_together_refused() -> None:
    """Giving both key= and passphrase= is a usage error."""
    with pytest.raises(ValueError, match="not both"):
        _crypto.Keyring(key=generate_key(), passphrase="x")


def test_keyring_repr_and_pickle() -> None:
    """A Keyring shows only its key id and cannot be pickled."""
    import pickle

    k = generate_key()
    kr = _crypto.Keyring(key=k)
    assert repr(kr) == f"Keyring(key, id={_crypto.key_id(k)})" and k.hex() not in repr(kr)
    with pytest.raises(TypeError):
        pickle.dumps(kr)
    assert "hunter" not in repr(_crypto.Keyring(passphrase="hunter2"))


def test_explicit_key_beats_environment(monkeypatch: pytest.MonkeyPatch, cfg: StateConfig, key: bytes) -> None:
    """key= wins over POSSTATE_KEY."""
    monkeypatch.setenv("POSSTATE_KEY", base64.b64encode(generate_key()).decode())
    with PositionStateManager(cfg, key=key) as m:
        m.save_positions([P])
    assert cfg.state_path.read_bytes()[16:32].decode() == _crypto.key_id(key)
    assert os.environ["POSSTATE_KEY"]
