"""A ``posstate.toml`` found in the state directory (issue 15.10; review): read as what it is, a file anyone who
can write the state directory could have planted (T1 in docs/SECURITY.md), not as the operator's word.

A config file the operator names (``--config``, ``POSSTATE_CONFIG``) is trusted like a flag, unless it sits
under the state directory (``POSSTATE_CONFIG=$POSSTATE_DIR/posstate.toml``): whoever can write the directory
can replace it however it is named, so it gets the same limits. A config file in the state directory may set
where the state file is (its name, in that directory), retention, intervals, compression, the account, and
may make any check stricter; it may not loosen one. Refused, each with a ``ConfigError`` (exit 2) naming the
file and the setting:

- ``encryption``, ``verify_after_write``, ``validation_enabled`` set to false (before this, a planted
  ``encryption = false`` made ``validate`` call a forged plaintext state VALID and ``reconcile --apply`` write
  the state in plaintext);
- ``durability = "snapshot"`` (the command's own writes no longer durable on return);
- ``max_document_bytes``, ``clock_skew``, ``backup_threshold``, ``lock_timeout`` above their defaults (a
  larger allocation steered by the attacker, a future-dated file accepted, an older backup restored without
  ``--accept-older``, a command that waits instead of failing).

The file is read without following a symlink (a link to a file the operator can read and the attacker cannot
would otherwise have its setting names echoed in an error), as a regular file of at most 64 KiB.
"""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path
from typing import Any

from posstate.core.config import StateConfig
from posstate.core.errors import ConfigError
from posstate.storage import fileops as fs

#: A config file is a few lines; anything larger is not one.
MAX_CONFIG_BYTES = 64 * 1024
_HOW = (
    "to mean it, name the file with --config or POSSTATE_CONFIG "
    "(a file you name is trusted, one found in the state directory is not)"
)
_HOW_NAMED = (
    "keep a config file that must do so outside the state directory (anyone who can write the directory can "
    "replace a file in it, however it is named)"
)
_DEFAULTS = StateConfig()
#: Checks a state directory's config may not turn off.
_MUST_STAY_ON = ("encryption", "verify_after_write", "validation_enabled")
#: Bounds it may lower but not raise.
_AT_MOST_DEFAULT = ("max_document_bytes", "clock_skew", "backup_threshold", "lock_timeout")
#: Durability modes that keep a change durable when the call returns.
_DURABLE = ("sync", "group")


def in_state_dir(path: str | Path, state_dir: Path) -> bool:
    """True when the config file *path* sits in *state_dir* (``POSSTATE_CONFIG=$POSSTATE_DIR/posstate.toml``):
    whoever can write the directory can replace it, however it was named. The file's own name is not resolved (a
    symlink planted there is still a file in the state directory)."""
    try:
        parent, top = Path(path).absolute().parent.resolve(), state_dir.resolve()
    except (OSError, RuntimeError):  # a symlink loop in the directories
        return False
    return parent == top or top in parent.parents  # backups/, quarantine/ are the attacker's too


def check_named_in_state_dir(cfg: StateConfig, path: str | Path) -> None:
    """A config file the operator named that sits in the state directory gets the limits of one found there
    (:func:`in_state_dir`): not a symlink, nothing loosened. ConfigError (exit 2) otherwise."""
    p = Path(path)
    try:
        link = stat.S_ISLNK(fs.lstat(p).st_mode)
    except OSError:
        link = False  # gone since it was read: the read already had its say
    if link:
        raise ConfigError(
            f"is a symlink in the state directory (anyone who can write the directory could point it at any file); {_HOW_NAMED}",
            path=p,
        )
    _refuse_loosening(cfg, p, _HOW_NAMED)


def read_state_dir_config(path: str | Path) -> StateConfig:
    """The StateConfig of the ``posstate.toml`` in a state directory; ConfigError (exit 2) when it is not a regular
    file, is a symlink, cannot be parsed, or loosens a check (see the module docstring)."""
    p = Path(path)
    try:
        data = fs.read_file(p, max_size=MAX_CONFIG_BYTES)
    except fs.NotRegularFileError as exc:
        raise ConfigError(f"is {exc.kind}, not a config file (give a TOML file)", path=p) from None
    except fs.FileTooLargeError as exc:
        raise ConfigError(f"is {exc.size} bytes, over the {MAX_CONFIG_BYTES}-byte cap of a config file", path=p) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                "is a symlink, never followed in the state directory (anyone who can write the directory could point "
                f"it at any file); {_HOW}",
                path=p,
            ) from None
        raise ConfigError(f"cannot read config ({exc.strerror})", path=p) from None
    cfg = _build(_parse(data, p), p)
    _refuse_loosening(cfg, p, _HOW)
    return cfg


def _parse(data: bytes, path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    try:
        parsed: dict[str, Any] = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config ({exc})", path=path) from None
    table = parsed.get("posstate")
    return table if isinstance(table, dict) else parsed


def _build(data: Any, path: Path) -> StateConfig:
    try:
        return StateConfig.from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(str(exc).split("; see")[0], path=path) from None


def _refuse_loosening(cfg: StateConfig, path: Path, how: str) -> None:
    if cfg.state_path.name == path.name:  # a restore or repair would write the state over the config file
        raise ConfigError(f"names itself as the state file (state_file = {cfg.state_file!r}); choose another name", path=path)
    for name in _MUST_STAY_ON:
        if not getattr(cfg, name):
            raise ConfigError(f"sets {name} = false, which a config file in the state directory may not; {how}", path=path)
    if cfg.durability not in _DURABLE:
        raise ConfigError(
            f"sets durability = {cfg.durability!r}, which a config file in the state directory may not; {how}", path=path
        )
    for name in _AT_MOST_DEFAULT:
        value, default = getattr(cfg, name), getattr(_DEFAULTS, name)
        if value > default:
            raise ConfigError(
                f"sets {name} = {value!r}, above its default {default!r}, which a config file in the state directory "
                f"may not; {how}",
                path=path,
            )
