"""StateConfig: the issue's names and defaults, the reference's nested form, TOML, bad values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from posstate import ConfigError, StateConfig

DEFAULTS = {
    "state_file": "state/positions.json",
    "backup_dir": None,  # backups/ beside the state file (issue 15.1)
    "backup_interval": 300.0,
    "max_backups": 24,
    "validation_enabled": True,
    "validation_interval": 60.0,
    "repair_attempts": 3,
    "atomic_writes": True,
    "compression": True,
    "compression_level": 3,
    "encryption": True,
    "recovery_max_attempts": 3,
    "backup_threshold": 3600.0,
}


def test_defaults_named_in_the_issue() -> None:
    """Every field the issue names exists with its default."""
    c = StateConfig()
    for name, value in DEFAULTS.items():
        assert getattr(c, name) == value, name
    assert c.verify_after_write is True
    assert c.backup_path == Path("state/backups")


def test_frozen_and_keyword_only() -> None:
    """StateConfig is frozen and takes keywords only."""
    c = StateConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_backups = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        StateConfig("x.json")  # type: ignore[misc]


def test_derived_paths(tmp_path: Path) -> None:
    """in_dir puts the state file, .bak, .lock, backups and quarantine in one directory."""
    c = StateConfig.in_dir(tmp_path / "s")
    d = tmp_path / "s"
    assert (c.state_path, c.bak_path, c.lock_path, c.backup_path, c.quarantine_dir) == (
        d / "positions.json",
        d / "positions.json.bak",
        d / "positions.json.lock",
        d / "backups",
        d / "quarantine",
    )


def test_from_mapping_reference_form() -> None:
    """The reference design's nested upper-case form with times in ms maps to seconds."""
    c = StateConfig.from_mapping(
        {
            "POSITION_STATE_MANAGER": {
                "STATE_FILE": "data/pos.json",
                "BACKUP_DIR": "data/bk",
                "BACKUP_INTERVAL": 60000,
                "MAX_BACKUPS": 10,
                "VALIDATION": {"ENABLED": False, "INTERVAL": 5000, "REPAIR_ATTEMPTS": 5},
                "PERSISTENCE": {
                    "ATOMIC_WRITES": True,
                    "COMPRESSION": False,
                    "ENCRYPTION": {"ENABLED": False, "ALGORITHM": "aes-256-gcm"},
                },
                "RECOVERY": {"MAX_ATTEMPTS": 7, "BACKUP_THRESHOLD": 7200000},
            }
        }
    )
    assert (c.state_file, c.backup_dir, c.backup_interval, c.max_backups) == ("data/pos.json", "data/bk", 60.0, 10)
    assert (c.validation_enabled, c.validation_interval, c.repair_attempts) == (False, 5.0, 5)
    assert (c.compression, c.encryption, c.recovery_max_attempts, c.backup_threshold) == (False, False, 7, 7200.0)


def test_from_mapping_flat() -> None:
    """Flat snake_case keys are taken as they are."""
    c = StateConfig.from_mapping({"state_file": "a.json", "compression_level": 9})
    assert (c.state_file, c.compression_level) == ("a.json", 9)


def test_from_file_toml(tmp_path: Path) -> None:
    """A TOML file: flat fields under [posstate], or the reference form."""
    f = tmp_path / "c.toml"
    f.write_text('[posstate]\nstate_file = "x/positions.json"\nmax_backups = 5\nencryption = false\n')
    c = StateConfig.from_file(f)
    assert (c.state_file, c.max_backups, c.encryption) == ("x/positions.json", 5, False)
    g = tmp_path / "ref.toml"
    g.write_text("[POSITION_STATE_MANAGER]\nBACKUP_INTERVAL = 1500\n[POSITION_STATE_MANAGER.PERSISTENCE]\nCOMPRESSION = false\n")
    c = StateConfig.from_file(g)
    assert (c.backup_interval, c.compression) == (1.5, False)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"compression_level": 0}, id="level-low"),
        pytest.param({"compression_level": 23}, id="level-high"),
        pytest.param({"max_backups": 0}, id="max-backups"),
        pytest.param({"backup_interval": -1}, id="negative-interval"),
        pytest.param({"atomic_writes": False}, id="non-atomic"),
        pytest.param({"durability": "yolo"}, id="durability"),
        pytest.param({"account_mode": "demo"}, id="account-mode"),
        pytest.param({"exchange": "binance"}, id="exchange-without-account"),
        pytest.param({"no_such_field": 1}, id="unknown"),
        pytest.param({"STATE_FILE": "x", "WHAT": 1}, id="unknown-reference"),
        pytest.param({"PERSISTENCE": {"ENCRYPTION": {"ALGORITHM": "rot13"}}}, id="algorithm"),
        pytest.param({"max_backups": "lots"}, id="flat-wrong-type"),
        pytest.param({"BACKUP_INTERVAL": "soon"}, id="reference-not-a-number"),
        pytest.param({"MAX_BACKUPS": None}, id="reference-none"),
        pytest.param({"VALIDATION": 5}, id="reference-section-not-a-table"),
    ],
)
def test_bad_values(data: dict[str, Any]) -> None:
    """Bad values raise ConfigError (a ValueError) naming the setting."""
    with pytest.raises(ConfigError) as info:
        StateConfig.from_mapping(data)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("[posstate\n", "cannot read config", id="syntax"),
        pytest.param("[posstate]\nmax_backups = 0\n", "max_backups", id="value"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    """A TOML syntax error or a bad value is a ConfigError naming the file."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        StateConfig.from_file(f)
    assert str(f) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is a ConfigError, not a bare FileNotFoundError."""
    with pytest.raises(ConfigError, match="not found"):
        StateConfig.from_file(tmp_path / "nope.toml")
