"""The layering ARCHITECTURE.md describes, checked: imports only go down, no import cycles.

Every import counts, including the ones inside functions (a lazy import that breaks a cycle
at run time is still a cycle in the design). A module may import modules of a lower level
and modules of its own package; nothing in ``layerfs`` imports ``snapshotter`` or ``bench``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# lowest first; a unit is a package (layerfs.union) or a top-level module (layerfs.errors)
LEVELS: list[set[str]] = [
    {"layerfs", "layerfs.errors", "layerfs.failpoint", "layerfs.text"},
    {"layerfs.digest", "layerfs.progress"},
    {"layerfs.linux"},
    {"layerfs.union"},
    {"layerfs.layer"},
    {"layerfs.image"},
    {"layerfs.store", "layerfs.mount"},
    {"layerfs.fuse"},
    {"layerfs.importer", "layerfs.exporter", "layerfs.containers", "layerfs.catalog", "layerfs.mounting",
     "layerfs.bundle", "layerfs.analysis", "layerfs.registry"},
    {"layerfs.tui"},
    {"layerfs.cli"},
    {"layerfs.__main__"},
    {"snapshotter"},
    {"bench"},
]
# the operations may use each other (no cycles: checked below), in this order
OPERATIONS = ["layerfs.importer", "layerfs.catalog", "layerfs.analysis", "layerfs.exporter",
              "layerfs.registry", "layerfs.containers", "layerfs.mounting", "layerfs.bundle"]


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("layerfs", "snapshotter", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            if "proto" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    assert len(out) > 50, f"found only {len(out)} modules under {ROOT}: wrong root?"
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _unit(module: str) -> str:
    for level in LEVELS:
        for unit in sorted(level, key=len, reverse=True):
            if module == unit or (unit != "layerfs" and module.startswith(unit + ".")):
                return unit
    raise AssertionError(f"{module} belongs to no level of the architecture: add it to LEVELS")


def _level(unit: str) -> int:
    return next(i for i, level in enumerate(LEVELS) if unit in level)


def test_imports_only_go_down() -> None:
    mods = _modules()
    known = set(mods)
    wrong = []
    for name, path in sorted(mods.items()):
        src = _unit(name)
        for target in sorted(_imports(name, path, known)):
            dst = _unit(target)
            if dst == src:
                continue
            if src in OPERATIONS and dst in OPERATIONS:
                if OPERATIONS.index(dst) < OPERATIONS.index(src):
                    continue
                wrong.append(f"{name} -> {target} (operations go down in the order {OPERATIONS})")
            elif _level(dst) >= _level(src):
                wrong.append(f"{name} -> {target} ({src} may not import {dst})")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    mods = _modules()
    known = set(mods)
    graph = {n: _imports(n, p, known) for n, p in mods.items()}
    # a package's __init__ importing its own submodules is its public face, not a cycle
    for n in graph:
        graph[n] = {t for t in graph[n] if not (t.startswith(n + ".") and mods[n].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_sql_only_in_the_store() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("layerfs.store"):
            continue
        text = path.read_text()
        for needle in (".execute(", ".executemany(", "sqlite3", "BEGIN IMMEDIATE", "meta.transaction"):
            if needle in text:
                offenders.append(f"{name}: {needle}")
    assert not offenders, "SQL outside layerfs/store:\n" + "\n".join(offenders)


def test_pyfuse3_only_in_the_fuse_package() -> None:
    mods = _modules()
    offenders = [n for n, p in mods.items() if not n.startswith("layerfs.fuse") and "pyfuse3" in
                 {a.name.split(".")[0] for node in ast.walk(ast.parse(p.read_text()))
                  if isinstance(node, ast.Import) for a in node.names} |
                 {(node.module or "").split(".")[0] for node in ast.walk(ast.parse(p.read_text()))
                  if isinstance(node, ast.ImportFrom)}]
    assert not offenders, f"pyfuse3 imported outside layerfs/fuse: {offenders}"


def test_ctypes_only_in_the_syscall_wing() -> None:
    offenders = [n for n, p in _modules().items()
                 if n.startswith("layerfs") and not n.startswith("layerfs.linux") and "ctypes" in p.read_text()]
    assert not offenders, f"ctypes used outside layerfs/linux: {offenders}"
