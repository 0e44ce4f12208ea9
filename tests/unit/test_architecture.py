"""The shape of the code, read from its imports (every one, those inside functions too): no
circles, data flowing one way (data_pipeline -> mtrain), no module importing an app, and the
model file importing the standard library and torch alone."""

import ast
import sys
from pathlib import Path

from support.apps import REPO

PACKAGES = ("data_pipeline", "mtrain")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
# An app is what `python -m` runs: thin doors over library code.
APPS = {name for name, path in MODULES.items() if 'if __name__ == "__main__":' in path.read_text()}


def imported_names(name: str) -> set[str]:
    """Every dotted name module ``name`` imports, wherever the statement stands: ``from a.b
    import c`` gives ``a.b`` and ``a.b.c`` (c may be a module or a name in a.b)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found - {""}


def local_imports(name: str) -> set[str]:
    """The modules of this repository that module ``name`` imports."""
    return {m for m in imported_names(name) if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end),
    or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_there_is_no_import_circle():
    graph = {name: local_imports(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle_through_several_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_model_imports_the_standard_library_and_torch_only():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    roots = {m.split(".")[0] for m in imported_names("mtrain.model")}
    assert "torch" in roots
    assert roots <= allowed, f"mtrain/model.py imports {sorted(roots - allowed)}"


def test_no_module_imports_an_app_and_data_flows_one_way():
    assert {"mtrain.train", "data_pipeline.prepare"} <= APPS
    for name in MODULES:
        imported = imported_names(name)
        assert not imported & APPS, f"{name} imports the app(s) {imported & APPS}"
        if name.startswith("data_pipeline"):
            # Shards are made without the trainer: no torch, nothing of mtrain.
            upstream = {m for m in imported if m.split(".")[0] in ("mtrain", "torch")}
            assert not upstream, f"{name} imports {upstream}"
