"""Symbol metadata of an account store: the part the exchange cannot give back, so its setters mark
pending persist and its getters return deep copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posstate.account.storebase import StoreCore, _check_meta_symbol, _proxy
from posstate.account.types import freeze_json, thaw_json
from posstate.core.errors import SchemaValidationError, SymbolMetadataNotFoundError
from posstate.model import document as _document


class StoreMetadata(StoreCore):
    """Per-symbol metadata (JSON objects, stored frozen)."""

    # ------------------------------------------------------------------------------------ metadata
    def set_symbol_metadata(self, symbol: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Replace *symbol*'s metadata (a JSON-able dict; a private copy is kept). Marks pending persist."""
        clean = _document.clean_metadata(_check_meta_symbol(symbol), data)
        frozen = freeze_json(clean)
        with self._lock:
            meta = dict(self._snap.metadata)
            meta[symbol] = frozen
            self._commit([("metadata", symbol, frozen)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return thaw_json(frozen)  # type: ignore[no-any-return]

    def set_symbol_metadata_value(self, symbol: str, key: str, value: Any) -> dict[str, Any]:
        """Set one value in *symbol*'s metadata (initialise it with :meth:`set_symbol_metadata` first).
        Marks pending persist; returns a copy of the symbol's metadata."""
        if not isinstance(key, str):
            raise SchemaValidationError(None, "$.key", "type", f"metadata keys are strings, got {key!r}")
        _document.check_json_value(value, f"$.symbol_metadata[{symbol!r}].{key}")
        with self._lock:
            current = self._snap.metadata.get(symbol)
            if current is None:
                raise SymbolMetadataNotFoundError(symbol)
            data = thaw_json(current)
            data[key] = value
            frozen = freeze_json(_document.clean_metadata(symbol, data))
            meta = dict(self._snap.metadata)
            meta[symbol] = frozen
            self._commit([("metadata", symbol, frozen)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return thaw_json(frozen)  # type: ignore[no-any-return]

    def get_symbol_metadata(self, symbol: str) -> dict[str, Any] | None:
        """A deep copy (editing it changes nothing until you set it), or None."""
        found = self._snap.metadata.get(symbol)
        return thaw_json(found) if found is not None else None

    def get_all_symbol_metadata(self) -> dict[str, dict[str, Any]]:
        return {s: thaw_json(d) for s, d in self._snap.metadata.items()}

    def get_symbols_with_metadata(self) -> list[str]:
        return list(self._snap.metadata)

    def delete_symbol_metadata(self, symbol: str) -> bool:
        """Remove *symbol*'s metadata; marks pending persist when there was some. Returns whether it existed."""
        with self._lock:
            if symbol not in self._snap.metadata:
                return False
            meta = dict(self._snap.metadata)
            del meta[symbol]
            self._commit([("metadata", symbol, None)], persist=True, metadata=_proxy(meta))
        self._after_write(True)
        return True

    def set_all_symbol_metadata(self, data: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace all metadata (the restore path): does NOT mark pending persist."""
        frozen = {_check_meta_symbol(s): freeze_json(_document.clean_metadata(s, d)) for s, d in data.items()}
        with self._lock:
            old = self._snap.metadata
            updates = [("metadata", s, None) for s in old if s not in frozen] + [("metadata", s, d) for s, d in frozen.items()]
            self._commit(updates, source="restore", metadata=_proxy(frozen))
