"""Loading TensorRT: the error without a builder, the TensorRT-RTX loader path, and apl_export's import graph."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
from apl_export import tensorrt_loader
from apl_export.errors import TensorRTUnavailableError

EXPORT_DIR = Path(tensorrt_loader.__file__).parent
HAS_RTX_LIBS = importlib.util.find_spec("tensorrt_rtx_libs") is not None


def test_missing_builder_names_the_fix(monkeypatch):
    monkeypatch.setattr(tensorrt_loader, "BUILDER_MODULES", ("apl_no_such_tensorrt_module",))
    with pytest.raises(TensorRTUnavailableError, match=r"pip install 'apl-adapter\[trt\]'"):
        tensorrt_loader.load_tensorrt(prefer="apl_no_such_preferred_module")


@pytest.mark.skipif(not HAS_RTX_LIBS, reason="no TensorRT-RTX wheel installed (pip install 'apl-adapter[trt]')")
def test_plugin_process_env_puts_the_unversioned_library_first():
    env = tensorrt_loader.plugin_process_env({"LD_LIBRARY_PATH": "/opt/elsewhere"})
    first, rest = env["LD_LIBRARY_PATH"].split(os.pathsep, 1)
    link = Path(first) / "libtensorrt_rtx.so"
    assert rest == "/opt/elsewhere"
    assert link.is_symlink() and link.resolve().name == "libtensorrt_rtx.so.1" and link.resolve().exists()


def _imports_of_ours(path: Path) -> set[str]:
    """``apl_export`` modules a file imports, at any depth (function-level imports count), as dotted names."""
    package = ("apl_export", *path.relative_to(EXPORT_DIR).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                found.add(f"{base}.{node.module}")
            else:  # from . import engines
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found.update(n for n in names if n and n.split(".")[0] == "apl_export")
    return found


def test_tensorrt_loader_is_a_leaf():
    assert _imports_of_ours(EXPORT_DIR / "tensorrt_loader.py") == {"apl_export.errors"}


def test_trt_plugin_does_not_import_the_engine_builder():
    """engines -> trt_plugin is the one direction: the plugin loads TensorRT through the leaf loader."""
    plugin_files = [EXPORT_DIR / "trt_plugin.py", *EXPORT_DIR.glob("trt_plugin/*.py")]
    assert any(p.exists() for p in plugin_files)
    for path in plugin_files:
        if path.exists():
            assert "apl_export.engines" not in _imports_of_ours(path), path
