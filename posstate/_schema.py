"""The JSON Schema: where it is loaded from, and the jsonschema validator that is the source of truth.

The schema files live in the project's top-level ``schemas/`` folder and travel inside the wheel as
``posstate/schemas/``. jsonschema decides validity and words every error; the document module's fast path
only ever accepts what jsonschema accepts (a property test holds it to that) and falls back here otherwise.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema

from posstate._errors import SchemaValidationError

STATE_SCHEMA = "state.schema.json"


def schema_text(name: str = STATE_SCHEMA) -> str:
    """The text of a schema file, from the installed package or, in a checkout, from ``schemas/``."""
    packaged = importlib.resources.files("posstate").joinpath("schemas").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "schemas" / name
    return checkout.read_text(encoding="utf-8")


@functools.cache
def schema(name: str = STATE_SCHEMA) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text(name))
    return loaded


@functools.cache
def validator(name: str = STATE_SCHEMA) -> jsonschema.protocols.Validator:
    s = schema(name)
    cls = jsonschema.validators.validator_for(s)
    cls.check_schema(s)
    return cls(s)


def schema_errors(document: Any, name: str = STATE_SCHEMA) -> list[jsonschema.ValidationError]:
    """Every schema error, most relevant first (jsonschema's own ordering)."""
    errors = list(validator(name).iter_errors(document))
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
    best = jsonschema.exceptions.best_match(errors)
    assert best is not None
    listed = [(e.json_path, _describe(e)) for e in errors]
    raise SchemaValidationError(path, best.json_path, str(best.validator), _describe(best), errors=listed)
