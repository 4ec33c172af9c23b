"""The layout stays the architecture (issue 13): no import cycles between modules, engine modules small,
and every method findable from its file (methods/NAME.py names its fast kernels)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import merge_cli
from merge_cli.kernels.dispatch import FUSED_METHODS
from merge_cli.methods import METHODS
from merge_cli.methods.base import MethodSpec

ROOT = Path(merge_cli.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth of the file (lazy imports count too), but not
    under `if TYPE_CHECKING:` (annotations only)."""
    mods = module_names()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            targets = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("merge_cli")
            ):
                targets = [owner(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.startswith("merge_cli")]
            graph[m].update(t for t in targets if t and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_commands_never_import_the_app():
    graph = import_graph()
    assert not [
        m for m, deps in graph.items() if m.startswith("merge_cli.commands") and "merge_cli.cli" in deps
    ]


def test_engine_modules_stay_under_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "engine").glob("*.py")}
    assert sizes and all(n < 400 for n in sizes.values()), sizes


def _method_modules() -> dict[str, object]:
    """Method name -> the methods/ module whose top level defines its MethodSpec."""
    import merge_cli.methods as pkg

    owners: dict[str, object] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"merge_cli.methods.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, MethodSpec) and value.name in METHODS and METHODS[value.name] is value:
                owners.setdefault(value.name, mod)
    return owners


def test_every_method_names_its_fast_kernels_in_its_own_file():
    owners = _method_modules()
    assert set(owners) == set(METHODS)
    with_kernels = set()
    for name, mod in owners.items():
        fast = getattr(mod, "FAST_KERNELS", None)
        assert isinstance(fast, dict), f"{mod.__name__} has no FAST_KERNELS"
        for dotted in fast.get(name, ()):
            where, _, attr = dotted.rpartition(".")
            assert hasattr(importlib.import_module(where), attr), f"{mod.__name__}: {dotted} does not exist"
        if fast.get(name):
            with_kernels.add(name)
        assert set(fast) <= {s.name for s in vars(mod).values() if isinstance(s, MethodSpec)}
    # the dispatch table and the methods' files agree on which methods have fast kernels
    assert with_kernels == set(FUSED_METHODS)
