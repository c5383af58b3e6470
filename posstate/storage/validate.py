"""Offline validation of one file: every check in order, each with its verdict, never a write.

Used by ``PositionStateManager.validate_state()``, periodic validation and ``posstate validate``. Without a
key it checks what needs none (header, checksum, versions) and says the contents were not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posstate.core.errors import (
    CorruptStateError,
    MissingKeyError,
    PersistenceError,
    PosStateError,
    SchemaValidationError,
    StateNotFoundError,
    UnsupportedVersionError,
    WrongKeyError,
)
from posstate.model import document as _document
from posstate.storage import codec as _codec
from posstate.storage import statefile as _statefile
from posstate.storage.container import MAGIC, Header


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool | None  # None: not run (an earlier check failed, or no key)
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    path: str  # JSON path, or "$" for the file as a whole
    message: str
    rule: str = ""


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """What :func:`validate_file` found. ``valid`` is True only if every check ran and passed."""

    path: str
    valid: bool
    contents_checked: bool
    checks: tuple[Check, ...]
    errors: tuple[ValidationIssue, ...] = ()
    generation: int | None = None
    positions: int | None = None
    key_id: str | None = None
    error: PosStateError | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "path": self.path,
            "contents_checked": self.contents_checked,
            "generation": self.generation,
            "positions": self.positions,
            "key_id": self.key_id,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "errors": [{"path": e.path, "message": e.message, "rule": e.rule} for e in self.errors],
        }


CHECK_NAMES = ("read", "header", "checksum", "version", "decryption", "decompression", "json", "schema", "relationships")


def validate_file(path: Path, *, options: _statefile.ReadOptions) -> ValidationReport:
    """Run every check on *path*; never raises for a bad file (the report says what is wrong)."""
    checks: list[Check] = []
    header: Header | None = None

    def finish(error: PosStateError | None, issues: list[ValidationIssue], contents: bool) -> ValidationReport:
        done = {c.name for c in checks}
        rest = [Check(n, None, "not run") for n in CHECK_NAMES if n not in done]
        # ok=None: not applicable (a plain or uncompressed file), not a failure
        valid = error is None and contents and all(c.ok is not False for c in checks)
        return ValidationReport(
            path=str(path),
            valid=valid,
            contents_checked=contents,
            checks=tuple(checks + rest),
            errors=tuple(issues),
            generation=header.generation if header else None,
            positions=header.position_count if header else None,
            key_id=header.key_id if header and header.encrypted else None,
            error=error,
        )

    try:
        data = _statefile.read_bytes(path, max_size=options.max_file_bytes)
    except (StateNotFoundError, CorruptStateError, PersistenceError) as exc:
        checks.append(Check("read", False, str(exc)))
        return finish(exc, [ValidationIssue("$", str(exc), "read")], False)
    checks.append(Check("read", True, f"{len(data)} bytes"))
    try:
        header = _codec.inspect(data, path=path)
    except CorruptStateError as exc:
        # The header check passes only when the magic is really there: an empty or cut-to-nothing file fails it.
        name = "checksum" if exc.kind != "not-a-state-file" and data.startswith(MAGIC) else "header"
        if name == "checksum":
            checks.append(Check("header", True, "PSTATE magic present"))
        checks.append(Check(name, False, exc.reason))
        return finish(exc, [ValidationIssue("$", exc.reason, exc.kind)], False)
    except UnsupportedVersionError as exc:
        checks += [Check("header", True), Check("checksum", True), Check("version", False, str(exc))]
        return finish(exc, [ValidationIssue("$", str(exc), "version")], False)
    checks += [
        Check("header", True, f"format {header.format_version}, flags {header.flags:#04x}"),
        Check("checksum", True, "SHA-256 matches"),
        Check("version", True, f"schema {header.schema_version}"),
    ]
    if header.encrypted and options.keyring is None:
        checks.append(Check("decryption", None, f"no key given (file key id {header.key_id}): contents NOT checked"))
        return finish(None, [], False)
    try:
        _, payload = _codec.decode(data, keyring=options.keyring, path=path, max_document_bytes=options.max_document_bytes)
    except (WrongKeyError, MissingKeyError) as exc:
        checks.append(Check("decryption", False, str(exc)))
        return finish(exc, [ValidationIssue("$", str(exc), "decryption")], False)
    except CorruptStateError as exc:
        checks.append(
            Check(
                "decryption", True if header.encrypted else None, "AES-GCM tag verified" if header.encrypted else "not encrypted"
            )
        )
        checks.append(Check("decompression", False, exc.reason))
        return finish(exc, [ValidationIssue("$", exc.reason, "decompression")], False)
    if options.require_encryption and not header.encrypted:
        plain = WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
        checks.append(Check("decryption", False, str(plain)))
        return finish(plain, [ValidationIssue("$", str(plain), "decryption")], False)
    checks.append(
        Check("decryption", True if header.encrypted else None, "AES-GCM tag verified" if header.encrypted else "not encrypted")
    )
    checks.append(
        Check(
            "decompression",
            True if header.compressed else None,
            f"{len(payload)} bytes of JSON" if header.compressed else "not compressed",
        )
    )
    try:
        doc = _document.loads(payload, path=path, strict=not header.encrypted)
    except (CorruptStateError, SchemaValidationError) as exc:
        checks.append(Check("json", False, str(exc)))
        return finish(exc, [ValidationIssue("$", str(exc), "json")], True)
    checks.append(Check("json", True))
    try:
        from posstate.model.schema import raise_for_schema

        raise_for_schema(doc, path=path)
    except SchemaValidationError as exc:
        checks.append(Check("schema", False, f"{exc.json_path}: {exc.detail}"))
        return finish(exc, [ValidationIssue(p, m, exc.rule) for p, m in exc.errors], True)
    checks.append(Check("schema", True, "JSON Schema draft 2020-12"))
    try:
        _statefile.parse(data, path=path, options=options)
    except SchemaValidationError as exc:
        checks.append(Check("relationships", False, f"{exc.json_path}: {exc.detail}"))
        return finish(exc, [ValidationIssue(p, m, exc.rule) for p, m in exc.errors], True)
    checks.append(Check("relationships", True, "keys, contracts, revisions, tombstones, time"))
    return finish(None, [], True)
