"""The house's boundaries (docs/design.md), read statically from every `import` in kernl/,
lazy ones inside functions included: no two modules import each other, even through others,
and each package imports only the packages below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNL = Path(__file__).resolve().parents[2] / "kernl"

# what each package may import from kernl besides itself (kernl._version: the version string)
ALLOWED = {
    "kernels": set(),
    "artifacts": set(),
    "runtime": {"artifacts", "kernels"},
    "serving": {"artifacts", "runtime", "_version"},
    "compiler": {"artifacts", "kernels", "runtime", "serving", "_version"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in KERNL.rglob("*.py"):
        parts = path.relative_to(KERNL.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kernl modules `name` imports (`from pkg import sub` counts as importing pkg.sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_is_read(graph):
    # a reader that found nothing would pass every test below
    assert len(graph) > 80
    assert "kernl.artifacts.schema" in graph["kernl.runtime.model"]
    assert "kernl.runtime.generation.seq2seq" in graph["kernl.runtime.generation.speech"]
    assert "kernl.runtime.generation.speech" in graph["kernl.runtime.generation"]  # lazy import


def test_no_module_imports_itself_back(graph):
    cycles = [c for name in sorted(graph) if (c := _cycle_through(name, graph))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_is_below_them(graph, package):
    def package_of(module: str) -> str:
        return module.split(".")[1] if module.count(".") else ""

    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if package_of(name) == package
        for target in targets
        if package_of(target) not in ALLOWED[package] | {package}
    )
    assert not wrong, wrong


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through("a", graph) in (["a", "b", "c", "a"],)
    assert _cycle_through("d", graph) is None
