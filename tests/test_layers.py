"""The packages stack in one direction: core <- adapters <- bench <- studies <- the CLI.

Every import of the project's own modules (at module level or inside a function) goes to the same
layer or one below, and no set of modules imports itself round. docs/architecture.md draws it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "adapters": 1, "bench": 2, "studies": 3}
ENTRY_POINT = "bench.cli"  # mounts every verb, the studies' too: the top floor
TOP = max(LAYERS.values()) + 1


def layer(module: str) -> int:
    return TOP if module == ENTRY_POINT else LAYERS[module.split(".")[0]]


def project_modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (`from a.b import c` is a.b.c when c is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, m, modules) for m, p in modules.items()}


def test_no_import_runs_up_a_layer():
    up = [f"{m} ({layer(m)}) imports {i} ({layer(i)})" for m, deps in import_graph().items() for i in deps
          if layer(i) > layer(m)]
    assert not up, "\n".join(sorted(up))


def test_no_import_loops():
    graph = import_graph()
    loops = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not loops, "\n".join(" <-> ".join(sorted(c)) for c in loops)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteration-free enough for a few hundred modules."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("source, expected", [
    ("from core.errors import BenchError", {"core.errors"}),
    ("from core.data import voc", {"core.data.voc"}),
    ("import bench.worker as w", {"bench.worker"}),
    ("def f():\n    from studies.run import run_study", {"studies.run"}),
])
def test_the_walker_sees_every_kind_of_import(tmp_path, source, expected):
    """The two tests above are only as good as this reading of imports."""
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports_of(path, "bench.m", project_modules()) == expected


def test_a_loop_is_found():
    assert {"a", "b"} in strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}})
