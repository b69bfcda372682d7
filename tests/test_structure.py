"""The package's import graph has no cycles (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "poolport"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the poolport modules it imports anywhere in its source."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    extensions = {_module_name(p.with_suffix(".py")) for p in PACKAGE.rglob("*.c")}  # _cetf: a leaf
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = anchor + (f".{node.module}" if node.module else "")
                elif (node.module or "").startswith("poolport"):
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
    assert "poolport.codec.terms" in graph["poolport.codec.etf"]
    assert "poolport.server.ledger" in graph["poolport.server.dispatcher"]
    assert "poolport.protocol.bert" in graph["poolport.server.worker"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# What each part of the package may import: a layer sees the ones below it, never the ones above.
# The codec knows nothing of frames; the protocol nothing of processes; only tools see everything.
LAYERS = {
    "poolport.errors": set(),
    "poolport.codec": {"poolport.errors"},
    "poolport.protocol": {"poolport.errors", "poolport.codec"},
    "poolport.handlers": {"poolport.errors", "poolport.codec"},
    "poolport.config_errors": set(),
    "poolport.config": {"poolport.errors", "poolport.codec", "poolport.config_errors"},
    "poolport.erlang": {"poolport.errors", "poolport.codec", "poolport.protocol", "poolport.server.link"},
    "poolport.server": {
        "poolport.errors",
        "poolport.codec",
        "poolport.protocol",
        "poolport.handlers",
        "poolport.config",
        "poolport.erlang",
    },
    "poolport.demo_handlers": set(),
}


def _part(module: str) -> str | None:
    """The LAYERS entry ``module`` belongs to (longest prefix), if any."""
    owners = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return max(owners, key=len) if owners else None


def _allowed(part: str, target: str) -> bool:
    return _part(target) == part or any(target == a or target.startswith(a + ".") for a in LAYERS[part])


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    found = []
    for module, targets in graph.items():
        part = _part(module)
        if part is None:
            continue  # the package itself, __main__ and tools may import anything
        found += [(module, t) for t in sorted(targets) if not _allowed(part, t)]
    return sorted(found)


def test_every_module_belongs_to_a_part_or_is_a_tool():
    graph = import_graph()
    free = {"poolport", "poolport.__main__"}
    assert {m for m in graph if _part(m) is None and m not in free and not m.startswith("poolport.tools")} == set()


def test_layers_import_only_downwards():
    assert layer_violations(import_graph()) == []


def test_a_layer_violation_is_found():
    graph = {"poolport.codec.etf": {"poolport.protocol.framing"}, "poolport.tools.cli": {"poolport.server.worker"}}
    assert layer_violations(graph) == [("poolport.codec.etf", "poolport.protocol.framing")]
