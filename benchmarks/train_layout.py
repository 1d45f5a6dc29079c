"""Module count and import depth of ``raycmr/train`` from an AST import graph.

    python benchmarks/train_layout.py [REPO_ROOT]

Depth: the longest chain ``a -> b -> ...`` of train/ modules each importing the next (module-
and function-level imports alike), counted in modules.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


def import_graph(root: Path, package: str = "raycmr") -> dict[str, set[str]]:
    """``module -> the package's modules it imports`` (lazy imports included)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in found if t in names and t != name}
    return graph


def depth(graph: dict[str, set[str]], within: str) -> tuple[int, list[str]]:
    """The longest import chain among the modules under ``within`` (the graph has no cycles)."""
    inside = {m: {t for t in ts if t.startswith(within)} for m, ts in graph.items()
              if m.startswith(within)}

    @functools.cache
    def chain(m: str) -> tuple[str, ...]:
        return (m, *max((chain(t) for t in inside[m]), key=len, default=()))

    best = max((chain(m) for m in inside), key=len)
    return len(best), list(best)


def main(root: Path) -> None:
    graph = import_graph(root)
    train = sorted(m for m in graph if m.startswith("raycmr.train"))
    n, chain = depth(graph, "raycmr.train")
    print(f"raycmr modules: {len(graph)}; train/ modules: {len(train)}")
    print(f"train/ import depth: {n} modules: {' -> '.join(chain)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
