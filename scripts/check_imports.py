"""Architecture check: the three role packages import only `swarm` (and third-party code), never each other;
the front end (`gateway`: the gateway process and the `pollen` CLI) imports only `client_sdk` and `swarm`, and
nothing imports the front end.

Reads every module's imports with `ast` (static: also catches imports inside functions).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("dht_node", "shard_server", "client_sdk")
FRONT_END = "gateway"


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def main() -> int:
    problems = []
    for role in ROLES:
        for path in sorted((ROOT / role).rglob("*.py")):
            for other in imported_packages(path) & (set(ROLES) - {role}):
                problems.append(f"{path.relative_to(ROOT)} imports {other} (role packages may import only swarm)")
    for path in sorted((ROOT / FRONT_END).rglob("*.py")):
        for other in imported_packages(path) & {"dht_node", "shard_server"}:
            problems.append(f"{path.relative_to(ROOT)} imports {other} (the front end may import client_sdk and swarm)")
    for role in (*ROLES, "swarm"):
        for path in sorted((ROOT / role).rglob("*.py")):
            if FRONT_END in imported_packages(path):
                problems.append(f"{path.relative_to(ROOT)} imports {FRONT_END} (nothing may depend on the front end)")
    for path in sorted((ROOT / "swarm").rglob("*.py")):
        for other in imported_packages(path) & set(ROLES):
            problems.append(f"{path.relative_to(ROOT)} imports {other} (swarm must not depend on a role package)")
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("imports ok: roles depend only on swarm; the front end only on client_sdk and swarm")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
