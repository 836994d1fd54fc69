"""The package's shape: no import cycles between its modules."""
from __future__ import annotations

import ast
from pathlib import Path

import scaletrain

PACKAGE_DIR = Path(scaletrain.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("scaletrain",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """scaletrain modules `path` imports, at any depth of its code (lazy imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            # `from . import x` of a submodule needs its package only as a namespace, already importing
            found.update(submodules if len(submodules) == len(node.names) else submodules | {base})
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module."""
    import networkx

    digraph = networkx.DiGraph([(module, imported) for module, imports in graph.items() for imported in imports])
    return sorted(sorted(c) for c in networkx.strongly_connected_components(digraph) if len(c) > 1)


def test_no_import_cycles():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    assert graph["scaletrain.trainer.trainer"], "the import graph was not read"  # the check can fail
    assert _cycles(graph) == []
