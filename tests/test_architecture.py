"""The package's modules import one another one way: the import graph has no cycle.

Every import counts, at the top of a module and inside its functions (those only keep torch and
diffusers out of `sdtune --help`; they are still dependencies): `from .x import y`, `from . import x`,
`from .. import x`, `import sdtune.x`, `from sdtune.x import y`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sdtune"


def module_files() -> dict[str, Path]:
    """`sdtune`, `sdtune.adapter`, `sdtune.methods`, `sdtune.methods.lowrank`, … → their files."""
    files = {}
    for path in sorted([*PACKAGE.glob("*.py"), *PACKAGE.glob("methods/*.py")]):
        parts = ["sdtune", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that the module `name` (file `path`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from . import x`: the module x; `from .x import y`: x (or x.y, a module)
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, …, a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "sdtune.methods.atoms" in graph and "sdtune.methods" in graph and "sdtune" in graph
    assert "sdtune.errors" in graph["sdtune.methods.base"]  # from ..errors import (top level)
    assert {"sdtune.models", "sdtune.fileio"} <= graph["sdtune.methods.atoms"]  # from ..models import (in a function)
    assert "sdtune.methods" in graph["sdtune.training"]  # from . import methods (in a function)
    assert "sdtune.adapter" in graph["sdtune"]  # the package's own lazy imports
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_methods_import_no_file_format():
    """Methods know their maths and their views in other formats, not the modules that read and write files."""
    graph = import_graph()
    formats = {"sdtune.adapter", "sdtune.kohya", "sdtune.export", "sdtune.merging", "sdtune.safetensors_checks"}
    for name, targets in graph.items():
        if name.startswith("sdtune.methods"):
            assert not targets & formats, (name, targets & formats)


def test_format_modules_test_no_method_name():
    """The readers and writers of files ask a method what it offers instead of testing its name."""
    import re

    from sdtune import methods

    names = "|".join(methods.available())
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)""")
    for module in ("adapter", "kohya", "export", "merging", "safetensors_checks"):
        text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        assert not pattern.search(text), (module, pattern.search(text).group(0))
