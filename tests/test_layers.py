"""The layout's guard: which package may import which, read from the source with `ast`.

- `model/` imports nothing from `ipc`, `http`, `engine`, `bench` or `config`;
- `ipc/` imports nothing from `http`, `engine` or `bench`;
- `http/` imports nothing from `ipc` or `bench` (it talks only to the Engine);
- nothing in the server imports `bench` (only the command line dispatches to it);
- no module imports itself through a cycle.

Every import counts, at module level, inside functions and under `if TYPE_CHECKING:`: a
type-only import still ties two modules together for whoever reads or changes them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tinyllm_trio"

FORBIDDEN = {
    "model": {"ipc", "http", "engine", "bench", "config"},
    "ipc": {"http", "engine", "bench"},
    "http": {"ipc", "bench"},
}
MAY_IMPORT_BENCH = {"bench", "cli"}  # the benchmarks themselves, and the command line


def _module_name(path: Path) -> str:
    parts = ("tinyllm_trio", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `tinyllm_trio...` name the module imports: modules, and `module.name` for a
    `from module import name` (which is a module when `name` is a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tinyllm_trio"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("tinyllm_trio")
        ):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    raw = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imported if i in raw and i != m} for m, imported in raw.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_package_is_read() -> None:
    graph = _graph()
    assert {"tinyllm_trio.engine", "tinyllm_trio.model.transformer"} <= set(graph)
    assert "tinyllm_trio.model.transformer" in graph["tinyllm_trio.model.batching"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _layer(module) == layer
        for target in targets
        if _layer(target) in FORBIDDEN[layer]
    )
    assert wrong == []


def test_nothing_in_the_server_imports_the_benchmarks() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _layer(module) not in MAY_IMPORT_BENCH
        for target in targets
        if _layer(target) == "bench"
    )
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_http_talks_to_the_engine_without_hedges() -> None:
    """`http/` types its engine as `Engine` and the HTTP tests drive a real one (in-process
    backend, scripted batcher), so nothing there checks what shape the engine has."""
    for name in ("generation.py", "app.py", "openai_api.py", "startup.py"):
        text = (PACKAGE / "http" / name).read_text(encoding="utf-8")
        assert "isawaitable" not in text, name
        assert "getattr(self.engine" not in text and "getattr(app.engine" not in text, name
        assert "getattr(engine" not in text, name
    assert "getattr(" not in (PACKAGE / "http" / "generation.py").read_text(encoding="utf-8")
