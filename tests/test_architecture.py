"""The shape of the code, checked from its source with `ast`: import graph, layers, sizes.

* no import cycle among the modules of hub/, counting imports under TYPE_CHECKING and inside
  functions too (a cycle there is the same dependency, only hidden);
* hub/core is pure: it imports no I/O library and nothing of the hub outside hub.core,
  hub.errors, hub.settings and schemas;
* no module of hub/ is longer than MAX_LINES, but for the known exceptions listed below;
* every test is in exactly one layer of the pyramid (unit, integration, e2e), found by
  collecting the suite the way pytest does.
"""

from __future__ import annotations

import ast
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.layers import LAYERS, UNIT_GUARD, collect_layers

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "hub"
MAX_LINES = 450
CORE_FORBIDDEN = frozenset({"asyncio", "websockets", "aiohttp", "sqlite3", "socket"})
CORE_MAY_IMPORT = ("hub.core", "hub.errors", "hub.settings", "schemas")
# Modules over MAX_LINES today, each being split by another part of issue 11; remove a line
# once its module is split (the test fails on a line that is no longer needed).
KNOWN_LONG: dict[str, str] = {}
"""Modules allowed over the limit for now, each with the reason (none since the issue 11 splits)."""


def module_name(path: Path, root: Path = ROOT) -> str:
    """`hub/core/frames.py` -> `hub.core.frames`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def hub_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of `root`/hub, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / "hub").rglob("*.py"))}


def imported_names(path: Path, root: Path = ROOT) -> Iterator[str]:
    """Every module name an `import` or `from ... import` anywhere in the file refers to.

    Anywhere: under `if TYPE_CHECKING:` and inside functions too. For `from a.b import c`
    both `a.b` and `a.b.c` are given, as `c` may be a submodule. Relative imports are
    resolved against the file's package.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module of hub/ -> the modules of hub/ it imports (a package counts as its __init__)."""
    modules = hub_modules(root)
    return {
        name: {t for t in imported_names(path, root) if t in modules} - {name}
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_no_import_cycle_in_hub() -> None:
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles in hub/ (TYPE_CHECKING included): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_a_cycle_through_type_checking_and_a_function_body_is_found(tmp_path: Path) -> None:
    # The checker itself, on a made-up tree: hub.a needs hub.b only for types, hub.b imports
    # hub.a (relatively) inside a function; hub.c just uses hub.a.
    package = tmp_path / "hub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hub.b import B\n"
    )
    (package / "b.py").write_text("class B:\n    def f(self):\n        from . import a\n")
    (package / "c.py").write_text("import hub.a\n")
    graph = import_graph(tmp_path)
    assert graph["hub.c"] == {"hub.a"}
    assert find_cycles(graph) == [["hub.a", "hub.b"]]
    (package / "a.py").write_text("")
    assert find_cycles(import_graph(tmp_path)) == []


def core_import_violations() -> list[str]:
    """`module: imported` for every import hub/core may not make."""
    found: list[str] = []
    for name, path in hub_modules().items():
        if not name.startswith("hub.core"):
            continue
        for target in set(imported_names(path)):
            top = target.split(".")[0]
            if top in CORE_FORBIDDEN:
                found.append(f"{name}: {target} (I/O)")
            elif top in {"hub", "schemas"} and not target.startswith(CORE_MAY_IMPORT):
                # `from hub import x` yields "hub" and "hub.x": judge the precise one.
                if target == "hub":
                    continue
                found.append(f"{name}: {target} (outside the core)")
    return sorted(found)


def test_core_does_no_io_and_depends_only_on_itself() -> None:
    assert core_import_violations() == []


def test_no_module_in_hub_is_longer_than_the_limit() -> None:
    lengths = {name: len(p.read_text().splitlines()) for name, p in hub_modules().items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    unexpected = {name: n for name, n in too_long.items() if name not in KNOWN_LONG}
    assert unexpected == {}, f"modules over {MAX_LINES} lines: {unexpected}"
    stale = sorted(name for name in KNOWN_LONG if lengths.get(name, 0) <= MAX_LINES)
    assert stale == [], f"split now, remove from KNOWN_LONG: {stale}"
    for name, n in sorted(too_long.items()):
        print(f"known long module: {name} ({n} lines): {KNOWN_LONG[name]}")


def test_every_test_is_in_exactly_one_layer(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    layers = collect_layers(ROOT / "tests", tmp_path / "collect", request.config)
    assert len(layers) > 1000, f"collected only {len(layers)} tests"
    wrong = {nodeid: marks for nodeid, marks in layers.items() if len(marks) != 1}
    assert wrong == {}, f"tests not in exactly one of {sorted(LAYERS)}: {sorted(wrong)[:20]}"
    counts = {layer: sum(1 for m in layers.values() if m == [layer]) for layer in sorted(LAYERS)}
    print(f"tests per layer: {counts}")
    assert counts["unit"] >= 300, counts


def test_a_unit_test_cannot_use_the_network_or_start_a_process() -> None:
    # This test is itself a unit test: the guard of tests/layers.py is armed around it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="used the network"):
            sock.bind(("127.0.0.1", 0))
        with pytest.raises(RuntimeError, match="used the network"):
            sock.connect(("127.0.0.1", 9))
    with pytest.raises(RuntimeError, match="started a process"):
        subprocess.run(["true"], check=False)
    # Each refusal is remembered, so that code catching the error cannot hide it; these three
    # were expected, so they are cleared (else this test would fail for them).
    assert len(UNIT_GUARD.refusals) == 3, UNIT_GUARD.refusals
    UNIT_GUARD.refusals.clear()
    # Local sockets stay allowed: asyncio's loop wakes itself through a socket pair.
    left, right = socket.socketpair()
    left.close()
    right.close()
