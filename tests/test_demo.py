"""`make demo`'s fallback path (no world weights): apply, generate, export, compare, report."""

import json

import pytest

from apl_adapter.demo import TINY_PROMPTS, run_tiny_demo, write_report


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
