"""The package's layout: rooms import downwards only, and the import graph has no circle.

The graph is read from every import statement of ``cdi/``, ``features/``, ``attacks/`` and ``reports/``
(module-level, function-level and type-only imports alike), so a circle hidden in a function still
counts. The rooms and their order are the map in the README's "Layout" section.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"cdi": "cdi", "features": "cdi.features", "attacks": "cdi.attacks", "reports": "cdi.reports"}

#: room -> rank; a module may import its own room and rooms of lower or equal rank only.
ROOMS = {
    "cdi.utils": 0, "cdi.stats": 1, "cdi.data": 2, "cdi.models": 3, "cdi.features": 4, "cdi.engine": 4,
    "cdi.attacks": 5, "cdi.audit": 6, "cdi.reports": 6, "cdi.toy": 7, "cdi.api": 8, "cdi.benchmark": 8,
    "cdi.cli": 9,
}


def module_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules."""
    paths = {}
    for folder, name in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            module = ".".join([name, *parts])
            paths[module.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {module: set() for module in paths}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
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


def room_of(module: str) -> str | None:
    return next((room for room in sorted(ROOMS, key=len, reverse=True)
                 if module == room or module.startswith(room + ".")), None)


def test_the_import_graph_has_no_circle():
    assert cycles(module_graph()) == []


def test_the_cycle_finder_finds_a_circle():  # the test above could not fail without it
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_rooms_import_downwards_only():
    upward = []
    for module, targets in module_graph().items():
        for target in targets:
            here, there = room_of(module), room_of(target)
            if here and there and ROOMS[there] > ROOMS[here]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_every_module_is_in_a_room():
    assert [module for module in module_graph() if module != "cdi" and room_of(module) is None] == []
