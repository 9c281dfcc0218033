"""The import graph of ``qwen_core``: no cycles, and no private (``_name``) imports across modules.

Read from the source with ``ast`` (nothing is imported), counting every import statement: module level,
inside functions (lazy imports), under ``TYPE_CHECKING``, absolute and relative. A lazy import hides a cycle
from Python, not from the design: both modules still need each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "qwen_core"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Cycles outside the download wing that are known and owned by other work; (a, b) sorted. None today.
KNOWN_CYCLES: set[tuple[str, ...]] = set()
# Private imports outside the download wing, known and owned by the core rebuild's other items (issue 9).
KNOWN_PRIVATE = {"qwen_core.loading imports qwen_core.load_policy._reset_sdpa_flag"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """(imported qwen_core module, names taken from it) for every import statement in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # `from pkg import submodule`
                    yield f"{source}.{alias.name}", []
                elif source in known:
                    yield source, [alias.name]


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _ in imports(name, path, known):
            if target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


class TestImportGraph:
    def test_the_walker_sees_relative_lazy_and_type_checking_imports(self, tmp_path: Path) -> None:
        pkg = tmp_path / "pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("from . import a\n")
        (pkg / "a.py").write_text("def f():\n    from .b import _x\n")
        (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n")
        known = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
        found = {name: list(imports(name, path, known)) for name, path in known.items()}
        assert found == {"pkg": [("pkg.a", [])], "pkg.a": [("pkg.b", ["_x"])], "pkg.b": [("pkg.a", ["y"])]}
        assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
        assert cycles({"a": {"b"}, "b": set()}) == []
        graph_now = graph()
        assert "qwen_core.download.types" in graph_now["qwen_core.download.repo"]
        assert "qwen_core.errors" in graph_now["qwen_core.download.types"]

    def test_no_import_cycles_in_qwen_core(self) -> None:
        found = [c for c in cycles(graph()) if tuple(c) not in KNOWN_CYCLES]
        assert not found, f"import cycles in {PACKAGE}: {found}"

    def test_no_private_names_imported_across_modules(self) -> None:
        known = modules()
        bad = [f"{name} imports {target}.{n}" for name, path in known.items()
               for target, names in imports(name, path, known) for n in names
               if n.startswith("_") and not n.startswith("__") and target != name]
        assert not set(bad) - KNOWN_PRIVATE, sorted(set(bad) - KNOWN_PRIVATE)

    def test_the_download_types_module_is_a_leaf_of_its_package(self) -> None:
        inside = {t for t in graph()["qwen_core.download.types"] if t.startswith("qwen_core.download")}
        assert not inside, inside

    @pytest.mark.parametrize("old", ["download", "download_cli", "download_http", "download_plan", "download_verify",
                                     "download_xet", "download_cleanup", "file_lock", "endpoint_policy"])
    def test_the_flat_download_modules_are_gone(self, old: str) -> None:
        assert not (ROOT / f"{old}.py").exists()
