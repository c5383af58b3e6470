"""docs/SECURITY.md names a test for every promise: each named test must exist, so the page cannot drift."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "SECURITY.md"


def _references(text: str) -> list[tuple[str, str | None]]:
    """(file, test name or None) for every `tests/x.py` and `::name` in the page, `::name` continuing the file
    named last before it."""
    refs: list[tuple[str, str | None]] = []
    current: str | None = None
    for match in re.finditer(r"(tests/[\w/]+\.py)(?:::(\w+))?|::(\w+)", text):
        path, first, more = match.groups()
        if path is not None:
            current = path
            refs.append((path, first))
        else:
            assert current is not None, f"::{more} before any test file"
            refs.append((current, more))
    return refs


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_every_test_security_md_names_exists() -> None:
    """Every test file and test function docs/SECURITY.md names exists (a renamed test fails here)."""
    refs = _references(DOC.read_text())
    assert len(refs) > 50
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/SECURITY.md names tests that do not exist: {missing}"


def test_every_threat_has_a_section() -> None:
    """The seven threats of the model each have their table."""
    text = DOC.read_text()
    for n in range(1, 8):
        assert re.search(rf"^## T{n}\. ", text, re.M), f"no section for T{n}"
