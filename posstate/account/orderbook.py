"""The active orders of an account store: upsert, delete and the accountstate query helpers."""

from __future__ import annotations

from posstate.account.storebase import _ZERO, StoreCore, _proxy
from posstate.account.types import EMPTY, Order
from posstate.core.errors import SchemaValidationError


class StoreOrders(StoreCore):
    """Active orders (NEW and PARTIALLY_FILLED, keyed by exchange id); every getter reads one snapshot."""

    # ------------------------------------------------------------------------------------ orders
    def upsert_active_order(self, order: Order) -> None:
        """Keep NEW and PARTIALLY_FILLED orders (keyed by exchange id); any other status removes the order."""
        if not isinstance(order, Order):
            raise SchemaValidationError(None, "$", "type", f"expected an Order, got {type(order).__name__}")
        if not order.is_active:
            self.delete_order(order.id)
            return
        with self._lock:
            orders = dict(self._snap.orders)
            orders[order.id] = order
            self._commit([("order", order.id, order)], orders=_proxy(orders))
        self._after_write(False)

    def delete_order(self, order_id: str) -> bool:
        with self._lock:
            if order_id not in self._snap.orders:
                return False
            orders = dict(self._snap.orders)
            del orders[order_id]
            self._commit([("order", order_id, None)], orders=_proxy(orders))
        self._after_write(False)
        return True

    def clear_all_orders(self) -> None:
        with self._lock:
            ids = list(self._snap.orders)
            if ids:
                self._commit([("order", i, None) for i in ids], orders=EMPTY)
        self._after_write(False)

    def get_orders(self) -> list[Order]:
        return list(self._snap.orders.values())

    def get_active_orders(self) -> list[Order]:
        return [o for o in self.get_orders() if o.is_active]

    def get_order(self, order_id: str) -> Order | None:
        return self._snap.orders.get(order_id)

    def get_order_by_client_id(self, client_order_id: str) -> Order | None:
        return next((o for o in self.get_orders() if o.client_order_id == client_order_id), None)

    def get_orders_for_symbol(self, symbol: str) -> list[Order]:
        return [o for o in self.get_orders() if o.symbol == symbol]

    def get_orders_for_symbol_side(self, symbol: str, side: str) -> list[Order]:
        s = side.lower()
        return [o for o in self.get_orders() if o.symbol == symbol and o.side == s]

    def get_orders_by_status(self, status: str) -> list[Order]:
        s = status.upper()
        return [o for o in self.get_orders() if o.status == s]

    def get_orders_by_type(self, order_type: str) -> list[Order]:
        t = order_type.lower()
        return [o for o in self.get_orders() if o.type == t]

    def get_orders_sorted_by_id(self, *, ascending: bool = True) -> list[Order]:
        return sorted(self.get_orders(), key=lambda o: o.id, reverse=not ascending)

    def get_orders_sorted_by_symbol(self, *, ascending: bool = True) -> list[Order]:
        return sorted(self.get_orders(), key=lambda o: o.symbol, reverse=not ascending)

    def get_orders_sorted_by_price(self, *, ascending: bool = True) -> list[Order]:
        """By price; orders without a price (market orders) come last either way."""
        return _by_price(self.get_orders(), ascending)

    def get_orders_for_symbol_sorted_by_price(self, symbol: str, *, ascending: bool = True) -> list[Order]:
        return _by_price(self.get_orders_for_symbol(symbol), ascending)

    def get_orders_for_symbol_side_sorted_by_price(self, symbol: str, side: str, *, ascending: bool = True) -> list[Order]:
        return _by_price(self.get_orders_for_symbol_side(symbol, side), ascending)

    def get_orders_sorted_by_timestamp(self, *, ascending: bool = True) -> list[Order]:
        """Oldest first (or newest first); orders without a timestamp come last either way."""
        priced = [o for o in self.get_orders() if o.timestamp is not None]
        rest = [o for o in self.get_orders() if o.timestamp is None]
        return sorted(priced, key=lambda o: o.timestamp or 0, reverse=not ascending) + rest


def _by_price(orders: list[Order], ascending: bool) -> list[Order]:
    priced = [o for o in orders if o.price is not None]
    rest = [o for o in orders if o.price is None]
    return sorted(priced, key=lambda o: o.price or _ZERO, reverse=not ascending) + rest
