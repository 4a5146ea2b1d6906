"""Find import cycles between our modules, counting imports inside functions too.

A function-level import hides a cycle from Python (the import runs late, after both modules are loaded) but not from
the reader: two modules that need each other are one idea split in two. So every ``import`` / ``from ... import``
anywhere in a module is an edge here, ``TYPE_CHECKING`` blocks included. A package's ``__init__`` importing its own
submodules is how it exposes them, not a cycle, so those edges are left out.

    python tools/check_import_cycles.py                    # apl_adapter and export
    python tools/check_import_cycles.py apl_adapter        # one package

Prints each cycle (a strongly connected component of the import graph) and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = ("apl_adapter", "export")

Graph = dict[str, set[str]]


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` (folders under ``root``) by dotted name; a package by its own name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement may load: the module, and for ``from`` each name as a submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: climb from this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, node.module] if node.module else package)
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(modules: dict[str, Path]) -> Graph:
    """Module -> the modules of ``modules`` it imports anywhere in its body (own submodules left out)."""
    graph: Graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported_names(module, is_package, node))
        graph[module] = {name for name in edges if name in modules and not name.startswith(module + ".")}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                lowlink[module] = min(lowlink[module], lowlink[imported])
            elif imported in on_stack:
                lowlink[module] = min(lowlink[module], index[imported])
        if lowlink[module] == index[module]:  # module is the root of a component: pop it
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def find_cycles(root: Path, packages: Iterable[str]) -> list[list[str]]:
    """The import cycles among the modules of ``packages`` under ``root``."""
    return cycles(import_graph(module_files(root, packages)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES), help="package folders under the root")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder holding the packages (default: the repo)")
    args = parser.parse_args(argv)
    found = find_cycles(args.root, args.packages)
    for component in found:
        print("import cycle: " + " <-> ".join(component))
    if not found:
        print(f"no import cycles in {', '.join(args.packages)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
