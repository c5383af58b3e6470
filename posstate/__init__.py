"""posstate: crash-safe, encrypted, backed-up position state for trading bots."""

from __future__ import annotations

from posstate._account import AccountStateStore
from posstate._account_feed import UpdateQueue
from posstate._account_persist import PersistedAccountStateStore
from posstate._account_types import AccountSnapshot, AccountUpdate, ActivePositionCounts, Order, SessionSummary
from posstate._backup_ops import RestoreResult
from posstate._backups import BackupInfo
from posstate._config import StateConfig
from posstate._crypto import generate_key
from posstate._errors import (
    AmbiguousBackupError,
    ConcurrentModificationError,
    ConfigError,
    CorruptStateError,
    ManagerClosedError,
    MissingKeyError,
    OrderIntentNotFoundError,
    OutcomeUnknownError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StaleBackupError,
    StaleReportError,
    StateLockedError,
    StateNotFoundError,
    SymbolMetadataNotFoundError,
    TransactionError,
    UnrecoverableStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate._manager import PositionStateManager
from posstate._merge import MergeDecision, MergeResult
from posstate._model import Position
from posstate._orders import OrderIntent, OrderIntents, make_client_order_id
from posstate._reconcile import AppliedReconciliation, ReconciliationReport
from posstate._reconcile_file import ReconcileFileResult, reconcile_file
from posstate._recovery import RecoveryReport
from posstate._repair import RepairDecision, RepairReport
from posstate._retention import PruneDecision, PruneResult
from posstate._validate import ValidationReport
from posstate._version import __version__

__all__ = [
    "AccountSnapshot",
    "AccountStateStore",
    "AccountUpdate",
    "ActivePositionCounts",
    "AmbiguousBackupError",
    "AppliedReconciliation",
    "BackupInfo",
    "ConcurrentModificationError",
    "ConfigError",
    "CorruptStateError",
    "ManagerClosedError",
    "MergeDecision",
    "MergeResult",
    "MissingKeyError",
    "Order",
    "OrderIntent",
    "OrderIntentNotFoundError",
    "OrderIntents",
    "OutcomeUnknownError",
    "PersistedAccountStateStore",
    "PersistenceError",
    "PosStateError",
    "Position",
    "PositionStateManager",
    "PruneDecision",
    "PruneResult",
    "ReconcileFileResult",
    "ReconciliationReport",
    "RecoveryReport",
    "RepairDecision",
    "RepairReport",
    "RestoreResult",
    "SchemaValidationError",
    "SessionSummary",
    "StaleBackupError",
    "StaleReportError",
    "StateConfig",
    "StateLockedError",
    "StateNotFoundError",
    "SymbolMetadataNotFoundError",
    "TransactionError",
    "UnrecoverableStateError",
    "UnsupportedVersionError",
    "UpdateQueue",
    "ValidationReport",
    "WrongKeyError",
    "__version__",
    "generate_key",
    "make_client_order_id",
    "reconcile_file",
]
