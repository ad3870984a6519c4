"""Architecture check: no import cycles between the modules of one package (house rule of issue 10).

Reads imports statically with `ast`, so an import inside a function or under `if TYPE_CHECKING:` counts
too: a lazy or type-only import that closes a loop is still a loop in the design (pass a callable or a small
Protocol instead). Usage: `python scripts/check_cycles.py [PACKAGE ...]` (default: the four packages), or
call `find_cycles(Path("dht_node"))` from another check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("swarm", "dht_node", "shard_server", "client_sdk", "gateway")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `current`)."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph(package_dir: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """module → modules of the same top-level package that it imports (names as in `import` statements)."""
    paths = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}

    def known(name: str) -> str | None:
        # "pkg.mod.Class" → "pkg.mod": the longest prefix that is one of the package's modules
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in paths:
                return candidate
        return None

    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node, name, is_package)
                # `from pkg import mod` imports the submodule pkg.mod when it exists, else a name of pkg
                targets = [f"{module}.{alias.name}" for alias in node.names] if module else []
            for target in targets:
                hit = known(target)
                if hit is not None and hit != name:
                    graph[name].add(hit)
    return graph


def find_cycles(package_dir: Path, root: Path = ROOT) -> list[list[str]]:
    """One concrete cycle (["a", "b", "a"]) per strongly connected group of modules; [] when acyclic."""
    graph = import_graph(package_dir, root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; packages are small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(graph, group) for group in sorted(groups)]


def _one_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (BFS)."""
    start, members = group[0], set(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    return group  # unreachable for a strongly connected group


def main(argv: list[str]) -> int:
    problems = []
    for package in argv or PACKAGES:
        for cycle in find_cycles(ROOT / package):
            problems.append(f"import cycle in {package}: {' -> '.join(cycle)}")
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"no import cycles inside {', '.join(argv or PACKAGES)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
