"""The package's layout stays a layered one: its import graph is acyclic, nothing imports the CLI, no private
name is imported across modules, and no module grows past 400 lines (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nnunet_adpfl"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path):
    """(imported module, imported name or None, line) for every import in the file, also inside functions."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:  # ``from . import files``: the module itself
                    yield f"{target}.{alias.name}", None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            while target and target not in MODULES:  # ``nnunet_adpfl.x.y`` where y is a name
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + ".") and target != PACKAGE:
                graph[module].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_its_layers():
    for sub in ("privacy", "federation", "morphology", "evaluation", "workflows", "data", "training", "nnunet",
                "common"):
        assert f"{PACKAGE}.{sub}" in MODULES, sub
    assert set(p.name for p in ROOT.glob("*.py")) == {"__init__.py", "cli.py"}


def test_import_graph_is_acyclic():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_reports_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_the_cli():
    offenders = [f"{m}:{line}" for m, path in MODULES.items() for target, name, line in _imports(m, path)
                 if target == f"{PACKAGE}.cli" or (target == PACKAGE and name == "cli")]
    assert not offenders, offenders


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{m}:{line} imports {name} from {target}" for m, path in MODULES.items()
                 for target, name, line in _imports(m, path)
                 if name and name.startswith("_") and not name.startswith("__") and target.startswith(PACKAGE)]
    assert not offenders, offenders


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
