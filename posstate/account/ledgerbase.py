"""The durable part of :class:`~posstate.account.exchange.ExchangeAccountStateStore`: loading the ledger, writing one
change as one journal record, readiness and the load-time invariants.

Every ledger change is written before memory changes: one ``manager.transaction()`` holding the entries it
touches (an order, the position lifecycles, the balances) and the position it moves, which the journal's
durabilities record as one record, durable when the call returns (``durability="snapshot"``: followed by
``manager.save()``). If the write fails the call raises and neither the ledger nor the store changed; under
``"snapshot"`` the manager's memory is put back too, so the next save cannot write what the bot was told failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from posstate.account import epochs, ledgercarry, ledgerformat, ledgerowner
from posstate.account.balances import Balance
from posstate.account.lifecycle import OrderRecord
from posstate.account.persist import PersistedAccountStateStore
from posstate.account.storebase import _proxy
from posstate.core.errors import (
    InvalidArgumentError,
    LedgerOwnershipError,
    MalformedLedgerEntryError,
    SchemaValidationError,
    UnknownOrderError,
)
from posstate.manager.manager import PositionStateManager
from posstate.model.position import Position, PositionKey

log = logging.getLogger("posstate")

Subject = Literal["positions", "open_orders", "balances"]
SUBJECTS: tuple[str, ...] = ("positions", "open_orders", "balances")
#: Why a subject is not trusted: ``startup``, ``restored_from_backup``, ``recovered``, ``submission_unknown``,
#: ``stream_gap``; ``invariant_violation`` when the loaded ledger breaks an invariant (see ``violations``);
#: ``stale_fill`` when a fill was refused for its position (the exchange's position may differ from the ledger's).
READINESS_REASONS: tuple[str, ...] = (
    "startup",
    "restored_from_backup",
    "recovered",
    "submission_unknown",
    "stream_gap",
    "invariant_violation",
    "stale_fill",
)
#: How long an order this process sent counts as waiting for its answer (then it is unknown: ``unknown_orders()``).
INFLIGHT_MS = 60_000
LEDGER_EVENTS: frozenset[str] = frozenset({"invariantViolation", "staleUpdate", "orderAdopted", "duplicateFill"})


class LedgerCore(PersistedAccountStateStore):
    """Ledger memory, its durable write, readiness and invariants (the methods live in ledger.py and ingest.py)."""

    #: Take legacy intents in and turn orders left ``sent`` into ``unknown`` when opened (a read-only plan does not).
    _settle_on_open = True

    def __init__(
        self,
        manager: PositionStateManager,
        *,
        write_through: bool = True,
        persist_interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._orders: dict[str, dict[str, Any]] = {}
        self._lifecycles: dict[str, dict[str, Any]] = {}
        self._balances: dict[str, dict[str, Any]] = {}
        self._forgotten: dict[str, int] | None = {}  # None: the entry is malformed (never overwritten)
        self._blocked: dict[str, str] = {}
        self._inflight: set[str] = set()
        self._ledger_lock = threading.RLock()
        self._violations: tuple[ledgerformat.Violation, ...] = ()
        self._batch: dict[str, dict[str, Any] | None] | None = None  # see OrderLedger._one_record
        self._deferred: list[tuple[str, dict[str, Any]]] = []
        self._reload: str | None = None  # a reason: reload the ledger at the next ledger call (see _ledger())
        self._recovery_seen: Any = None  # the manager's last_recovery when the ledger was loaded
        self._unreadable = ledgerformat.Unreadable()  # what the load left out: never overwritten (see _write_ledger)
        self._carry: dict[str, dict[str, Any]] = {}  # order entries held before a reload (see ledgercarry.py)
        self._closed = False
        ledgerowner.claim(manager, self)
        try:
            super().__init__(manager, write_through=write_through, persist_interval=persist_interval, restore=True)
            if self._settle_on_open:
                self._import_legacy_intents()
                self._settle_after_restart()
        except BaseException:
            ledgerowner.release(manager, self)
            raise
        self._recovery_seen = manager.last_recovery
        manager.on("backupRestored", self._on_backup_restored)
        manager.on("stateLoaded", self._on_reloaded)
        manager.on("stateRepaired", self._on_reloaded)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def on(self, event: str, handler: Any) -> None:
        if event in LEDGER_EVENTS:
            with self._lock:
                self._handlers.setdefault(event, []).append(handler)
            return
        super().on(event, handler)

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[None]:
        """Hold the ledger lock, reloading first if a restore happened since (see _on_backup_restored)."""
        with self._ledger_lock:
            if self._reload is not None:
                reason, self._reload = self._reload, None
                self._load_ledger(reason)
            if self._carry:
                ledgercarry.carry_forward(self)
            yield

    @property
    def violations(self) -> tuple[ledgerformat.Violation, ...]:
        """The invariants the loaded ledger breaks (checked at every load and restore; never repaired)."""
        with self._ledger():
            return self._violations

    # ------------------------------------------------------------------------------------ load
    def restore(self, *, reason: str | None = None) -> None:
        """Load positions, metadata and the ledger from the manager. Every subject becomes untrusted (reason
        ``recovered`` when the manager recovered its state, else ``startup``) and the invariants are checked."""
        super().restore()
        with self._ledger_lock:
            self._reload = None
            self._load_ledger(reason)

    def _load_ledger(self, reason: str | None) -> None:
        with self._ledger_lock:
            entries = {n: d for n, d in self._manager.get_all_symbol_metadata().items() if ledgerformat.is_ledger_entry(n)}
            orders, _ = ledgerformat.load_orders(entries)
            self._orders = orders
            self._unreadable = ledgerformat.unreadable(entries)
            stored, _ = ledgerformat.load_lifecycles(entries)
            # In memory only: written with the next change of a lifecycle. A malformed lifecycle is not adopted.
            bad_life = self._unreadable.lifecycles or {}
            positions = {k: p for k, p in self._manager.get_positions().items() if epochs.key_text(k) not in bad_life}
            self._lifecycles = epochs.adopt_open(stored, positions, self._now())
            self._balances, _ = ledgerformat.load_balances(entries)
            self._forgotten, _ = ledgerformat.load_forgotten(entries)
            self._inflight = set()
            why = reason or ("recovered" if self._manager.last_recovery is not None else "startup")
            self._recovery_seen = self._manager.last_recovery
            self._blocked = dict.fromkeys(SUBJECTS, why)
            self._violations = tuple(ledgerformat.check(entries, self._manager.get_positions()))
        for v in self._violations:
            log.warning("order ledger invariant broken: %s %s: %s", v.code, v.subject, v.detail)
            self._emit("invariantViolation", v.to_dict())

    def _on_backup_restored(self, event: Mapping[str, Any]) -> None:
        # Inside the manager's restore, its lock held by this thread: positions and metadata are reloaded now;
        # the ledger at its next call (taking the ledger lock here, under the manager's, could deadlock with a
        # ledger write waiting for the manager). Orders left "sent" count as unknown (see unknown_orders()).
        ledgercarry.remember(self)
        ledgercarry.carry_now(self)
        PersistedAccountStateStore.restore(self)
        self._request_reload("restored_from_backup")

    def _on_reloaded(self, event: Mapping[str, Any]) -> None:
        # The manager read its state again (load_positions, attempt_recovery, repair_state): so does the store.
        recovered = self._manager.last_recovery is not None and self._manager.last_recovery is not self._recovery_seen
        ledgercarry.remember(self)
        ledgercarry.carry_now(self)
        PersistedAccountStateStore.restore(self)
        self._request_reload("recovered" if recovered or event.get("event") == "stateRepaired" else "startup")

    def _request_reload(self, reason: str) -> None:
        """Reload the ledger at its next call, for the strongest reason asked since (a restore, a recovery, a load)."""
        rank = ("startup", "recovered", "restored_from_backup")
        if self._reload is None or rank.index(reason) > rank.index(self._reload):
            self._reload = reason

    if TYPE_CHECKING:  # implemented by the order ledger (ledger.py), the class built on this one

        def record_order_status_unknown(self, order_id: str, *, reason: str) -> OrderRecord: ...

    def _import_legacy_intents(self) -> None:
        """Take the order intents an older posstate recorded (``OrderIntents``) into the ledger, in one record:
        a ``recorded`` one (perhaps sent) becomes ``unknown``. The legacy entry is left as it is."""
        with self._ledger():
            migrated = ledgerformat.migrate_intents(
                self._manager.get_all_symbol_metadata(), now=self._now(), positions=self._manager.get_positions()
            )
            if not migrated:
                return
            orders = {}
            for entry in migrated.values():
                order = entry["order"]
                order["epoch"] = entry["events"][0]["order"]["epoch"] = epochs.epoch_for_order(
                    epochs.get(self._lifecycles, (order["symbol"], order["position_side"])), order
                )
                orders[order["key"]] = {"order": order, "events": entry["events"]}
            self._write_ledger(orders=orders)

    def _settle_after_restart(self) -> None:
        """Orders a killed process left ``sent`` become ``unknown``, durably: nobody knows whether they reached
        the exchange. They are never sent again by posstate; the bot resolves them by client id."""
        stuck = [k for k, item in self._orders.items() if item["order"]["status"] == "sent"]
        for key in stuck:
            try:
                self.record_order_status_unknown(key, reason="restart: sent before the process ended, no answer recorded")
            except Exception:  # still counted as unknown by readiness(); the next call retries nothing on its own
                log.exception("could not record order %s as unknown after restart", key)

    # ------------------------------------------------------------------------------------ durable write
    def _write_ledger(
        self,
        *,
        orders: Mapping[str, dict[str, Any] | None] | None = None,
        lifecycles: dict[str, dict[str, Any]] | None = None,
        balances: dict[str, dict[str, Any]] | None = None,
        positions: Mapping[PositionKey, Position | None] | None = None,
        forgotten: dict[str, int] | None = None,
        source: str = "local",
    ) -> None:
        """Write these entries (and positions) as one journal record, then take them into memory. Caller holds
        ``_ledger_lock``. Order values are ``{"order", "events"}``, or None to remove the order."""
        m = self._manager
        if self._closed:
            raise LedgerOwnershipError(
                m.config.state_path, "this ExchangeAccountStateStore is closed; open a new one on the manager"
            )
        writes: dict[str, dict[str, Any] | None] = {}
        for key, item in (orders or {}).items():
            name = ledgerformat.order_entry_name(key)
            if name in self._unreadable.orders:  # a new intent with its client id would forget the stored order
                raise MalformedLedgerEntryError(name, "the stored order entry could not be read at load")
            writes[name] = ledgerformat.order_entry(item["order"], item["events"]) if item is not None else None
        if lifecycles is not None:
            kept = self._unreadable.keep("lifecycles", lifecycles)
            writes[ledgerformat.LIFECYCLES] = {"format": ledgerformat.LEDGER_FORMAT, "positions": kept}
        if balances is not None:
            kept = self._unreadable.keep("balances", balances)
            writes[ledgerformat.BALANCES] = {"format": ledgerformat.LEDGER_FORMAT, "assets": kept}
        if forgotten is not None:
            if self._forgotten is None:
                raise MalformedLedgerEntryError(ledgerformat.FORGOTTEN, "not an entry of ledger format 1")
            writes[ledgerformat.FORGOTTEN] = {"format": ledgerformat.LEDGER_FORMAT, "orders": forgotten}
        moves = dict(positions or {})
        with self._persist_lock:
            snapshot_mode = m.config.durability == "snapshot"
            before_meta = {n: m.get_symbol_metadata(n) for n in writes} if snapshot_mode else {}
            before_pos = {k: m.get_position(k[0], k[1]) for k in moves} if snapshot_mode else {}
            try:
                with m.transaction():
                    for name, data in writes.items():
                        if data is None:
                            m.delete_symbol_metadata(name)
                        else:
                            m.set_symbol_metadata(name, data)
                    for pkey, p in moves.items():
                        if p is None:
                            m.delete_position(pkey[0], pkey[1])
                        else:
                            m.set_position(p)
                if snapshot_mode:
                    m.save()
            except BaseException:
                if snapshot_mode:
                    self._put_back(before_meta, before_pos)
                raise
            for key, item in (orders or {}).items():
                if item is None:
                    self._orders.pop(key, None)
                else:
                    self._orders[key] = item
            if lifecycles is not None:
                self._lifecycles = lifecycles
            if balances is not None:
                self._balances = balances
            if forgotten is not None:
                self._forgotten = forgotten
            if moves:
                with self._lock:
                    current = dict(self._snap.positions)
                    for pkey, p in moves.items():
                        if p is None:
                            current.pop(pkey, None)
                        else:
                            current[pkey] = p
                    self._commit([("position", k, p) for k, p in moves.items()], source=source, positions=_proxy(current))

    def _put_back(self, meta: Mapping[str, dict[str, Any] | None], positions: Mapping[PositionKey, Position | None]) -> None:
        m = self._manager
        try:
            with m.transaction():
                for name, data in meta.items():
                    if data is None:
                        m.delete_symbol_metadata(name)
                    else:
                        m.set_symbol_metadata(name, data)
                for key, p in positions.items():
                    if p is None:
                        m.delete_position(key[0], key[1])
                    else:
                        m.set_position(p)
        except Exception:  # the manager refuses changes (outcome unknown): it will say so itself
            log.exception("could not put the manager's memory back after a failed ledger write")

    # ------------------------------------------------------------------------------------ reads
    def _find(self, order_id: str) -> str:
        """The ledger key of an order named by its key, client order id or exchange order id."""
        if not isinstance(order_id, str):
            raise SchemaValidationError(None, "$.order_id", "type", f"an order id is a string, got {type(order_id).__name__}")
        with self._ledger():
            if order_id in self._orders:
                return order_id
            if "x:" + order_id in self._orders:
                return "x:" + order_id
            for key, item in self._orders.items():
                o = item["order"]
                if order_id in (o.get("client_order_id"), o.get("exchange_order_id")):
                    return key
        raise UnknownOrderError(order_id)

    def get_ledger_order(self, order_id: str) -> OrderRecord | None:
        """The ledger's order (by client order id, exchange id or key), or None."""
        try:
            key = self._find(order_id)
        except UnknownOrderError:
            return None
        return OrderRecord.from_json(self._orders[key]["order"])

    def get_ledger_orders(self, *, status: str | None = None, symbol: str | None = None) -> list[OrderRecord]:
        with self._ledger():
            items = [i["order"] for i in self._orders.values()]
        found = [
            OrderRecord.from_json(o)
            for o in items
            if (status is None or o["status"] == status) and (symbol is None or o["symbol"] == symbol)
        ]
        return sorted(found, key=lambda o: (o.created_at, o.key))

    def unknown_orders(self) -> list[OrderRecord]:
        """Orders whose outcome nobody knows: ``unknown``, and ``sent`` orders this process did not send."""
        with self._ledger():
            keys = [
                k
                for k, i in self._orders.items()
                if i["order"]["status"] == "unknown" or (i["order"]["status"] == "sent" and not self._in_flight(k))
            ]
            return [OrderRecord.from_json(self._orders[k]["order"]) for k in sorted(keys)]

    def _in_flight(self, key: str) -> bool:
        """This process sent order *key* and may still get its answer: not longer than INFLIGHT_MS ago (a bot
        whose request raised something it did not catch never records the answer: the order is unknown then)."""
        sent_at = self._orders[key]["order"].get("sent_at")
        return key in self._inflight and sent_at is not None and self._now() - int(sent_at) < INFLIGHT_MS

    def get_balances(self) -> dict[str, Balance]:
        """Every asset's balance, keyed ``USDT`` (trading) or ``USDT.FUNDING``."""
        with self._ledger():
            return {k: Balance.from_json(v) for k, v in self._balances.items()}

    def get_balance(self, asset: str, *, source: str = "trading") -> Balance | None:
        key = asset.upper() if source == "trading" else f"{asset.upper()}.FUNDING"
        found = self._balances.get(key)
        return Balance.from_json(found) if found is not None else None

    def position_lifecycle(self, symbol: str, side: str) -> dict[str, Any]:
        """``{"epoch", "state", "version", "events"}`` of (symbol, side); epoch 0 and ``closed`` when never opened."""
        with self._ledger():
            return epochs.get(self._lifecycles, (symbol, side))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------ readiness
    def readiness(self) -> dict[str, str]:
        """The subjects that block trading, each with its reason (empty when ready)."""
        with self._ledger():
            out = dict(self._blocked)
            if self.unknown_orders():
                out["open_orders"] = "submission_unknown"
            if self._violations:
                out["ledger"] = "invariant_violation"
        return out

    def ready_to_trade(self) -> bool:
        """False until positions, open orders and balances were reconciled with the exchange since the last
        start, restore or recovery, while any submission's outcome is unknown, and after a stream gap."""
        return not self.readiness()

    def record_stream_gap(self, *, subjects: tuple[str, ...] = SUBJECTS, reason: str = "stream_gap") -> None:
        """The private stream reconnected or missed messages: the subjects are untrusted until reconciled."""
        with self._ledger():
            for s in subjects:
                if s not in SUBJECTS:
                    raise InvalidArgumentError(f"unknown subject {s!r}", next_step=f"use one of: {', '.join(SUBJECTS)}")
                self._blocked[s] = reason

    def _trust(self, subject: str) -> None:
        self._blocked.pop(subject, None)
