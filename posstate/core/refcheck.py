"""Types and names of the reference design's nested upper-case configuration form, checked before it is converted.

The flat form refuses an unknown name or a value of the wrong type (``compression = "false"``); the converter of
the reference form used ``bool()``/``int()`` and read only the names it knew, so ``"false"`` became true and a
misspelt name inside a section was ignored. This module holds the reference form to the flat form's rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posstate.core.errors import ConfigError

#: Every name of each section, and the type its value must have: "flag" (true/false), "int", "ms" (a number).
_SECTIONS: dict[str | None, dict[str, str]] = {
    None: {"BACKUP_INTERVAL": "ms", "MAX_BACKUPS": "int"},
    "VALIDATION": {"ENABLED": "flag", "INTERVAL": "ms", "REPAIR_ATTEMPTS": "int"},
    "PERSISTENCE": {"ATOMIC_WRITES": "flag", "COMPRESSION": "flag", "ENCRYPTION": "encryption"},
    "RECOVERY": {"MAX_ATTEMPTS": "int", "BACKUP_THRESHOLD": "ms"},
}


def check_reference(ref: Mapping[str, Any]) -> None:
    """ConfigError for a section that is not a table, a name no section has, or a value of the wrong type."""
    for section, names in _SECTIONS.items():
        where = f"{section}." if section else ""
        table = ref if section is None else ref.get(section, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section} must be a table of settings, got {type(table).__name__}")
        if section is not None:
            unknown = sorted(set(table) - set(names))
            if unknown:
                raise ConfigError(f"unknown setting {where}{unknown[0]!r} (known: {', '.join(sorted(names))})")
        for name, kind in names.items():
            if name in table:
                _check(f"{where}{name}", kind, table[name])


def _check(name: str, kind: str, value: Any) -> None:
    if kind == "encryption":  # a string here may be a key put in the wrong place: never echoed
        value = value.get("ENABLED", False) if isinstance(value, Mapping) else value
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false (or a table with ENABLED), got a {type(value).__name__}")
        return
    if kind == "flag" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind == "ms" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name} must be a number of milliseconds, got {value!r}")
