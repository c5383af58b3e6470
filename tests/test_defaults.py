"""Issue 15.1 and 15.5: defaults that bite (backups beside the state file, POSSTATE_DIR) and keys easy to pass."""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path

import pytest

import posstate
from posstate import ConfigError, MissingKeyError, Position, PositionStateManager, StateConfig, generate_key

P = Position(symbol="BTCUSDT", side="long", contracts=Decimal("1"), entry_price=Decimal("50000"))


def test_second_state_file_with_default_backup_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.1: two bots with default backup settings and their own keys keep their backups apart."""
    monkeypatch.chdir(tmp_path)
    with PositionStateManager(StateConfig(state_file="s1/positions.json"), key=generate_key()) as a:
        a.save_positions([P])
        info = a.create_backup()
    assert info.path.parent.resolve() == tmp_path / "s1" / "backups"
    assert not (tmp_path / "state").exists()
    with PositionStateManager(StateConfig(state_file="s2/positions.json"), key=generate_key()) as b:
        assert b.load_positions() == {}  # no foreign backup to trip over
        b.save_positions([P])
        assert all(x.path.parent.resolve() == tmp_path / "s2" / "backups" for x in b.list_backups())


def test_backup_dir_follows_the_state_file_and_in_dir() -> None:
    """issue 15.1: backup_dir defaults to backups/ beside the state file; an explicit one is kept."""
    assert StateConfig(state_file="a/b/pos.json").backup_path == Path("a/b/backups/pos.json")
    assert StateConfig(state_file="a/positions.json").backup_path == Path("a/backups")
    assert StateConfig(state_file="a/positions.json").quarantine_dir == Path("a/quarantine")
    assert StateConfig(state_file="a/positions.json", backup_dir="elsewhere").backup_path == Path("elsewhere")
    moved = StateConfig(state_file="a/positions.json").replace(state_file="z/positions.json")
    assert moved.backup_path == Path("z/backups")
    assert StateConfig.in_dir("d").backup_path == Path("d/backups")


def test_library_honours_posstate_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 15.1: StateConfig() without a state_file uses $POSSTATE_DIR, as the CLI's --state-dir does."""
    monkeypatch.setenv("POSSTATE_DIR", str(tmp_path / "bot"))
    cfg = StateConfig()
    assert cfg.state_path == tmp_path / "bot" / "positions.json"
    assert cfg.backup_path == tmp_path / "bot" / "backups"
    assert StateConfig(state_file=str(tmp_path / "x.json")).state_path == tmp_path / "x.json"
    monkeypatch.delenv("POSSTATE_DIR")
    assert StateConfig().state_path == Path("state/positions.json")


# ------------------------------------------------------------------------------------------ keys
def test_key_accepts_base64_text(cfg: StateConfig) -> None:
    """issue 15.5: key= takes the base64 text keygen writes (str, or the file's bytes) as well as raw bytes."""
    raw = generate_key()
    text = base64.b64encode(raw).decode() + "\n"
    with PositionStateManager(cfg, key=text) as m:  # type: ignore[arg-type]
        m.save_positions([P])
    with PositionStateManager(cfg, key=text.encode()) as m:
        assert m.get_position("BTCUSDT", "long") == P
    with PositionStateManager(cfg, key=raw) as m:
        assert m.get_position("BTCUSDT", "long") == P


def test_load_key_reads_a_key_file(tmp_path: Path, cfg: StateConfig) -> None:
    """issue 15.5: posstate.load_key(path) returns the 32 raw bytes of a keygen key file."""
    raw = generate_key()
    (tmp_path / "bot.key").write_text(base64.b64encode(raw).decode() + "\n")
    (tmp_path / "bot.key").chmod(0o600)
    assert posstate.load_key(tmp_path / "bot.key") == raw
    assert posstate.load_key(str(tmp_path / "bot.key")) == raw
    with pytest.raises(MissingKeyError, match="key file not found"):
        posstate.load_key(tmp_path / "nope.key")


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        pytest.param(b"short", "5 bytes", id="short-bytes"),
        pytest.param(b"x" * 33, "33 bytes", id="long-bytes"),
        pytest.param("not base64 at all", "base64", id="bad-text"),
        pytest.param(base64.b64encode(b"k" * 16).decode(), "16 bytes", id="text-of-16"),
        pytest.param(12345, "got int;", id="int"),
        pytest.param(["k"], "got list;", id="list"),
    ],
)
def test_bad_key_is_a_config_error_naming_the_argument(cfg: StateConfig, bad: object, said: str) -> None:
    """issue 15.5: a key of the wrong type or length is a ConfigError naming key=, never echoing it."""
    with pytest.raises(ConfigError) as info:
        PositionStateManager(cfg, key=bad)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "key=" in msg and said in msg and "<memory>" not in msg
    assert not isinstance(info.value, MissingKeyError)
    if isinstance(bad, (str, bytes)) and len(bad) > 8:
        assert str(bad) not in msg


@pytest.mark.parametrize("bad", [pytest.param("", id="empty"), pytest.param(b"pw", id="bytes")])
def test_bad_passphrase_is_a_config_error(cfg: StateConfig, bad: object) -> None:
    """issue 15.5: a passphrase of the wrong type is a ConfigError naming passphrase=."""
    with pytest.raises(ConfigError, match="passphrase="):
        PositionStateManager(cfg, passphrase=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field",
    [
        pytest.param({"backup_interval": "60"}, id="seconds-as-text"),
        pytest.param({"max_backups": 2.0}, id="count-as-float"),
        pytest.param({"durability": 3}, id="mode-as-int"),
        pytest.param({"backup_dir": b"x"}, id="dir-as-bytes"),
        pytest.param({"state_file": None}, id="state-file-none"),
    ],
)
def test_config_field_types(field: dict[str, object]) -> None:
    """issue 15.5: StateConfig checks field types: a ConfigError naming the field, never a TypeError."""
    with pytest.raises(ConfigError, match=next(iter(field))):
        StateConfig(**field)  # type: ignore[arg-type]
