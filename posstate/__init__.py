"""posstate: crash-safe, encrypted, backed-up position state for trading bots."""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from posstate.core import serving as _serving
from posstate.core.config import StateConfig
from posstate.core.errors import (
    AmbiguousBackupError,
    ConcurrentModificationError,
    ConfigError,
    CorruptStateError,
    InvalidArgumentError,
    LeaseLostError,
    LedgerOwnershipError,
    MalformedLedgerEntryError,
    ManagerClosedError,
    MissingKeyError,
    OrderIntentNotFoundError,
    OrderTransitionError,
    OutcomeUnknownError,
    PersistenceError,
    PosStateError,
    ReplicaError,
    SchemaValidationError,
    ServeError,
    StaleBackupError,
    StaleReportError,
    StateLockedError,
    StateNotFoundError,
    SymbolMetadataNotFoundError,
    TransactionError,
    UnknownOrderError,
    UnrecoverableStateError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.core.version import __version__
from posstate.model.position import Position

if _typing.TYPE_CHECKING:  # what the names below resolve to, for type checkers and IDEs
    from posstate.account.balances import Balance
    from posstate.account.exchange import ExchangeAccountStateStore
    from posstate.account.feed import UpdateQueue
    from posstate.account.ingest import SyncReport
    from posstate.account.ledger import FillResult
    from posstate.account.ledgertypes import Fill, OrderRecord
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
    from posstate.manager.aio import StagedChanges
    from posstate.manager.manager import PositionStateManager
    from posstate.manager.orders import OrderIntent, OrderIntents, make_client_order_id
    from posstate.model.merge import MergeDecision, MergeResult
    from posstate.serve.health import HealthLimits
    from posstate.serve.server import StateServer, serve_state
    from posstate.serve.stream import StreamOptions
    from posstate.storage.crypto import generate_key, load_key
    from posstate.storage.validate import ValidationReport

# Loaded on first use (PEP 562), so ``import posstate`` stays cheap: the manager, backups, the journal and the
# account store (and what they import) load when a program first names them. docs/ARCHITECTURE.md, "Import cost".
_LAZY = {
    "AccountSnapshot": "posstate.account.types",
    "AccountStateStore": "posstate.account.store",
    "AccountUpdate": "posstate.account.types",
    "ActivePositionCounts": "posstate.account.types",
    "AppliedReconciliation": "posstate.account.reconcile",
    "Balance": "posstate.account.balances",
    "ExchangeAccountStateStore": "posstate.account.exchange",
    "Fill": "posstate.account.ledgertypes",
    "HealthLimits": "posstate.serve.health",
    "FillResult": "posstate.account.ledger",
    "OrderRecord": "posstate.account.ledgertypes",
    "SyncReport": "posstate.account.ingest",
    "BackupInfo": "posstate.backup.backups",
    "MergeDecision": "posstate.model.merge",
    "MergeResult": "posstate.model.merge",
    "Order": "posstate.account.types",
    "OrderIntent": "posstate.manager.orders",
    "OrderIntents": "posstate.manager.orders",
    "PersistedAccountStateStore": "posstate.account.persist",
    "PositionStateManager": "posstate.manager.manager",
    "PruneDecision": "posstate.backup.retention",
    "PruneResult": "posstate.backup.retention",
    "ReconcileFileResult": "posstate.account.reconcile_file",
    "ReconciliationReport": "posstate.account.reconcile",
    "RecoveryReport": "posstate.backup.recovery",
    "RepairDecision": "posstate.backup.repair",
    "RepairReport": "posstate.backup.repair",
    "RestoreResult": "posstate.backup.ops",
    "SessionSummary": "posstate.account.types",
    "StagedChanges": "posstate.manager.aio",
    "StateServer": "posstate.serve.server",
    "StreamOptions": "posstate.serve.stream",
    "UpdateQueue": "posstate.account.feed",
    "ValidationReport": "posstate.storage.validate",
    "generate_key": "posstate.storage.crypto",
    "load_key": "posstate.storage.crypto",
    "make_client_order_id": "posstate.manager.orders",
    "reconcile_file": "posstate.account.reconcile_file",
    "serve_state": "posstate.serve.server",
}


# Hidden from type checkers: a module-level ``__getattr__`` would make every attribute of posstate (a typo
# too) type as Any; the imports above give them the real names and types instead.
if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'posstate' has no attribute {name!r}")
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # once loaded, a plain module attribute
        return value


def _serve(target: object, **options: _typing.Any) -> _typing.Any:
    """``manager.serve()`` / ``store.serve()`` (posstate/core/serving.py): the server loads on first use."""
    return _importlib.import_module("posstate.serve.process").serve(target, **options)


_serving.register(_serve)


def __dir__() -> list[str]:
    # What it listed before the layers: not the subpackages (core, model, ... become attributes once
    # imported; nothing outside imports them), but every public name, loaded or not.
    names = {n for n, v in globals().items() if n.startswith("_") or not isinstance(v, type(_typing))}
    return sorted(names | set(__all__))


__all__ = [
    "AccountSnapshot",
    "AccountStateStore",
    "AccountUpdate",
    "ActivePositionCounts",
    "AmbiguousBackupError",
    "AppliedReconciliation",
    "BackupInfo",
    "Balance",
    "ConcurrentModificationError",
    "ConfigError",
    "CorruptStateError",
    "ExchangeAccountStateStore",
    "Fill",
    "FillResult",
    "HealthLimits",
    "InvalidArgumentError",
    "LeaseLostError",
    "LedgerOwnershipError",
    "MalformedLedgerEntryError",
    "ManagerClosedError",
    "MergeDecision",
    "MergeResult",
    "MissingKeyError",
    "Order",
    "OrderIntent",
    "OrderIntentNotFoundError",
    "OrderIntents",
    "OrderRecord",
    "OrderTransitionError",
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
    "ReplicaError",
    "RestoreResult",
    "SchemaValidationError",
    "ServeError",
    "SessionSummary",
    "StagedChanges",
    "StaleBackupError",
    "StaleReportError",
    "StateConfig",
    "StateLockedError",
    "StateNotFoundError",
    "StateServer",
    "StreamOptions",
    "SymbolMetadataNotFoundError",
    "SyncReport",
    "TransactionError",
    "UnknownOrderError",
    "UnrecoverableStateError",
    "UnsupportedVersionError",
    "UpdateQueue",
    "ValidationReport",
    "WrongKeyError",
    "__version__",
    "generate_key",
    "load_key",
    "make_client_order_id",
    "reconcile_file",
    "serve_state",
]
