"""The package's module graph: no import circle between its modules.

Every import a module makes, at the top or inside a function (a deferred import hides a circle
at import time without removing it), read with ``ast`` from the source: an edge from the module
to each package module it names (``from . import x`` names the submodule x when there is one,
else the package's ``__init__``). The graph must have no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import gptoss_kernels

PKG_DIR = pathlib.Path(gptoss_kernels.__file__).resolve().parent
PKG = PKG_DIR.name


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """module name -> (source file, is a package); compiled modules (_C, _hostsim) have no source."""
    mods = {}
    for p in PKG_DIR.rglob("*.py"):
        parts = list(p.relative_to(PKG_DIR.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _bound_in(init: pathlib.Path) -> set[str]:
    """Names a package's ``__init__`` binds itself at its top level (defs, classes, assignments,
    imported names)."""
    names: set[str] = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _is_module(name: str, mods: dict) -> bool:
    """``from pkg import x`` imports the submodule pkg.x: one with source, or one the package does
    not bind itself (compiled or generated at install: _C, _hostsim, _build_info)."""
    if name in mods:
        return True
    parent, _, leaf = name.rpartition(".")
    return parent in mods and mods[parent][1] and leaf not in _bound_in(mods[parent][0])


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (with source; compiled ones import nothing of ours)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: (None if is_pkg else -1)]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == PKG:
                    target = node.module
                else:
                    continue
                for a in node.names:
                    full = f"{target}.{a.name}"
                    edges.add(full if _is_module(full, mods) else target)
        graph[mod] = {e for e in edges if e in mods and e != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_sees_the_imports():
    """The walk finds what the modules import (else an empty graph would pass)."""
    g = import_graph()
    assert {"gptoss_kernels.model", "gptoss_kernels.loader", "gptoss_kernels.generation",
            "gptoss_kernels.sampling", "gptoss_kernels.memory", "gptoss_kernels.weights"} <= set(g)
    assert "gptoss_kernels.generation" in g["gptoss_kernels.model"]
    assert "gptoss_kernels.loader" in g["gptoss_kernels.model"]
    assert "gptoss_kernels.weights" in g["gptoss_kernels.loader"]
    assert "gptoss_kernels.ops" in g["gptoss_kernels.loader"]            # deferred, inside load_checkpoint
    assert "gptoss_kernels" not in g["gptoss_kernels._lib"]    # `from . import _C, _build_info`: modules


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_model_rooms_import_downwards():
    """loader, memory, sampling, weights and generation never import the model; the model's
    neighbours import nothing of generation or the CLI."""
    g = import_graph()
    for mod in ("loader", "memory", "sampling", "weights", "generation", "layer_ops", "config"):
        assert "gptoss_kernels.model" not in g[f"gptoss_kernels.{mod}"], mod
    for mod in ("memory", "sampling", "weights", "layer_ops", "config"):
        assert "gptoss_kernels.generation" not in g[f"gptoss_kernels.{mod}"], mod
