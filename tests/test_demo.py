"""`make demo` (apl-demo): its command line, and the fallback path without world weights (apply, generate, export,
compare, report)."""

import json

import pytest

from apl_adapter.demo.cli import main
from apl_adapter.demo.recipe import DEMO_BATCH_SIZE, DEMO_PER_NAME, DEMO_PREFIX_LEN, DEMO_STEPS
from apl_adapter.demo.report import write_report
from apl_adapter.demo.run import TINY_PROMPTS, run_tiny_demo


def test_help_teaches_the_stages_and_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "apl-export" in text and "--images-from" in text and "tiny random pipeline" in text
    for option, default in (("--steps", DEMO_STEPS), ("--batch-size", DEMO_BATCH_SIZE),
                            ("--prefix-len", DEMO_PREFIX_LEN), ("--per-name", DEMO_PER_NAME)):  # fmt: skip
        assert f"{option} " in text and f"({default})" in text, option


def test_bad_settings_are_refused_before_any_work(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_demo_writes_a_readable_report(tmp_path):
    summary = run_tiny_demo(tmp_path, seed=0)
    report = write_report(tmp_path, summary).read_text()
    assert [c["prompt"] for c in summary["tiny_changes"]] == TINY_PROMPTS
    assert all(c["mean_abs_change"] > 0 for c in summary["tiny_changes"]), "the prefix must change the images"
    assert max(summary["export"]["max_abs_pixel_diff"]) < 1e-4, "ONNX Runtime must reproduce PyTorch"
    for name in ("grid.png", "export_grid.png", "report.json", "run/adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert "| a photo of Ann Lee |" in report and "ONNX Runtime" in report
    assert json.loads((tmp_path / "report.json").read_text())["model"].startswith("tiny random pipeline")
