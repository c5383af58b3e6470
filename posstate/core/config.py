"""Configuration: :class:`StateConfig`, flat and snake_case, from keywords, a mapping or a TOML file.

Field names and defaults follow the reference design (``POSITION_STATE_MANAGER``); times are seconds here,
milliseconds in the reference's nested upper-case form, which :meth:`StateConfig.from_mapping` accepts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posstate.core.errors import ConfigError
from posstate.core.refcheck import check_reference
from posstate.core.text import BAD_TEXT

Durability = Literal["snapshot", "sync", "group"]
Compaction = Literal["process", "thread"]
#: The files that belong to one state file and sit beside it.
Role = Literal["bak", "lock", "journal", "replica", "verdicts"]
_ROLES: tuple[Role, ...] = ("bak", "lock", "journal", "replica", "verdicts")
#: Folders of the state directory (``StateConfig.in_dir``'s backups, every state file's quarantine): no state
#: file may take their names.
_FOLDERS = ("backups", "quarantine")


def state_file_path(state_path: Path, role: Role) -> Path:
    """The file of *role* that belongs to the state file *state_path*: its whole name plus ``.<role>``.

    ``positions.json`` has ``positions.json.bak``, ``positions.json.lock`` and ``positions.json.journal``, and
    ``positions.dat`` its own three, so two state files in one directory never share one (issue 12.7). Temp
    files (``.<name>.<16 hex>.tmp``) and quarantined copies (``<name>.<stamp>.<label>``) are named after
    these whole names too. The one place these names are made: the manager, the CLI and the read-only
    tools all come here (through :class:`StateConfig`).
    """
    return state_path.with_name(f"{state_path.name}.{role}")


#: The state file name whose backups and quarantined files sit directly in the backup and quarantine
#: directories (the layout every release used); any other state file gets a folder of its own in each.
DEFAULT_STATE_NAME = "positions.json"
# A backup's file name (posstate.backup.backups._NAME): a state file may not be named so (its own backup folder would be
# taken for a backup of positions.json).
_BACKUP_NAME = re.compile(r"positions_[0-9]{8}_[0-9]{6}(?:_[0-9]{1,6})?\.json")


def state_folder(base: Path, state_path: Path) -> Path:
    """The folder of *base* (the backup or the quarantine directory) that holds *state_path*'s files: *base*
    itself for ``positions.json``, ``base/<whole state file name>`` for any other (``backups/positions.dat``),
    so two state files configured with one backup directory never list, prune, restore or recover from each
    other's backups (issue 12.7)."""
    return base if state_path.name == DEFAULT_STATE_NAME else base / state_path.name


#: The environment variable naming the state directory, for the library as for the CLI's ``--state-dir``.
STATE_DIR_ENV = "POSSTATE_DIR"


def default_state_file() -> str:
    """``$POSSTATE_DIR/positions.json`` when that variable is set (the CLI's ``--state-dir`` reads it too),
    else ``state/positions.json``: read when a :class:`StateConfig` is made without a ``state_file``."""
    base = os.environ.get(STATE_DIR_ENV)
    return str(Path(base) / DEFAULT_STATE_NAME) if base else "state/positions.json"


def legacy_journal_path(state_path: Path) -> Path | None:
    """Where posstate up to 0.1.0 kept the journal (the state file's suffix replaced: ``positions.journal``);
    None when that is the current name. Read once, if the snapshot names it, then retired (docs/JOURNAL.md)."""
    old = state_path.with_suffix(".journal")
    return None if old == state_file_path(state_path, "journal") else old


@dataclass(frozen=True, slots=True, kw_only=True)
class StateConfig:
    """Where the state lives and how it is written. Every field has a safe default."""

    state_file: str = field(default_factory=default_state_file)
    #: None (the default): ``backups/`` beside the state file, so two state files in two directories never
    #: share (or trip over) each other's backups (issue 15.1).
    backup_dir: str | None = None
    backup_interval: float = 300.0
    max_backups: int = 24
    validation_enabled: bool = True
    validation_interval: float = 60.0
    repair_attempts: int = 3
    atomic_writes: bool = True
    compression: bool = True
    compression_level: int = 3
    encryption: bool = True
    recovery_max_attempts: int = 3
    backup_threshold: float = 3600.0
    # Beyond the reference design.
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_within: float = 0.0
    verify_after_write: bool = True
    lock_timeout: float = 0.0
    clock_skew: float = 300.0
    max_document_bytes: int = 256 * 1024 * 1024
    durability: Durability = "sync"
    journal_max_bytes: int = 4 * 1024 * 1024
    journal_max_records: int = 10_000
    journal_preallocate: int = 1024 * 1024
    compaction: Compaction = "process"  # background compaction in a worker process, or on a thread (docs/JOURNAL.md)
    exchange: str | None = None
    account_id: str | None = None
    account_mode: Literal["live", "paper"] | None = None
    periodic_validation: bool = False
    # Off the machine (docs/REPLICATION.md).
    replica_url: str | None = None
    replica_endpoint_url: str | None = None
    replica_interval: float = 10.0
    replica_batch_bytes: int = 1024 * 1024
    replica_lease: bool = False
    replica_lease_ttl: float = 30.0
    replica_close_timeout: float = 5.0

    def __post_init__(self) -> None:
        _check_types(self)
        _check_replica(self)
        if not self.atomic_writes:
            raise ConfigError("atomic_writes=False is not supported: posstate only writes atomically")
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"compression_level must be 1..22, got {self.compression_level}")
        if self.max_backups < 1:
            raise ConfigError(f"max_backups must be >= 1, got {self.max_backups}")
        for name in ("backup_interval", "validation_interval", "backup_threshold", "keep_within", "lock_timeout", "clock_skew"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.journal_preallocate < 0:
            raise ConfigError(f"journal_preallocate must be >= 0 bytes, got {self.journal_preallocate}")
        if self.durability not in ("snapshot", "sync", "group"):
            raise ConfigError(f"durability must be 'snapshot', 'sync' or 'group', got {self.durability!r}")
        if self.compaction not in ("process", "thread"):
            raise ConfigError(f"compaction must be 'process' or 'thread', got {self.compaction!r}")
        if self.account_mode not in (None, "live", "paper"):
            raise ConfigError(f"account_mode must be 'live' or 'paper', got {self.account_mode!r}")
        if (self.exchange is None) != (self.account_id is None):
            raise ConfigError("give both exchange and account_id, or neither")
        if self.max_document_bytes < 1:
            raise ConfigError(f"max_document_bytes must be >= 1, got {self.max_document_bytes}")
        # Written into every state document: the schema's account rules, checked here rather than by a save whose
        # file then cannot be loaded (or, with a lone surrogate, cannot be written at all).
        for name, longest in (("exchange", 64), ("account_id", 128)):
            value = getattr(self, name)
            if value is not None and (not 1 <= len(value) <= longest or BAD_TEXT.search(value) is not None):
                raise ConfigError(
                    f"{name} must be 1 to {longest} characters with no control, lone surrogate or bidi character, "
                    f"got {value[:80]!r}"
                )
        name = Path(self.state_file).name
        companion = name.endswith(tuple(f".{r}" for r in _ROLES)) or name.endswith(".tmp")
        if companion or not name.strip(".") or _BACKUP_NAME.fullmatch(name):
            raise ConfigError(
                f"state_file {name!r}: a name ending in .tmp or .{', .'.join(_ROLES)}, or named like a backup, "
                "would be taken for another state file's companion; choose another name"
            )
        if name in _FOLDERS:
            raise ConfigError(
                f"state_file {name!r}: the state directory's {name}/ folder (positions.json's backups and quarantined "
                "files go there); choose another name"
            )
        state, backups = Path(self.state_file), self.backup_base
        if state == backups or state in backups.parents:
            raise ConfigError(f"backup_dir {self.backup_dir!r} is inside the state file {self.state_file!r}; choose another")

    # ------------------------------------------------------------------ derived paths
    @property
    def state_path(self) -> Path:
        return Path(self.state_file)

    @property
    def state_dir(self) -> Path:
        return self.state_path.parent

    @property
    def bak_path(self) -> Path:
        return state_file_path(self.state_path, "bak")

    @property
    def lock_path(self) -> Path:
        return state_file_path(self.state_path, "lock")

    @property
    def journal_path(self) -> Path:
        return state_file_path(self.state_path, "journal")

    @property
    def replica_marker_path(self) -> Path:
        """The replica marker (``positions.json.replica``): which lease epoch this directory last held."""
        return state_file_path(self.state_path, "replica")

    @property
    def legacy_journal_path(self) -> Path | None:
        return legacy_journal_path(self.state_path)

    @property
    def backup_base(self) -> Path:
        """The backup directory: ``backup_dir``, or ``backups/`` beside the state file when it is None."""
        return self.state_dir / "backups" if self.backup_dir is None else Path(self.backup_dir)

    @property
    def backup_path(self) -> Path:
        return state_folder(self.backup_base, self.state_path)

    @property
    def quarantine_dir(self) -> Path:
        return state_folder(self.state_dir / "quarantine", self.state_path)

    def replace(self, **changes: Any) -> StateConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def in_dir(cls, state_dir: str | Path, **changes: Any) -> StateConfig:
        """A config whose state file and backups live in *state_dir* (the CLI's ``--state-dir``)."""
        d = Path(state_dir)
        return cls(state_file=str(d / "positions.json"), backup_dir=str(d / "backups"), **changes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StateConfig:
        """Accept flat snake_case fields, or the reference's nested upper-case form (times in ms)."""
        if "POSITION_STATE_MANAGER" in data:
            data = data["POSITION_STATE_MANAGER"]
        if any(k.isupper() for k in data):
            try:
                check_reference(data)  # as strict as the flat form: types, and names inside each section
                converted = _from_reference(data)
            except ConfigError:
                raise
            except (TypeError, ValueError, AttributeError) as exc:
                raise ConfigError(f"bad value in the reference form ({exc})") from None
            return cls(**converted)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> StateConfig:
        """Read a TOML file: flat fields at the top level or under ``[posstate]``, or the reference form."""
        if sys.version_info >= (3, 11):  # loaded here: most programs build their config in code
            import tomllib
        else:  # pragma: no cover - exercised on Python 3.10 only
            import tomli as tomllib

        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config file not found", path=p) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config ({exc})", path=p) from None
        if "posstate" in data and isinstance(data["posstate"], dict):
            data = data["posstate"]
        try:
            return cls.from_mapping(data)
        except ConfigError as exc:
            raise ConfigError(str(exc).split("; see")[0], path=p) from None


_INT_FIELDS = (
    "max_backups",
    "repair_attempts",
    "compression_level",
    "recovery_max_attempts",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "max_document_bytes",
    "journal_max_bytes",
    "journal_max_records",
    "journal_preallocate",
    "replica_batch_bytes",
)
_SECONDS_FIELDS = (
    "backup_interval",
    "validation_interval",
    "backup_threshold",
    "keep_within",
    "lock_timeout",
    "clock_skew",
    "replica_interval",
    "replica_lease_ttl",
    "replica_close_timeout",
)
_BOOL_FIELDS = (
    "validation_enabled",
    "atomic_writes",
    "compression",
    "encryption",
    "verify_after_write",
    "periodic_validation",
    "replica_lease",
)


def _check_types(cfg: StateConfig) -> None:
    """ConfigError for a value of the wrong type (a TOML ``"3"`` or ``3.5`` where a count belongs, ``nan`` seconds),
    rather than a TypeError from deep inside the first save, or a NaN that silently turns a check off."""
    for name in _INT_FIELDS:
        value = getattr(cfg, name)
        if type(value) is not int:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    for name in _SECONDS_FIELDS:
        value = getattr(cfg, name)
        if type(value) not in (int, float) or value != value:  # NaN: every comparison with it is False
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    for name in _BOOL_FIELDS:
        if type(getattr(cfg, name)) is not bool:
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in ("state_file", "backup_dir"):
        value = getattr(cfg, name)
        if name == "backup_dir" and value is None:
            continue
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(f"{name} must be a non-empty path, got {value!r}")
    for name in ("exchange", "account_id", "account_mode", "durability", "compaction", "replica_url", "replica_endpoint_url"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")


_URL_USERINFO = re.compile(r"(?i)^([a-z][a-z0-9+.-]*://)[^/@]*@")


def _check_replica(cfg: StateConfig) -> None:
    """The replica settings (docs/REPLICATION.md): a URL posstate can ship to, and boto3 installed for s3://."""
    for name in ("replica_interval", "replica_lease_ttl", "replica_close_timeout"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0")
    if cfg.replica_batch_bytes < 1:
        raise ConfigError(f"replica_batch_bytes must be >= 1, got {cfg.replica_batch_bytes}")
    endpoint = cfg.replica_endpoint_url
    if endpoint is not None and "@" in endpoint.split("://", 1)[-1].split("/", 1)[0]:
        raise ConfigError("replica_endpoint_url must not hold credentials; boto3 reads them from its usual chain")
    url = cfg.replica_url
    if url is not None and _URL_USERINFO.match(url):  # https://KEY:SECRET@..., file://user:pass@...: never echoed
        raise ConfigError("replica_url must not hold credentials; boto3 reads them from its usual chain")
    if url is None:
        if cfg.replica_lease:
            raise ConfigError("replica_lease=True needs a replica_url")
        return
    if url.startswith("s3://"):
        bucket = url[5:].split("/", 1)[0]
        if "@" in bucket or ":" in bucket:
            raise ConfigError("replica_url must not hold credentials; boto3 reads them from its usual chain")
        if not bucket:
            raise ConfigError(f"replica_url {url!r}: no bucket; use s3://BUCKET/PREFIX")
        import importlib.util  # loaded here: only a replica URL needs it

        if importlib.util.find_spec("boto3") is None:
            raise ConfigError(
                f"replica_url {url!r} needs boto3, which is not installed; install it with `pip install posstate[s3]`"
            )
    elif url.startswith("file://"):
        if not url[7:].startswith("/"):
            raise ConfigError(f"replica_url {url!r}: a file:// URL needs an absolute path (file:///mnt/disk/prefix)")
    else:
        raise ConfigError(f"replica_url {url!r}: only s3://BUCKET/PREFIX and file:///PATH are supported")
    if cfg.replica_lease and not 1 <= cfg.replica_lease_ttl <= 86400:  # a longer one is a damaged lease record
        raise ConfigError(f"replica_lease_ttl must be between 1 s and 86400 s (a day), got {cfg.replica_lease_ttl}")


_SECONDS_FROM_MS = 1000.0


def _from_reference(ref: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {"STATE_FILE", "BACKUP_DIR", "BACKUP_INTERVAL", "MAX_BACKUPS", "VALIDATION", "PERSISTENCE", "RECOVERY"}
    unknown = sorted(set(ref) - known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    if "STATE_FILE" in ref:
        out["state_file"] = str(ref["STATE_FILE"])
    if "BACKUP_DIR" in ref:
        out["backup_dir"] = str(ref["BACKUP_DIR"])
    if "BACKUP_INTERVAL" in ref:
        out["backup_interval"] = float(ref["BACKUP_INTERVAL"]) / _SECONDS_FROM_MS
    if "MAX_BACKUPS" in ref:
        out["max_backups"] = int(ref["MAX_BACKUPS"])
    v = ref.get("VALIDATION", {})
    if "ENABLED" in v:
        out["validation_enabled"] = bool(v["ENABLED"])
    if "INTERVAL" in v:
        out["validation_interval"] = float(v["INTERVAL"]) / _SECONDS_FROM_MS
    if "REPAIR_ATTEMPTS" in v:
        out["repair_attempts"] = int(v["REPAIR_ATTEMPTS"])
    p = ref.get("PERSISTENCE", {})
    if "ATOMIC_WRITES" in p:
        out["atomic_writes"] = bool(p["ATOMIC_WRITES"])
    if "COMPRESSION" in p:
        out["compression"] = bool(p["COMPRESSION"])
    enc = p.get("ENCRYPTION", {})
    if isinstance(enc, Mapping):
        if "ENABLED" in enc:
            out["encryption"] = bool(enc["ENABLED"])
        algo = str(enc.get("ALGORITHM", "aes-256-gcm")).lower()
        if algo != "aes-256-gcm":
            raise ConfigError(f"encryption algorithm {algo!r} is not supported (only aes-256-gcm)")
    else:
        out["encryption"] = bool(enc)
    r = ref.get("RECOVERY", {})
    if "MAX_ATTEMPTS" in r:
        out["recovery_max_attempts"] = int(r["MAX_ATTEMPTS"])
    if "BACKUP_THRESHOLD" in r:
        out["backup_threshold"] = float(r["BACKUP_THRESHOLD"]) / _SECONDS_FROM_MS
    return out
