"""The layers of posstate (docs/ARCHITECTURE.md), checked on the source: imports flow one way, no cycles.

The import graph is read with ``ast`` from every module under posstate/, module-level and function-level imports
alike. ``if TYPE_CHECKING:`` imports never run, so they may close a cycle, but they still may not point upward.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "posstate"

#: Each subpackage and its rank: a module may import its own package and packages of a lower rank only.
#: selftest (test machinery) may import anything; only the CLI imports it, inside a function (on demand).
#: "posstate" is the package itself (__init__ re-exports the public names, __main__ runs the CLI).
LAYERS = {
    "core": 0,
    "model": 1,
    "storage": 2,
    "journal": 3,
    "backup": 4,
    "replica": 4,
    "manager": 5,
    "account": 6,
    "serve": 7,
    "cli": 8,
    "selftest": 9,
    "posstate": 10,
}
RUNTIME_LIBS_ONLY_FOR_CLI = ("click", "rich")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. posstate.manager.commit
    dst: str  # imported module (or package), e.g. posstate.storage.fileops
    line: int
    type_checking: bool  # inside `if TYPE_CHECKING:`
    in_function: bool  # inside a function body (runs on demand)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The module a dotted import name refers to (``from posstate.storage import fileops`` -> the module)."""
    return name if name in known else name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in known else name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _edges_of(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[Edge] = []

    def visit(node: ast.AST, tc: bool, fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_tc = tc or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body)
            child_fn = fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append(Edge(module, _resolve(alias.name, known), child.lineno, child_tc, child_fn))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base[: len(base) - child.level + (1 if is_pkg else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    full = f"{target}.{alias.name}"
                    out.append(Edge(module, full if full in known else target, child.lineno, child_tc, child_fn))
            visit(child, child_tc, child_fn)

    visit(tree, False, False)
    return out


def _graph() -> list[Edge]:
    known = _modules()
    return [e for m, p in known.items() for e in _edges_of(m, p, known)]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "posstate"


def _cycles(nodes: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), or a node importing itself."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or (v, v) in edges:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for n in sorted(nodes):
        if n not in index:
            strong(n)
    return found


def _internal(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if e.dst == "posstate" or e.dst.startswith("posstate.")]


def test_every_subpackage_is_in_the_layer_table() -> None:
    """issue 13.2: each folder under posstate/ has a declared layer (a new folder must be placed on purpose)."""
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"posstate"}
    assert not [p.name for p in PKG.glob("_*.py") if p.name not in ("__init__.py", "__main__.py")], "flat modules left"


def test_no_import_cycle_between_modules() -> None:
    """issue 13.2: no cycle in the module import graph (TYPE_CHECKING-only imports excluded: they never run)."""
    edges = {(e.src, e.dst) for e in _internal(_graph()) if not e.type_checking and e.dst != e.src}
    nodes = set(_modules())
    edges = {(a, b) for a, b in edges if b in nodes and b != "posstate"}  # importing the package itself: see below
    assert _cycles(nodes, edges) == []


def test_no_import_cycle_between_packages() -> None:
    """issue 13.2: no cycle between the layer packages either."""
    edges = {(_layer(e.src), _layer(e.dst)) for e in _internal(_graph()) if not e.type_checking}
    edges = {(a, b) for a, b in edges if a != b}
    assert _cycles(set(LAYERS), edges) == []


def test_imports_never_point_upward() -> None:
    """issue 13.2: a module imports only its own package or lower layers, TYPE_CHECKING imports included;
    selftest is imported only by the CLI and only inside a function (the doctor command, on demand)."""
    bad = []
    for e in _internal(_graph()):
        src, dst = _layer(e.src), _layer(e.dst)
        if dst == "selftest" and src not in ("selftest",):
            if src != "cli" or not e.in_function or e.type_checking:
                bad.append(f"{e.src}:{e.line} imports {e.dst} (only the CLI may, inside a function)")
            continue
        if src == "selftest" or src == dst:
            continue
        if LAYERS[dst] > LAYERS[src]:
            bad.append(f"{e.src}:{e.line} imports {e.dst} ({src} is below {dst})")
    assert bad == []


def test_only_the_cli_imports_click() -> None:
    """issue 13.2: click is the CLI's dependency; no other package imports it, even lazily."""
    bad = [f"{e.src}:{e.line}" for e in _graph() if e.dst.split(".")[0] in RUNTIME_LIBS_ONLY_FOR_CLI and _layer(e.src) != "cli"]
    assert bad == []


def test_only_the_server_imports_the_web_stack() -> None:
    """issue 18.1: starlette, uvicorn and prometheus-client (the ``serve`` extra) are imported by posstate/serve
    only, and its JSON shapes (which the CLI imports) import none of them: the CLI runs without the extra."""
    web = ("starlette", "uvicorn", "prometheus_client", "websockets")
    edges = _graph()
    bad = [f"{e.src}:{e.line}" for e in edges if e.dst.split(".")[0] in web and _layer(e.src) != "serve"]
    bad += [f"{e.src}:{e.line}" for e in edges if e.src == "posstate.serve.shapes" and e.dst.split(".")[0] in web]
    shapes_deps = {e.dst for e in edges if e.src == "posstate.serve.shapes" and e.dst.startswith("posstate.serve")}
    assert bad == [] and shapes_deps == set()


def test_no_import_by_name_outside_the_package_init() -> None:
    """issue 13.2: the graph above sees import statements only; an ``importlib.import_module`` or
    ``__import__`` call would hide an edge from it, so only posstate/__init__.py (the lazy names) makes one."""
    bad = []
    for module, path in _modules().items():
        if module == "posstate":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in ("import_module", "__import__"):
                    bad.append(f"{module}:{node.lineno}")
    assert bad == []


def test_the_runtime_never_imports_selftest() -> None:
    """issue 13.5: no runtime module (anything but cli and selftest) imports posstate.selftest at all."""
    bad = [
        f"{e.src}:{e.line}"
        for e in _internal(_graph())
        if _layer(e.dst) == "selftest" and _layer(e.src) not in ("cli", "selftest")
    ]
    assert bad == []


def test_the_layer_walk_sees_an_upward_import(tmp_path: Path) -> None:
    """issue 13.2: the checker itself works: a function-level upward import in a storage module is seen."""
    known = _modules()
    probe = tmp_path / "fileops.py"
    probe.write_text(
        (PKG / "storage" / "fileops.py").read_text() + "\n\ndef _x() -> None:\n    from posstate.manager import base\n"
    )
    edges = _edges_of("posstate.storage.fileops", probe, known)
    up = [e for e in edges if e.dst == "posstate.manager.base"]
    assert up and up[0].in_function and LAYERS[_layer(up[0].dst)] > LAYERS[_layer(up[0].src)]


LAZY = (
    "jsonschema",
    "asyncio",
    "click",
    "rich",
    "watchdog",
    "posstate.selftest",
    "posstate.account",
    "posstate.replica",
    "boto3",
    "posstate.serve",
    "starlette",
    "uvicorn",
    "prometheus_client",
)


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import posstate", id="import-posstate"),
        pytest.param("from posstate import Position, PositionStateManager, StateConfig", id="import-manager"),
    ],
)
def test_import_loads_no_heavy_or_test_module(code: str) -> None:
    """issue 13.5/13.6: importing posstate (and the manager) loads none of jsonschema, asyncio, click,
    watchdog, the account store or the test machinery; they load when used."""
    probe = code + f"; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {LAZY!r} or m.startswith({LAZY!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_lazy_public_names_resolve_and_all_is_sorted() -> None:
    """issue 13.1/13.6: every name in posstate.__all__ resolves (lazily loaded ones too); __all__ is sorted."""
    code = (
        "import posstate; names = posstate.__all__; "
        "assert names == sorted(names), names; "
        "missing = [n for n in names if getattr(posstate, n, None) is None]; "
        "assert not missing, missing; "
        "assert set(names) <= set(dir(posstate)); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_dir_lists_the_public_names_and_not_the_layers() -> None:
    """issue 13.1: dir(posstate) lists every public name before it is loaded, and no subpackage or helper
    import after (the public part of dir() is __all__, as with the flat modules)."""
    code = (
        "import posstate; before = set(dir(posstate)); posstate.PositionStateManager; posstate.AccountStateStore; "
        "public = {n for n in dir(posstate) if not n.startswith('_')} - {'annotations'}; "
        "assert set(posstate.__all__) <= before, set(posstate.__all__) - before; "
        "names = {n for n in posstate.__all__ if not n.startswith('_')}; "
        "assert public == names, public ^ names; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_type_checkers_see_the_public_names_and_refuse_a_typo(tmp_path: Path) -> None:
    """issue 13.6: the lazy names keep their types under mypy, and an unknown name is still an error
    (a module-level __getattr__ visible to mypy would type every attribute of posstate, a typo too, as Any)."""
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text(
        "import posstate\n"
        "from posstate import PositionStateManager\n"
        "reveal_type(posstate.generate_key)\n"
        "reveal_type(PositionStateManager.load_positions)\n"
        "posstate.PositionStateManagr\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "--follow-imports=silent", str(user)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )
    assert 'Revealed type is "def () -> bytes"' in out.stdout, out.stdout
    assert "posstate.model.position.Position" in out.stdout, out.stdout
    assert 'Module has no attribute "PositionStateManagr"' in out.stdout, out.stdout


#: Modules allowed over MAX_LINES, each with its reason (issue 13.3: "no module over ~400 lines").
MAX_LINES = 420
LONG_MODULES = {
    # STYLE.md: "one hierarchy in one module": 21 small PosStateError classes, each with its read-only
    # attributes and message; splitting it would give two places to look for one error.
    "posstate/core/errors.py": "the one error hierarchy (STYLE.md)",
}


def test_no_module_is_over_the_line_limit() -> None:
    """issue 13.3: no module in posstate/ exceeds MAX_LINES lines, except the listed ones (each with a reason)."""
    long = {str(p.relative_to(ROOT)): n for p in sorted(PKG.rglob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), long
    assert all(LONG_MODULES.values())


def _doc_texts() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]


def test_docs_name_only_modules_that_exist() -> None:
    """issue 13.7: README and docs/*.md name the layered modules: no flat-layout reference (`_codec.decode`),
    and every `posstate.x.y` name and `posstate/x/y.py` path they give exists (checked on the source)."""
    import re

    bad = []
    for name, text in _doc_texts():
        bad += [f"{name}: {m}" for m in re.findall(r"`(_[a-z][a-z_]*\.[A-Za-z_]+)", text)]
        for ref in set(re.findall(r"`(posstate/[A-Za-z_/]+\.py)`", text)):
            if not (ROOT / ref).is_file():
                bad.append(f"{name}: {ref}")
        for ref in set(re.findall(r"`(posstate\.[A-Za-z_.]+[A-Za-z_])`", text)):
            parts = ref.split(".")
            i = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in _modules())
            source = _modules()[".".join(parts[:i])].read_text()
            if any(not re.search(rf"\b{re.escape(attr)}\b", source) for attr in parts[i:]):
                bad.append(f"{name}: {ref}")
    assert bad == []


def _outside_sources() -> list[Path]:
    """The code outside the package that uses it as a user would: benchmarks, scripts and the checkout's cli.py.
    Tests are left out: they test internals, so they import from the subpackages (the issue let their imports
    move), and a public name imported from its module there is the same object."""
    return [ROOT / "cli.py", *sorted(p for d in ("benchmarks", "scripts") for p in (ROOT / d).rglob("*.py"))]


def test_code_outside_the_package_imports_public_names_from_posstate() -> None:
    """issue 13.1: benchmarks, scripts, cli.py and the code examples in README and docs/ import a public name from
    ``posstate``, never from the subpackage that defines it (internal names still come from their module)."""
    import importlib
    import re

    import posstate

    public = {name: getattr(posstate, name) for name in posstate.__all__}
    bad = []
    for path in _outside_sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("posstate.")):
                continue
            for alias in node.names:
                if alias.name in public and getattr(importlib.import_module(node.module or ""), alias.name) is public[alias.name]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {alias.name}")
    for name, text in _doc_texts():
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            bad += [f"{name}: {line.strip()}" for line in block.splitlines() if re.match(r"\s*(from|import) posstate\.", line)]
    assert bad == []


def test_options_a_user_builds_are_public_names() -> None:
    """issue 13.1: the option records docs/SERVE.md has a bot build for ``serve()`` (StreamOptions, HealthLimits)
    are public names, so no user imports a subpackage for them."""
    pytest.importorskip("starlette")
    import posstate
    from posstate.serve import health, stream

    assert {"HealthLimits", "StreamOptions"} <= set(posstate.__all__)
    assert posstate.StreamOptions is stream.StreamOptions and posstate.HealthLimits is health.HealthLimits


def test_architecture_doc_names_every_layer_and_module() -> None:
    """issue 13.7: docs/ARCHITECTURE.md's picture shows every layer folder and its table names every module of
    it (a new module is placed on purpose, as a new folder is); README's Development section names every
    folder and points to the document."""
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    picture = text.split("```")[1]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z]+)/` \(\d+\) \|.*$", text, re.M)}
    folders = sorted(set(LAYERS) - {"posstate"})
    bad = [f"picture: {f}/" for f in folders if not re.search(rf"(?<![\w/]){f}/ ", picture)]
    bad += [f"table: {f}/" for f in folders if f not in rows]
    bad += [
        f"table: {p.parent.name}/{p.name}"
        for p in sorted(PKG.glob("*/*.py"))
        if p.name != "__init__.py" and f"`{p.name}`" not in rows.get(p.parent.name, "")
    ]
    readme = (ROOT / "README.md").read_text().split("## Development", 1)[1].split("\n## ", 1)[0]
    bad += [f"README Development: {f}/" for f in folders if f"`{f}/`" not in readme]
    if "(docs/ARCHITECTURE.md)" not in readme:
        bad.append("README Development: no link to docs/ARCHITECTURE.md")
    assert bad == []
