"""The shape of the code: the serving packages never import the local stack or the
benchmarks, their modules import each other without cycles, and none grows past its size
limit without saying why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVING = ("serve_app", "deployments")
DEV_ONLY = ("devstack", "bench", "tests")
MAX_LINES = 450


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imports(path: Path, name: str, runtime_only: bool = False) -> set[str]:
    """Every module `path` imports, at any depth of its code (lazy imports included);
    with `runtime_only`, not those only type checkers see."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree) if runtime_only else set()
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


SERVING_MODULES = {n: p for pkg in SERVING for n, p in _modules(pkg).items()}


@pytest.mark.parametrize("module", sorted(SERVING_MODULES))
def test_serving_code_never_imports_dev_tooling(module: str) -> None:
    bad = sorted(
        i for i in _imports(SERVING_MODULES[module], module) if i.split(".")[0] in DEV_ONLY
    )
    assert not bad, f"{module} imports development tooling: {bad}"


def test_importing_the_serving_code_loads_no_dev_tooling() -> None:
    names = sorted(SERVING_MODULES)
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {DEV_ONLY!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_no_import_cycles_between_serving_modules() -> None:
    graph = {
        name: {
            i for i in _imports(path, name, runtime_only=True) if i in SERVING_MODULES and i != name
        }
        for name, path in SERVING_MODULES.items()
    }
    # NOTE: a package's __init__ is not an edge target worth reporting on its own; only
    # module-to-module edges can form a cycle here (our __init__ files import nothing).
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "module",
    sorted(n for pkg in (*SERVING, "devstack") for n in _modules(pkg)),
)
def test_modules_stay_small_or_say_why(module: str) -> None:
    path = {**SERVING_MODULES, **_modules("devstack")}[module]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Size:" in doc, (
        f"{module} has {lines} lines (limit ~{MAX_LINES}); split it, or say in its "
        "docstring why it stays whole (a line starting with 'Size:')"
    )
