"""``reconcile_file``: the library entry point behind ``posstate reconcile --positions exchange.json [--apply]``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate.account.exchange import ExchangeAccountStateStore
from posstate.account.ingest import SyncReport
from posstate.account.persist import PersistedAccountStateStore
from posstate.account.reconcile import AppliedReconciliation, ReconciliationReport
from posstate.account.types import Order
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
    #: With *open_orders_path*: what the order ledger's reconciliation did (``apply=True``) or would do.
    orders: SyncReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.report.to_dict()
        out["applied"] = self.applied.to_dict() if self.applied is not None else None
        out["generation"] = self.generation
        if self.orders is not None:
            out["orders"] = self.orders.to_dict()
        return out


def read_exchange_positions(path: str | Path, *, what: str = "positions") -> list[Any]:
    """Read a JSON file holding what ccxt ``fetch_positions`` returned (a list of position dicts); with
    ``what="orders"``, what ``fetch_open_orders``/``fetch_closed_orders`` returned (``{"orders": [...]}`` too).

    Numbers are read as exact decimals. A missing file raises :class:`~posstate.StateNotFoundError`;
    anything that is not a JSON list raises :class:`~posstate.SchemaValidationError`.
    """
    p = Path(path)
    call = "fetch_positions()" if what == "positions" else "fetch_open_orders()"
    try:
        raw = fs.read_file(p)
    except FileNotFoundError:
        step = f"save ccxt {call} output as JSON there"
        raise StateNotFoundError(p, what=f"exchange {what} file", next_step=step) from None
    except fs.NotRegularFileError as exc:  # /dev/null, a FIFO, a directory: say so, not "free space"
        raise CorruptStateError(
            p,
            f"is {exc.kind}, not a file of exchange {what}",
            next_step=f"give the JSON file that ccxt {call} returned",
            kind="not-a-state-file",
        ) from None
    except OSError as exc:
        raise PersistenceError(p, operation=f"read exchange {what} file", cause=exc) from exc
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaValidationError(p, "$", "json", f"not valid JSON ({exc})") from exc
    except RecursionError:  # the stdlib parser recurses once per level of nesting
        raise SchemaValidationError(p, "$", "json", "not valid JSON (nested too deep to parse)") from None
    except ValueError as exc:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise SchemaValidationError(p, "$", "json", f"not valid JSON ({str(exc)[:80]})") from None
    if isinstance(data, dict) and isinstance(data.get(what), list):
        data = data[what]
    if not isinstance(data, list):
        raise SchemaValidationError(p, "$", "type", f"expected a JSON list of ccxt {what} ({call} output)")
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
    open_orders_path: str | Path | None = None,
    closed_orders_path: str | Path | None = None,
) -> ReconcileFileResult:
    """Reconcile the saved state with an exchange positions JSON file.

    *state* is a :class:`StateConfig` or a state directory. The state is opened through
    :class:`PositionStateManager` (so the writer lock is taken: stop the bot first, or get
    :class:`~posstate.StateLockedError`). Without *apply* nothing is written. With *apply* the positions are
    made to match the exchange (symbol metadata and order intents kept) and saved through the manager.
    Errors are the usual typed ones (file, reason, next step).

    With *open_orders_path* (ccxt ``fetch_open_orders`` as JSON; *closed_orders_path*: ``fetch_closed_orders``)
    the order ledger is reconciled too (``ExchangeAccountStateStore.set_open_orders``): adopted, found, not
    found and unresolved orders in ``result.orders``; without *apply* that is a plan and nothing is written.
    """
    config = state if isinstance(state, StateConfig) else StateConfig.in_dir(state)
    exchange = read_exchange_positions(exchange_json_path)
    if open_orders_path is not None:
        opened = _orders(read_exchange_positions(open_orders_path, what="orders"), open_orders_path)
        closed = (
            _orders(read_exchange_positions(closed_orders_path, what="orders"), closed_orders_path)
            if closed_orders_path is not None
            else None
        )
        return _with_orders(
            config, exchange, opened, closed, apply, tolerance, price_tolerance, key, passphrase, exchange_json_path
        )
    with PositionStateManager(config, key=key, passphrase=passphrase) as manager:
        store = PersistedAccountStateStore(manager, write_through=False)
        with _in_file(exchange_json_path):
            report = store.reconcile(exchange, tolerance=tolerance, price_tolerance=price_tolerance)
        if not apply:
            return ReconcileFileResult(report, None, None)
        applied = store.apply_reconciliation(report)
        if not store.flush():
            return ReconcileFileResult(report, applied, None)
        # An operator's reconciliation ends in a snapshot of its own (in the journal modes the flush was one
        # durable record; this folds it in), so the generation reported is the one on disk.
        return ReconcileFileResult(report, applied, manager.save())


@contextlib.contextmanager
def _in_file(path: str | Path) -> Iterator[None]:
    """A value the store refuses (``$[3].entry_price``) named with the file it came from, not ``<memory>``."""
    try:
        yield
    except SchemaValidationError as exc:
        if exc.path is not None or not exc.json_path.startswith("$["):
            raise
        raise SchemaValidationError(Path(path), exc.json_path, exc.rule, exc.detail, errors=exc.errors) from None


def _orders(items: list[Any], path: str | Path) -> list[Any]:
    """Each ccxt order of the file as an :class:`Order`; a refused one named by file and index (``$[1].price``)."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Order.from_ccxt(item) if isinstance(item, Mapping) else item)
        except SchemaValidationError as exc:
            where = f"$[{i}]{exc.json_path[1:]}" if exc.json_path.startswith("$") else f"$[{i}]"
            raise SchemaValidationError(Path(path), where, exc.rule, exc.detail) from None
    return out


def _with_orders(
    config: StateConfig,
    exchange: list[Any],
    opened: list[Any],
    closed: list[Any] | None,
    apply: bool,
    tolerance: Decimal | int | str | float,
    price_tolerance: Decimal | int | str | float,
    key: bytes | str | None,
    passphrase: str | None,
    positions_path: str | Path,
) -> ReconcileFileResult:
    with PositionStateManager(config, key=key, passphrase=passphrase) as manager:
        if not apply:
            plan = _PlanOnly(manager, write_through=False)
            with _in_file(positions_path):
                report = plan.reconcile(exchange, tolerance=tolerance, price_tolerance=price_tolerance)
            return ReconcileFileResult(report, None, None, plan.reconcile_open_orders(opened, closed_orders=closed))
        store = ExchangeAccountStateStore(manager, write_through=False)
        with _in_file(positions_path):
            report = store.reconcile(exchange, tolerance=tolerance, price_tolerance=price_tolerance)
        applied = store.apply_reconciliation(report)
        store.flush()
        orders = store.set_open_orders(opened, closed_orders=closed)
        return ReconcileFileResult(report, applied, manager.save(), orders)


class _PlanOnly(ExchangeAccountStateStore):
    """The ledger as loaded, for a plan: nothing is written when it opens (no settling, no migration)."""

    _settle_on_open = False
