"""The package reads top to bottom: each package under batcher/ and each top-level module is a
room, and no two rooms import each other, directly or round a circle. Classes stay under 200
lines and functions under 60, so each fits in a reader's head.

The imports are read from the source (every import, lazy ones and TYPE_CHECKING ones too),
not from a running interpreter, so an import that only some command makes still counts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batcher"
MAX_CLASS = 200
MAX_FUNCTION = 60


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "batcher" or len(parts) < 2:
        return None
    return parts[1]


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> Iterator[str]:
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def room_imports() -> dict[str, dict[str, set[str]]]:
    """room -> room it imports -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _room(_module_of(path)) or "batcher"
        for target in _imported(path):
            room = _room(target)
            if room is None or room == source:
                continue
            if (PACKAGE / room).is_dir() or (PACKAGE / f"{room}.py").is_file():
                graph.setdefault(source, {}).setdefault(room, set()).add(
                    str(path.relative_to(PACKAGE.parent)))
    return graph


def _circles(graph: dict[str, dict[str, set[str]]]) -> list[set[str]]:
    """The strongly connected groups of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(room: str) -> None:
        index[room] = low[room] = len(index)
        stack.append(room)
        for other in graph.get(room, {}):
            if other not in index:
                visit(other)
                low[room] = min(low[room], low[other])
            elif other in stack:
                low[room] = min(low[room], index[other])
        if low[room] == index[room]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == room:
                    break
            if len(group) > 1:
                found.append(group)

    for room in list(graph):
        if room not in index:
            visit(room)
    return found


def test_no_room_imports_another_round_a_circle() -> None:
    graph = room_imports()
    assert {"run", "store", "manifest", "providers"} <= set(graph)  # the graph was read
    problems = []
    for group in _circles(graph):
        ties = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})"
                for a in sorted(group) for b in sorted(graph.get(a, {})) if b in group]
        problems.append("; ".join(ties))
    assert not problems, "rooms that import each other:\n" + "\n".join(problems)


def test_the_circle_check_sees_a_circle() -> None:
    graph = {"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}}, "d": {"a": {"w"}}}
    assert _circles(graph) == [{"a", "b", "c"}]


def _too_long() -> Iterator[str]:
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION
            else:
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                yield f"{path.relative_to(PACKAGE.parent)}: {node.name} is {lines} lines"


def test_classes_and_functions_fit_in_a_readers_head() -> None:
    assert list(_too_long()) == []
