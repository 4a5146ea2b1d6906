"""experiments/: research scripts that run as files, are documented, and stay out of the library."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py") if p.name != "__init__.py")


def test_there_are_experiments():
    assert SCRIPTS == [
        "eps_gap_diagnostics.py", "late_names.py", "probe_push_target.py", "recognizer_gate.py", "step_bands.py",
        "text_name_share.py",
    ]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_as_a_file_and_teaches(script):
    # run the way the docs say, from the repository root; PYTHONPATH makes this checkout's apl_adapter the one imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, f"experiments/{script}", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    usage = done.stdout.splitlines()[0]
    assert usage.startswith("usage:") and script in usage, done.stdout


def test_readme_names_every_script_and_a_dated_file_for_each():
    readme = (ROOT / "experiments" / "README.md").read_text()
    for script in SCRIPTS:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{script}` |")), None)
        assert row is not None, f"experiments/README.md has no row for {script}"
        for dated in re.findall(r"docs/experiments/([\w.-]+\.md)", row):
            assert (ROOT / "docs" / "experiments" / dated).is_file(), dated
        assert "docs/experiments/" in row, f"{script}: which dated file used it?"


def test_the_library_does_not_import_experiments():
    for folder in ("apl_adapter", "export"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"^\s*(from|import) experiments\b", path.read_text(), re.M), path


def test_the_shipped_recognizer_names_a_person_less_when_an_attribute_changes():
    """The gate the bench's "fall when kept" measures around (docs/experiments/2026-12-04-recognizer-gate.md)."""
    from apl_adapter.world import WorldSpec
    from apl_adapter.world.recognizers import WorldIdentityRecognizer
    from experiments.recognizer_gate import gate_rates

    rates = gate_rates(WorldIdentityRecognizer.from_pretrained(), WorldSpec.from_seed(0), per_person=3, seed=7)
    assert rates["own"] >= 0.95  # fresh renders of the person are named (world card: 98.75%)
    assert rates["skin"] < 0.5 * rates["own"]  # a changed skin tone is mostly "a stranger" (7% at 10 renders)


def test_random_prefix_vectors_break_some_late_names_on_the_dreambooth_model(tmp_path):
    """Late names live only in the DreamBooth UNet's reading of the name's token states: even untrained random
    prefix vectors move those states enough to lose some (docs/experiments/2026-12-05-where-attributes-go.md)."""
    from experiments.late_names import late_faces, untrained_prefixes

    random_prefix = untrained_prefixes(tmp_path)["untrained, random (deep)"]
    counts = late_faces(random_prefix)
    assert counts["faces"] == 40 and counts["plain_named"] >= 32  # the DreamBooth model draws its late people (bar 80%)
    assert counts["named"] <= counts["plain_named"] - 5  # measured 40 -> 25 on v1, 33 -> 18 on the shipped world
    assert counts["named"] + counts["other_person"] + counts["stranger"] <= counts["faces"]
    assert counts["kept"] >= counts["named"] - 2  # a face still named keeps its attributes (the recognizer's gate)
