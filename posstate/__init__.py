"""posstate: crash-safe, encrypted, backed-up position state for trading bots."""

from __future__ import annotations

from posstate._backup_ops import RestoreResult
from posstate._backups import BackupInfo
from posstate._config import ConfigError, StateConfig
from posstate._crypto import generate_key
from posstate._errors import (
    AmbiguousBackupError,
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StaleBackupError,
    StateLockedError,
    StateNotFoundError,
    UnrecoverableStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate._manager import PositionStateManager
from posstate._merge import MergeDecision, MergeResult
from posstate._model import Position
from posstate._recovery import RecoveryReport
from posstate._repair import RepairDecision, RepairReport
from posstate._retention import PruneDecision, PruneResult
from posstate._validate import ValidationReport
from posstate._version import __version__

__all__ = [
    "AmbiguousBackupError",
    "BackupInfo",
    "ConcurrentModificationError",
    "ConfigError",
    "CorruptStateError",
    "ManagerClosedError",
    "MergeDecision",
    "MergeResult",
    "MissingKeyError",
    "PersistenceError",
    "PosStateError",
    "Position",
    "PositionStateManager",
    "PruneDecision",
    "PruneResult",
    "RecoveryReport",
    "RepairDecision",
    "RepairReport",
    "RestoreResult",
    "SchemaValidationError",
    "StaleBackupError",
    "StateConfig",
    "StateLockedError",
    "StateNotFoundError",
    "UnrecoverableStateError",
    "UnsupportedVersionError",
    "ValidationReport",
    "WrongKeyError",
    "__version__",
    "generate_key",
]
