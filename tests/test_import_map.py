"""The package map of docs/DESIGN.md holds: every import in speed_ray/ (module-level or inside a function) runs
down the table, never up it, and no modules import each other in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "speed_ray"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the speed_ray modules it imports (the longest known module prefix of each name)."""
    def known(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    out: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for blk in ast.walk(tree) if isinstance(blk, ast.If) and _is_type_checking(blk.test)
                       for stmt in blk.body for n in ast.walk(stmt)}   # `if TYPE_CHECKING:` runs no import
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.split(".")[0] == "speed_ray"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "speed_ray":
                deps |= {known(f"{node.module}.{a.name}") for a in node.names}
        out[mod] = deps - {mod}
    return out


def _map() -> tuple[dict[str, str], dict[str, set[str]], set[str]]:
    """From DESIGN.md's table: unit -> layer, layer-or-unit -> what it may import, and the domain packages."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    section = text.split("## The package map", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in section.splitlines()
            if ln.startswith("| ") and not ln.startswith("| layer")]
    layer_of, may, domain = {}, {}, set()
    for layer, units, _job, allowed in rows:
        names = re.findall(r"`([a-z0-9_]+)`", units)
        if layer == "sections":
            names = ["sections"]
        if layer == "commands":
            names = names + ["commands"]
        allow = set(re.findall(r"`([a-z0-9_]+)`", allowed)) | {w for w in ("core", "sections", "anything")
                                                             if re.search(rf"\b{w}\b", allowed)}
        for n in names:
            layer_of[n] = layer
            may[n] = allow
        if layer == "domain":
            domain |= set(names)
    return layer_of, may, domain


def _unit(mod: str, domain: set[str]) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "core"                      # the speed_ray package itself
    if len(parts) >= 3 and parts[2] == "cli":
        return "commands"
    if len(parts) >= 3 and parts[2] == "config" and parts[1] in domain | {"studies"}:
        return "sections"
    return parts[1]


def test_every_import_runs_down_the_package_map():
    mods = _modules()
    layer_of, may, domain = _map()
    units = {_unit(m, domain) for m in mods}
    assert units <= set(layer_of) | {"core"}, f"packages missing from DESIGN.md's map: {units - set(layer_of) - {'core'}}"
    core = {u for u, layer in layer_of.items() if layer == "core"}
    bad = []
    for mod, deps in sorted(_imports(mods).items()):
        src = _unit(mod, domain)
        allowed = may[src] if src in may else set()
        for dep in sorted(deps):
            dst = _unit(dep, domain)
            if dst == src or "anything" in allowed or dst in allowed:
                continue
            if dst in core and "core" in allowed:
                continue
            if dst == "sections" and "sections" in allowed:
                continue
            bad.append(f"{mod} -> {dep} ({src} may not import {dst})")
    assert not bad, "imports against docs/DESIGN.md's package map:\n" + "\n".join(bad)


def test_no_module_imports_itself_through_a_cycle():
    graph = _imports(_modules())
    index, low, on, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):   # Tarjan's strongly connected components (recursion depth: the module count)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_map_rejects_an_arrow_up(tmp_path):
    """The checker itself: a stage module importing the orchestrator is reported."""
    layer_of, may, domain = _map()
    assert "pipeline" not in may["embedder"] and "run_config" not in may["evaluate"]
    assert _unit("speed_ray.embedder.cli", domain) == "commands"
    assert _unit("speed_ray.teacher.config", domain) == "sections"
