"""What every apl-* command shares: --version, a quiet stderr unless -v, --threads, settings undone afterwards."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
import warnings

import pytest
import torch

from apl_adapter import __version__
from apl_adapter.console import HIDDEN_LOGGERS, command_settings

COMMANDS = {
    "apl-adapter": "apl_adapter.cli",
    "apl-train": "apl_adapter.training.cli",
    "apl-bench": "apl_adapter.bench.cli",
    "apl-eval": "apl_adapter.evaluation.cli",
    "apl-world": "apl_adapter.world.cli",
    "apl-demo": "apl_adapter.demo.cli",
    "apl-export": "apl_export.cli",
}


def _console(command: str, *args: str) -> subprocess.CompletedProcess:
    """Run a command the way its console script does (``apl_adapter.console``), in a fresh interpreter."""
    launcher = command.replace("-", "_")
    code = f"import sys; from apl_adapter import console; sys.argv = {[command, *args]!r}; "
    code += f"sys.exit(console.{launcher}())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_version(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(COMMANDS[command]).main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{command} {__version__} (apl-adapter)"


def test_pyproject_scripts_start_in_the_console_module():
    """The console scripts must be the quieting launchers, or the import-time notices come back."""
    from pathlib import Path

    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"apl_adapter.console:{name.replace('-', '_')}" for name in COMMANDS}


def test_a_command_prints_nothing_on_stderr_unless_verbose():
    quiet = _console("apl-world", "info")
    assert quiet.returncode == 0, quiet.stderr
    assert "seen (" in quiet.stdout
    assert quiet.stderr == ""
    if importlib.util.find_spec("torchvision") is None:  # the notice transformers prints without torchvision
        loud = _console("apl-world", "info", "-v")
        assert loud.returncode == 0 and "requires torchvision" in loud.stderr


def test_errors_still_reach_stderr_when_quiet(tmp_path):
    result = _console("apl-adapter", "inspect", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.startswith("apl-adapter: error:") and "Traceback" not in result.stderr


def test_command_settings_hide_library_noise_and_undo_everything():
    before_threads = torch.get_num_threads()
    levels = [logging.getLogger(name).level for name in HIDDEN_LOGGERS]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with command_settings(verbose=False, threads=1, hidden=(DeprecationWarning,)):
            assert torch.get_num_threads() == 1
            assert all(logging.getLogger(name).level == logging.ERROR for name in HIDDEN_LOGGERS)
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("a hidden category", DeprecationWarning, stacklevel=1)
            warnings.warn("our own warning stays visible", UserWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["our own warning stays visible"]
        with command_settings(verbose=True):
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        assert len(seen) == 2  # -v shows it
    assert torch.get_num_threads() == before_threads
    assert [logging.getLogger(name).level for name in HIDDEN_LOGGERS] == levels


def test_negative_threads_is_a_clean_error(tmp_path, capsys):
    from apl_adapter.bench.cli import main

    code = main(["--adapter", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "-1"])
    assert code == 2 and "--threads must be >= 0" in capsys.readouterr().err


def test_progress_counts_images_not_batches(capsys):
    from apl_adapter.progress import batches

    assert [part.stop - part.start for part in batches(5, 2, "demo")] == [2, 2, 1]
    err = capsys.readouterr().err
    assert "5/5" in err and "image" in err and "3/3" not in err  # 5 images, not 3 batches


def test_world_sample_shows_its_progress_in_images(tmp_path):
    result = _console("apl-world", "sample", "--prompt", "a red star on white", "--num", "3", "--steps", "2",
                      "--out", str(tmp_path / "grid.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sample" in result.stderr and "3/3" in result.stderr and "requires torchvision" not in result.stderr
    assert "Loading pipeline components" not in result.stderr  # diffusers' loading bar, hidden unless -v
    assert (tmp_path / "grid.png").is_file()
