"""posstate: crash-safe, encrypted, backed-up position state for trading bots."""

from __future__ import annotations

from posstate._config import ConfigError, StateConfig
from posstate._crypto import generate_key
from posstate._errors import (
    ConcurrentModificationError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateLockedError,
    StateNotFoundError,
    TransactionError,
    UnrecoverableStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate._manager import PositionStateManager
from posstate._model import Position
from posstate._validate import ValidationReport
from posstate._version import __version__

__all__ = [
    "ConcurrentModificationError",
    "ConfigError",
    "CorruptStateError",
    "ManagerClosedError",
    "MissingKeyError",
    "PersistenceError",
    "PosStateError",
    "Position",
    "PositionStateManager",
    "SchemaValidationError",
    "StateConfig",
    "StateLockedError",
    "StateNotFoundError",
    "TransactionError",
    "UnrecoverableStateError",
    "UnsupportedVersionError",
    "ValidationReport",
    "WrongKeyError",
    "__version__",
    "generate_key",
]
