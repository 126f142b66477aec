"""Layering: no two modules of the package import each other (directly or round a loop,
imports inside functions and under TYPE_CHECKING included), and merge methods are found by
scanning ``methods/``, not from a hand-kept list."""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit_math

PKG = Path(mergekit_math.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(up + ([target] if target else []))
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_no_import_cycles():
    graph = _import_graph()
    loops = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if _reaches(graph, b, a)
    )
    assert loops == []


def test_method_modules_are_found_by_scanning_the_package():
    from mergekit_math.methods import all_methods, base

    on_disk = {p.stem for p in (PKG / "methods").glob("*.py")}
    on_disk -= {"__init__", "base", "listing", *base.KERNEL_MODULES}
    assert set(base._method_modules()) == on_disk
    registered_from = {m.merge.__module__.rsplit(".", 1)[1] for m in all_methods()}
    assert registered_from == on_disk
