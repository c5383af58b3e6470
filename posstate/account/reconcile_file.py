"""``reconcile_file``: the library entry point behind ``posstate reconcile --positions exchange.json [--apply]``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate.account.persist import PersistedAccountStateStore
from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport
from posstate.core.config import StateConfig
from posstate.core.errors import CorruptStateError, PersistenceError, SchemaValidationError, StateNotFoundError
from posstate.manager.manager import PositionStateManager
from posstate.storage import fileops as fs


@dataclass(frozen=True, slots=True)
class ReconcileFileResult:
    """The report, and with ``apply=True`` what changed and the generation saved (None if nothing changed)."""

    report: ReconciliationReport
    applied: AppliedReconciliation | None
    generation: int | None

    def to_dict(self) -> dict[str, Any]:
        out = self.report.to_dict()
        out["applied"] = self.applied.to_dict() if self.applied is not None else None
        out["generation"] = self.generation
        return out


def read_exchange_positions(path: str | Path) -> list[Any]:
    """Read a JSON file holding what ccxt ``fetch_positions`` returned (a list of position dicts).

    Numbers are read as exact decimals. A missing file raises :class:`~posstate.StateNotFoundError`;
    anything that is not a JSON list raises :class:`~posstate.SchemaValidationError`.
    """
    p = Path(path)
    try:
        raw = fs.read_file(p)
    except FileNotFoundError:
        step = "save ccxt fetch_positions() output as JSON there"
        raise StateNotFoundError(p, what="exchange positions file", next_step=step) from None
    except fs.NotRegularFileError as exc:  # /dev/null, a FIFO, a directory: say so, not "free space"
        raise CorruptStateError(
            p,
            f"is {exc.kind}, not a file of exchange positions",
            next_step="give the JSON file that ccxt fetch_positions() returned",
            kind="not-a-state-file",
        ) from None
    except OSError as exc:
        raise PersistenceError(p, operation="read exchange positions file", cause=exc) from exc
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaValidationError(p, "$", "json", f"not valid JSON ({exc})") from exc
    except RecursionError:  # the stdlib parser recurses once per level of nesting
        raise SchemaValidationError(p, "$", "json", "not valid JSON (nested too deep to parse)") from None
    except ValueError as exc:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise SchemaValidationError(p, "$", "json", f"not valid JSON ({str(exc)[:80]})") from None
    if isinstance(data, dict) and isinstance(data.get("positions"), list):
        data = data["positions"]
    if not isinstance(data, list):
        raise SchemaValidationError(p, "$", "type", "expected a JSON list of ccxt positions (fetch_positions output)")
    return data


def reconcile_file(
    state: StateConfig | str | Path,
    exchange_json_path: str | Path,
    *,
    apply: bool = False,
    tolerance: Decimal | int | str | float = 0,
    price_tolerance: Decimal | int | str | float = 0,
    key: bytes | str | None = None,
    passphrase: str | None = None,
) -> ReconcileFileResult:
    """Reconcile the saved state with an exchange positions JSON file.

    *state* is a :class:`StateConfig` or a state directory. The state is opened through
    :class:`PositionStateManager` (so the writer lock is taken: stop the bot first, or get
    :class:`~posstate.StateLockedError`). Without *apply* nothing is written. With *apply* the positions are
    made to match the exchange (symbol metadata and order intents kept) and saved through the manager.
    Errors are the usual typed ones (file, reason, next step).
    """
    config = state if isinstance(state, StateConfig) else StateConfig.in_dir(state)
    exchange = read_exchange_positions(exchange_json_path)
    with PositionStateManager(config, key=key, passphrase=passphrase) as manager:
        store = PersistedAccountStateStore(manager, write_through=False)
        report = store.reconcile(exchange, tolerance=tolerance, price_tolerance=price_tolerance)
        if not apply:
            return ReconcileFileResult(report, None, None)
        applied = store.apply_reconciliation(report)
        if not store.flush():
            return ReconcileFileResult(report, applied, None)
        # An operator's reconciliation ends in a snapshot of its own (in the journal modes the flush was one
        # durable record; this folds it in), so the generation reported is the one on disk.
        return ReconcileFileResult(report, applied, manager.save())
