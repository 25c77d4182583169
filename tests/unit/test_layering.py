"""Who may import whom in kvmlite/ (docs/architecture.md): no import cycle, and
nothing below cli.py sees the command line.

Every import counts, at any depth: one inside a function ties two modules
together as much as one at the top, it only hides the cycle until run time.
Importing kvmlite.a.b also runs kvmlite/a/__init__.py, so that is an edge
too, except from a module inside kvmlite/a/ (its package is already loading).
"""

from __future__ import annotations

import ast
from pathlib import Path


import kvmlite

ROOT = Path(kvmlite.__file__).parent
CLI_MODULES = {"kvmlite.cli", "kvmlite.__main__"}

# `python -m kvmlite.X` entry points are command lines of their own, at the
# top with cli.py: they may parse arguments, and no library module imports them.
ENTRY_POINTS = {"kvmlite.demo", "kvmlite.pki", "kvmlite.soak"}


def modules() -> dict[str, Path]:
    """Every module of kvmlite/ by dotted name (a package by its __init__.py)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `name` imports, at any depth, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            # `from pkg import x` imports the submodule pkg.x when there is one
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the kvmlite modules it imports, module -> every top-level name it imports)."""
    mods = modules()
    graph, raw = {}, {}
    for name, path in mods.items():
        names = imported_names(name, path)
        raw[name] = {n.partition(".")[0] for n in names}
        edges = set()
        for n in names:
            if n != "kvmlite" and not n.startswith("kvmlite."):
                continue
            while n not in mods:          # `from .pagemap.grid import grid`: the module is the prefix
                n = n.rpartition(".")[0]
            # the target, and the packages it lives in (their __init__ runs first)
            parts = n.split(".")
            for i in range(len(parts), 0, -1):
                target = ".".join(parts[:i])
                if target == name or name.startswith(target + "."):
                    break                 # our own package: already loading
                edges.add(target)
        graph[name] = edges
    return graph, raw


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def one_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest import cycle through the group's first module, to print."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{group} is not a cycle")


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    """The walk itself: imports inside functions and relative ones resolve to modules."""
    graph, raw = import_graph()
    assert "kvmlite.pagemap.stream" in graph["kvmlite.tools.pagemap"]   # inside pagemap_command
    assert "kvmlite.control.arraycodec" in graph["kvmlite.control.monitor"]
    assert "kvmlite.migration.wire" in graph["kvmlite.pagemap.stream"]
    assert "kvmlite.migration" in graph["kvmlite.pagemap.stream"]     # its package runs first
    assert "argparse" in raw["kvmlite.cli"]
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(cyclic) == [{"a", "b", "c"}]
    assert one_cycle(cyclic, {"a", "b", "c"}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_kvmlite():
    """No module of kvmlite/ imports itself through others (docs/architecture.md)."""
    graph, _ = import_graph()
    groups = [frozenset(g) for g in strongly_connected(graph)]
    shown = [f"{' -> '.join(one_cycle(graph, g))} (all of {', '.join(sorted(g))} import each other)"
             for g in groups]
    assert not shown, "import cycles:\n  " + "\n  ".join(shown)


def test_nothing_below_cli_sees_argparse_or_the_cli():
    """Only the command lines parse arguments; nothing below them imports one."""
    graph, raw = import_graph()
    tops = CLI_MODULES | ENTRY_POINTS
    bad = []
    for name in graph:
        if name in tops:
            continue
        if "argparse" in raw[name]:
            bad.append(f"{name} imports argparse")
        bad += [f"{name} imports {t}" for t in sorted(graph[name] & tops)]
    assert not bad, "below the command lines:\n  " + "\n  ".join(bad)
