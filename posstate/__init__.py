"""posstate: crash-safe, encrypted, backed-up position state for trading bots."""

from __future__ import annotations

from posstate.account.feed import UpdateQueue
from posstate.account.persist import PersistedAccountStateStore
from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport
from posstate.account.reconcile_file import ReconcileFileResult, reconcile_file
from posstate.account.store import AccountStateStore
from posstate.account.types import AccountSnapshot, AccountUpdate, ActivePositionCounts, Order, SessionSummary
from posstate.backup.backups import BackupInfo
from posstate.backup.ops import RestoreResult
from posstate.backup.recovery import RecoveryReport
from posstate.backup.repair import RepairDecision, RepairReport
from posstate.backup.retention import PruneDecision, PruneResult
from posstate.core.config import StateConfig
from posstate.core.errors import (
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
from posstate.core.version import __version__
from posstate.manager.manager import PositionStateManager
from posstate.manager.orders import OrderIntent, OrderIntents, make_client_order_id
from posstate.model.merge import MergeDecision, MergeResult
from posstate.model.position import Position
from posstate.storage.crypto import generate_key
from posstate.storage.validate import ValidationReport

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
