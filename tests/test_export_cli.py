"""apl-export's command line: help, and bad input refused with a clear error and nothing left behind."""

from __future__ import annotations

import pytest
from apl_export.cli import main
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sources")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    save_adapter(get_peft_model(tiny_clip_text_model(hidden_size=48), APLConfig()), root / "adapter-48")
    save_adapter(get_peft_model(tiny_clip_text_model(hidden_size=32), APLConfig()), root / "adapter-32")
    return root


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".export-" in p.name or ".old-" in p.name)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_help_teaches_stages_and_modes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--adapter", "--prefix-mode", "baked", "input", "--trt", "--triton", "validate", "examples"):
        assert word in text


def test_missing_adapter(sources, tmp_path, capsys):
    code, err = _run(capsys, sources / "sd", "--adapter", tmp_path / "no-adapter", "--out", tmp_path / "out")
    assert code == 2
    assert "No adapter folder" in err and "save_pretrained" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_adapter_width_mismatch(sources, tmp_path, capsys):
    code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-48", "--out", tmp_path / "out")
    assert code == 2
    assert "width 48" in err and "width 32" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_out_needs_overwrite(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-48", "--out", out)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine" and _leftovers(tmp_path) == []


def test_unwritable_out(sources, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-48", "--out", blocker / "out")
    assert code == 2 and "Cannot write" in err and "writable --out" in err
    assert blocker.is_file()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--batch", "4:1:2", "min <= opt <= max"), ("--height", "18", "multiples of 4"), ("--batch", "x", "MIN:OPT")],
)
def test_bad_ranges(sources, tmp_path, capsys, flag, value, message):
    adapter = sources / "adapter-32"  # fits: the range is what is wrong
    code, err = _run(capsys, sources / "sd", "--adapter", adapter, "--out", tmp_path / "out", flag, value)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_not_a_pipeline_folder(sources, tmp_path, capsys):
    code, err = _run(capsys, tmp_path, "--adapter", sources / "adapter-48", "--out", tmp_path / "out")
    assert code == 2 and "model_index.json" in err


def test_out_that_is_or_contains_an_input_is_refused(sources, capsys):
    """--overwrite replaces --out; an --out holding the model or the adapter would delete the user's inputs."""
    before = sorted(p.relative_to(sources) for p in sources.rglob("*"))
    for out in (sources / "sd", sources / "adapter-32", sources):
        code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-32", "--out", out, "--overwrite")
        assert code == 2 and "would replace it" in err, err
    assert sorted(p.relative_to(sources) for p in sources.rglob("*")) == before


def test_validation_that_cannot_fit_in_memory_fails_before_exporting(sources, tmp_path, capsys):
    # the tiny pipeline's VAE factor is 2: at 4096 px the UNet's first attention level has 2048^2 positions
    code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-32", "--out", tmp_path / "out",
                     "--height", "4096", "--width", "4096")  # fmt: skip
    assert code == 2 and "GiB" in err and "native size is 16" in err, err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_export_defaults_follow_the_model_and_the_umask(sources, tmp_path, capsys, caplog):
    """Native size by default (16 px here, not 512), files readable per the umask, a killed run's staging cleaned."""
    import json
    import os

    stale = tmp_path / ".out.export-999999999-abcd"  # no such process: a run that was killed mid-export
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "model.onnx").write_bytes(b"\0" * 1024)
    old_mask = os.umask(0o022)
    try:
        code, err = _run(capsys, sources / "sd", "--adapter", sources / "adapter-32", "--out", tmp_path / "out",
                         "--exporter", "torchscript", "--batch", "1")  # fmt: skip
    finally:
        os.umask(old_mask)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "apl_export.json").read_text())
    assert manifest["ranges"]["height"] == manifest["ranges"]["width"] == [16, 16, 16]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "unet" / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert not stale.exists() and _leftovers(tmp_path) == []
    assert any(str(stale) in r.getMessage() and "killed" in r.getMessage() for r in caplog.records)
