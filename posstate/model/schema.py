"""The JSON Schema: where it is loaded from, and the jsonschema validator that is the source of truth.

The schema files live in the project's top-level ``schemas/`` folder and travel inside the wheel as
``posstate/schemas/``. jsonschema decides validity and words every error; the document module's fast path
only ever accepts what jsonschema accepts (a property test holds it to that) and falls back here otherwise.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posstate.core.errors import SchemaValidationError

if TYPE_CHECKING:
    import jsonschema

STATE_SCHEMA = "state.schema.json"
#: Levels of objects and arrays a metadata ``data`` object may nest, itself included (the schema's json0..json31).
MAX_JSON_DEPTH = 32
#: Levels the whole document may nest: the document, ``symbol_metadata`` and an entry hold the ``data`` object.
MAX_DOCUMENT_DEPTH = MAX_JSON_DEPTH + 3


def schema_text(name: str = STATE_SCHEMA) -> str:
    """The text of a schema file, from the installed package or, in a checkout, from ``schemas/``."""
    import importlib.resources  # only when a schema is read (an error's words, `posstate doctor`)

    packaged = importlib.resources.files("posstate").joinpath("schemas").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "schemas" / name
    return checkout.read_text(encoding="utf-8")


@functools.cache
def schema(name: str = STATE_SCHEMA) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text(name))
    return loaded


@functools.cache
def validator(name: str = STATE_SCHEMA) -> jsonschema.protocols.Validator:
    s = schema(name)
    import jsonschema  # loaded only when a document needs the full check (import posstate stays fast)

    cls = jsonschema.validators.validator_for(s)
    cls.check_schema(s)
    return cls(s)


def too_deep(value: Any, limit: int) -> list[str | int] | None:
    """The JSON path (as keys) of the first object or array nested deeper than *limit* levels, else None.

    Iterative, so a value nested 100,000 levels costs no Python recursion (jsonschema recurses, and the
    ``repr`` in its messages too; both only ever see values this check passed).
    """
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        node, level, where = stack.pop()
        if type(node) is dict:
            items: Any = node.items()
        elif type(node) is list:
            items = enumerate(node)
        else:
            continue
        if level > limit:
            return list(where)
        stack.extend((v, level + 1, (*where, k)) for k, v in items if type(v) is dict or type(v) is list)
    return None


def _depth_errors(document: Any) -> list[jsonschema.ValidationError]:
    """The nesting rule, checked before jsonschema runs (see :func:`too_deep`)."""
    where: list[str | int] | None = None
    limit = MAX_JSON_DEPTH
    if type(document) is dict and type(document.get("symbol_metadata")) is dict:
        for sym, entry in document["symbol_metadata"].items():
            if type(entry) is dict and type(entry.get("data")) is dict:
                inner = too_deep(entry["data"], MAX_JSON_DEPTH)
                if inner is not None:
                    where = ["symbol_metadata", sym, "data", *inner]
                    break
    if where is None:
        where, limit = too_deep(document, MAX_DOCUMENT_DEPTH), MAX_DOCUMENT_DEPTH
    if where is None:
        return []
    import jsonschema

    return [jsonschema.ValidationError(f"nested deeper than {limit} levels", validator="maxDepth", path=where)]


def schema_errors(document: Any, name: str = STATE_SCHEMA) -> list[jsonschema.ValidationError]:
    """Every schema error, most relevant first (jsonschema's own ordering)."""
    deep = _depth_errors(document)
    if deep:
        return deep
    errors = list(validator(name).iter_errors(document))
    import jsonschema

    errors.sort(key=jsonschema.exceptions.relevance)
    return errors


def _describe(error: jsonschema.ValidationError) -> str:
    message = str(error.message)
    return message if len(message) <= 200 else message[:197] + "..."


def raise_for_schema(document: Any, *, path: str | Path | None, name: str = STATE_SCHEMA) -> None:
    """Raise :class:`SchemaValidationError` for the first schema error, listing all of them."""
    errors = schema_errors(document, name)
    if not errors:
        return
    import jsonschema

    best = jsonschema.exceptions.best_match(errors)
    assert best is not None
    listed = [(e.json_path, _describe(e)) for e in errors]
    raise SchemaValidationError(path, best.json_path, str(best.validator), _describe(best), errors=listed)
