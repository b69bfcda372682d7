"""The package's import graph has no cycles (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "poolport"


def _module_name(path: Path) -> str:
    return "poolport" if path.name == "__init__.py" else f"poolport.{path.stem}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the poolport modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.glob("*.py")}
    extensions = {f"poolport.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.c")}  # _cetf: a leaf
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    base = "poolport" + (f".{node.module}" if node.module else "")
                elif node.level == 0 and (node.module or "").startswith("poolport"):
                    base = node.module or ""
                else:
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target not in extensions:
                        graph[name].add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "poolport.terms" in graph["poolport.etf"] and "poolport.ledger" in graph["poolport.dispatcher"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
