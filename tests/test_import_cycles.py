"""No import cycles among our modules, function-level imports included (tools/check_import_cycles.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_import_cycles", ROOT / "tools" / "check_import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


def test_the_packages_have_no_import_cycles():
    assert checker.find_cycles(ROOT, ["apl_adapter", "export"]) == []


def test_the_peft_type_and_errors_are_leaves():
    """The modules everything else builds on import nothing of ours but errors (so they can never join a cycle)."""
    graph = checker.import_graph(checker.module_files(ROOT, ["apl_adapter"]))
    assert graph["apl_adapter.errors"] == set()
    assert graph["apl_adapter.tuners.apl.constants"] == set()
    assert graph["apl_adapter.tuners.apl.peft_type"] == {"apl_adapter.errors"}
    export_graph = checker.import_graph(checker.module_files(ROOT, ["export"]))
    assert export_graph["export.tensorrt_loader"] == {"export.errors"}  # TensorRT is loaded in one leaf module


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path, capsys):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from . import a\n",
            "pkg/a.py": "from .b import helper\n",
            "pkg/b.py": "def helper():\n    from .a import thing\n    return thing\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import x\n",
        },
    )
    assert checker.find_cycles(tmp_path, ["pkg"]) == [["pkg.a", "pkg.b"]]
    assert checker.main(["--root", str(tmp_path), "pkg"]) == 1
    assert "import cycle: pkg.a <-> pkg.b" in capsys.readouterr().out


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "from . import b\nx = 1\n", "pkg/b.py": ""})
    assert checker.find_cycles(tmp_path, ["pkg"]) == []
    assert checker.main(["--root", str(tmp_path), "pkg"]) == 0
