"""Import rules over the whole `chips_core` and `app` trees, read with `ast` (nothing is imported):

1. no import cycle among first-party modules, counting every import (module level, function level and
   under `if TYPE_CHECKING:`), and
2. no module reads another module's private (`_name`) names: neither `from X import _name` nor
   `X._name` on a name bound to a first-party module.

Package `__init__` modules are nodes of their own (`chips_core.scoring` is `chips_core/scoring/__init__.py`).
`chips_core.scoring.cache`, the scoring cache format, must reach no torch at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ("chips_core", "app")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py file of the first-party trees."""
    out = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute name a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = _package(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The first-party module that `import name` loads last (the longest known prefix), if any."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


class _Scan(ast.NodeVisitor):
    """Imports (edges) and private-name accesses of one module."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.edges: set[str] = set()
        self.bound: dict[str, str] = {}  # local name → first-party module it is bound to
        self.private: list[str] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _owner(alias.name)
            if target is None:
                continue
            self.edges.add(target)
            if alias.asname:
                self.bound[alias.asname] = target
            else:  # `import a.b.c` binds `a`
                top = alias.name.split(".")[0]
                if top in MODULES:
                    self.bound[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(self.module, node)
        owner = _owner(base)
        if owner is None:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:  # `from pkg import module`
                self.edges.add(sub)
                self.bound[alias.asname or alias.name] = sub
                continue
            self.edges.add(owner)
            if _is_private(alias.name) and owner != self.module:
                self.private.append(f"line {node.lineno}: from {base} import {alias.name}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = []
        cur: ast.expr = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in self.bound:
            # resolve `pkg.sub.name` through submodules, then check the first non-module attribute
            mod = self.bound[cur.id]
            for attr in reversed(chain):
                if f"{mod}.{attr}" in MODULES:
                    mod = f"{mod}.{attr}"
                    continue
                if _is_private(attr) and mod != self.module:
                    self.private.append(f"line {node.lineno}: {mod}.{attr}")
                break
            return  # the chain is handled whole
        self.generic_visit(node)


def _defined(tree: ast.Module) -> set[str]:
    """Every name a module defines anywhere: functions, classes, assigned names and attributes, arguments."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return out


def _top_private(tree: ast.Module) -> set[str]:
    """The private names a module defines at its top level."""
    out = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {x for x in out if _is_private(x)}


TREES_AST = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in MODULES.items()}


def _scan_all() -> dict[str, _Scan]:
    scans = {}
    for module in MODULES:
        scan = _Scan(module)
        tree = TREES_AST[module]
        # imports first (names are bound wherever the import sits), then attribute accesses
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                scan.visit_Import(node)
            elif isinstance(node, ast.ImportFrom):
                scan.visit_ImportFrom(node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                scan.visit_Attribute(node)
        # `obj._name` on anything (e.g. a module kept in `self.mod`) where `_name` is a top-level private
        # name of a first-party module this one imports, and this module defines no `_name` of its own
        own = _defined(tree)
        theirs = {x: m for m in scan.edges if m != module for x in _top_private(TREES_AST[m])}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in theirs and node.attr not in own:
                scan.private.append(f"line {node.lineno}: {theirs[node.attr]}.{node.attr}")
        scan.private = sorted(set(scan.private))
        scan.edges.discard(module)
        scans[module] = scan
    return scans


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


SCANS = _scan_all()


def test_the_scan_sees_the_trees():
    assert "chips_core.scoring.ranking" in MODULES and "app.main" in MODULES
    assert "chips_core.scoring.endpoint" in SCANS["chips_core.scoring.ranking"].edges


def _graph() -> dict[str, set[str]]:
    return {m: set(s.edges) for m, s in SCANS.items()}


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append("; ".join(f"{m} → {', '.join(sorted(graph[m] & members))}" for m in comp))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_no_private_names_across_modules():
    found = [f"{m}: {p}" for m, s in sorted(SCANS.items()) for p in s.private]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_cache_format_is_torch_free():
    """The scoring cache's layout and reader import no torch, at any level."""
    scan = SCANS["chips_core.scoring.cache"]
    tree = ast.parse(MODULES["chips_core.scoring.cache"].read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names

    graph = _graph()

    def reach(m: str, seen: set[str]) -> set[str]:
        for e in graph[m]:
            if e not in seen:
                seen.add(e)
                reach(e, seen)
        return seen

    for m in reach(scan.module, set()):
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in top, f"chips_core.scoring.cache reaches {m}, which imports torch"


def test_the_top_level_verbs_resolve_and_stay_lazy():
    """`chips_core.<verb>` reaches each stage's public function; importing chips_core loads no stage."""
    import subprocess
    import sys

    code = (
        "import sys, chips_core\n"
        "assert not [m for m in sys.modules if m.startswith('chips_core.')], sorted(sys.modules)\n"
        "assert 'torch' not in sys.modules\n"
        "for name in chips_core.__all__:\n"
        "    obj = getattr(chips_core, name)\n"
        "    assert obj.__name__ == name, (name, obj)\n"
        "    assert not obj.__module__.split('.')[-1].startswith('_'), name\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
