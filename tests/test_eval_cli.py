"""apl-eval end to end: a tiny real diffusers pipeline, a real adapter, real reference faces, real dlib.

A tiny random UNet draws no faces, so every identity number is the "no face" case: presence 0,
top-1 0, score 0 - the test checks they are reported as such, per identity, beside the quality
numbers, and that bad input gives a clear message, a non-zero exit and no half-written folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image, ImageEnhance, ImageOps

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is part of the eval extra")
pytest.importorskip("dlib", reason="dlib-bin is part of the eval extra")

from apl_adapter import APLConfig  # noqa: E402
from apl_adapter.evaluation.cli import build_parser, main  # noqa: E402
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline  # noqa: E402

from .test_metrics_quality import save_tiny_clip  # noqa: E402

SEEDS = ["0", "1"]
TEMPLATES = ["a photo of {name}", "a portrait of {name}, studio light"]
NEUTRAL = ["a red cube on a table"]  # 2 seeds = 2 images, the least FID needs


class _ChannelMeans(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny pipeline, an adapter made with the PEFT API, reference faces, prompts, tiny CLIP/FID weights."""

    root = tmp_path_factory.mktemp("eval")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=5)).save_pretrained(root / "adapter")

    refs = root / "refs" / "eileen"
    refs.mkdir(parents=True)
    astronaut = Image.fromarray(skimage_data.astronaut())
    astronaut.save(refs / "original.png")
    ImageOps.mirror(astronaut).save(refs / "flipped.jpg")
    astronaut.crop((60, 0, 400, 340)).save(refs / "crop.png")
    ImageEnhance.Brightness(astronaut).enhance(1.4).save(refs / "bright.png")
    (refs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    identities = {
        "identities": [
            {"name": "Eileen Collins", "references": "refs/eileen", "attributes": "a woman with short brown hair"},
            {"name": "Nobody Known", "references": "refs/nobody"},
        ]
    }
    (root / "ids.json").write_text(json.dumps(identities))
    (root / "prompts.txt").write_text("\n".join(["# templates", *TEMPLATES, "# no person", *NEUTRAL]) + "\n")
    torch.jit.script(_ChannelMeans()).save(str(root / "features.pt"))
    return root


def _args(root, out, *extra):
    return [
        "--base", str(root / "sd"), "--adapter", str(root / "adapter"), "--identities", str(root / "ids.json"),
        "--prompts", str(root / "prompts.txt"), "--out", str(out), "--seeds", ",".join(SEEDS), "--steps", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(inputs):
    out = inputs / "report"
    clip = save_tiny_clip(inputs / "clip")
    code = main(_args(inputs, out, "--clip-model", str(clip), "--fid-model", str(inputs / "features.pt")))
    return code, out


@pytest.mark.slow
def test_the_report_folder_is_complete(run, inputs):
    code, out = run
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.html", "grid.png", "images"}
    n_prompts = len(TEMPLATES) + len(NEUTRAL)
    for variant in ("base", "apl"):
        assert len(list((out / "images" / variant).glob("*.png"))) == n_prompts * len(SEEDS)
    with Image.open(out / "grid.png") as grid:
        assert grid.width == 2 * 160 and grid.height > n_prompts * 160
    assert not list(inputs.glob(".report.partial-*")), "the temporary folder must be gone"


@pytest.mark.slow
def test_identity_numbers_are_no_face_per_identity(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    identity = report["identity"]
    assert identity["recognizer"] == "dlib" and identity["identities"] == ["Eileen Collins"]
    for variant in ("base", "apl"):
        metrics = identity[variant]
        assert metrics["num_images"] == len(TEMPLATES) * len(SEEDS)
        assert metrics["face_presence_rate"] == 0.0 and metrics["top1_accuracy"] == 0.0
        assert metrics["same_person_rate"] == 0.0 and metrics["mean_distance"] is None
        row = metrics["per_identity"]["Eileen Collins"]
        assert row["n"] == len(TEMPLATES) * len(SEEDS)
        assert row["mean_score"] == row["max_score"] == row["face_presence_rate"] == 0.0
        assert set(metrics["per_identity"]) == {"Eileen Collins"}
    faces = [r["apl_face"] for r in report["images"] if r["identity"]]
    assert faces and all(not f["face_present"] and f["top1"] is None and f["distance"] is None for f in faces)
    markdown = (out / "report.md").read_text()
    assert "| face presence | 0.000 | 0.000 |" in markdown
    assert "| Eileen Collins | 4 | 0.000 | 0.000 |" in markdown
    assert "<table>" in (out / "report.html").read_text()


@pytest.mark.slow
def test_skipped_inputs_are_reported(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    skipped = "\n".join(report["skipped"])
    assert "corrupt.png: not a readable image" in skipped
    assert "'Nobody Known'" in skipped and "identity skipped" in skipped
    assert "Nobody Known" not in {r["identity"] for r in report["images"]}
    assert "corrupt.png" in (out / "report.md").read_text()
    gallery = report["identity"]["gallery"]["Eileen Collins"]
    assert gallery["num_references"] == 4 and 0 < gallery["max_within_distance"] < 0.6  # 4 usable photos, one person
    assert report["warnings"] == []


@pytest.mark.slow
def test_quality_numbers(run):
    _, out = run
    report = json.loads((out / "report.json").read_text())
    quality = report["quality"]
    assert quality["unchanged"]["num_pairs"] == len(NEUTRAL) * len(SEEDS)
    assert -1 <= quality["unchanged"]["mean_ssim"] <= 1
    clip = quality["clip_score"]
    for variant in ("base", "apl"):
        assert all(0 <= clip[variant][k] <= 100 for k in ("neutral", "identity", "identity_anonymous"))
    assert quality["fid"]["num_images"] == len(NEUTRAL) * len(SEEDS) and quality["fid"]["feature_dim"] == 6
    assert quality["fid"]["base_vs_apl"] >= 0 and "biased high" in quality["fid"]["note"]


@pytest.mark.slow
def test_base_images_are_the_plain_pipeline_with_the_same_seeds(run, inputs):
    """Base = the untouched pipeline (DDIM) with seed s; APL differs from it only by the prefix."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _, out = run
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["images"] if r["identity"] and r["seed"] == 1)
    pipe = StableDiffusionPipeline.from_pretrained(inputs / "sd", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(row["prompt"], num_inference_steps=2, guidance_scale=7.0, generator=torch.Generator().manual_seed(1))
    expected = np.asarray(image.images[0], dtype=np.int16)
    base = np.asarray(Image.open(out / row["base"]), dtype=np.int16)
    apl = np.asarray(Image.open(out / row["apl"]), dtype=np.int16)
    assert np.abs(base - expected).max() <= 1  # batched vs single generation may round one level apart
    assert np.abs(apl - expected).max() > 1, "the prefix must change an identity prompt's image"


def test_help_teaches_the_file_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("{name}", "--insightface-pack", "--clip-model", "--fid-model", "nothing is downloaded"):
        assert needle in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--base", "missing-sd"), "--base .*missing-sd does not exist"),
        (("--adapter", "missing-adapter"), "--adapter .*missing-adapter does not exist"),
        (("--clip-model", "missing-clip"), "--clip-model .*missing-clip does not exist"),
        (("--recognizer", "insightface"), "needs --insightface-pack"),
    ],
)
def test_bad_paths_fail_before_generating(inputs, tmp_path, capsys, change, message):
    import re

    args = _args(inputs, tmp_path / "out", *change)
    if change[0] in ("--base", "--adapter"):  # replace the existing flag's value
        index = args.index(change[0])
        args[index + 1] = str(tmp_path / change[1])
        args = args[:-2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_broken_adapter_fails_before_generating(inputs, tmp_path, capsys):
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((inputs / "adapter" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"truncated")
    args = _args(inputs, tmp_path / "out")
    args[args.index("--adapter") + 1] = str(broken)
    assert main(args) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nothing_to_evaluate_is_a_clear_error(inputs, tmp_path, capsys):
    (tmp_path / "ids.json").write_text(json.dumps([{"name": "Ghost", "references": "nowhere"}]))
    (tmp_path / "prompts.txt").write_text("a photo of {name}\n")
    args = _args(inputs, tmp_path / "out")
    args[args.index("--identities") + 1] = str(tmp_path / "ids.json")
    args[args.index("--prompts") + 1] = str(tmp_path / "prompts.txt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No identity can be measured" in err and "Ghost" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_run_that_can_measure_no_identity_fails_even_with_other_prompts(inputs, tmp_path, capsys, monkeypatch):
    """A relative identities folder used to resolve references twice (refs/refs/...), skip every identity and
    exit 0 with no identity metrics."""
    from apl_adapter.evaluation.specs import load_identities

    monkeypatch.chdir(inputs)
    (eileen,) = load_identities("refs")
    assert eileen.name == "eileen" and len(eileen.references) == 5 and not eileen.problems
    (tmp_path / "faceless" / "Cube_Person").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "faceless" / "Cube_Person" / "cube.png")
    args = _args(inputs, tmp_path / "out")
    args[args.index("--identities") + 1] = str(tmp_path / "faceless")
    assert main(args) == 2  # the prompts file also has a prompt without a person: still nothing on identities
    err = capsys.readouterr().err
    assert "No identity can be measured" in err and "Cube Person" in err
    assert not (tmp_path / "out").exists()


def test_an_existing_report_folder_is_not_overwritten_by_accident(inputs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(_args(inputs, tmp_path / "out")) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").exists()


def test_an_adapter_of_another_width_fails_before_generating(inputs, tmp_path, capsys):
    wide = tmp_path / "wide-adapter"
    get_peft_model(tiny_clip_text_model(hidden_size=48), APLConfig()).save_pretrained(wide)
    args = _args(inputs, tmp_path / "out")
    args[args.index("--adapter") + 1] = str(wide)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit the pipeline in --base" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_sdxl_with_an_adapter_per_text_encoder(inputs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from apl_adapter.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    for encoder, folder in ((pipe.text_encoder, "adapter"), (pipe.text_encoder_2, "adapter_2")):
        model = get_peft_model(encoder, APLConfig(init_seed=3))
        model.save_pretrained(tmp_path / folder)
        model.unload()
    (tmp_path / "prompts.txt").write_text("a photo of {name}\n")
    args = _args(
        inputs, tmp_path / "out", "--adapter-2", str(tmp_path / "adapter_2"), "--height", "16", "--width", "16"
    )
    args[args.index("--base") + 1] = str(tmp_path / "sdxl")
    args[args.index("--adapter") + 1] = str(tmp_path / "adapter")
    args[args.index("--prompts") + 1] = str(tmp_path / "prompts.txt")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["adapter_2"] == str(tmp_path / "adapter_2")
    assert report["identity"]["apl"]["num_images"] == len(SEEDS)
    assert report["quality"]["unchanged"] == {"skipped": "the prompts file has no prompt without a person"}
    row = report["images"][0]
    base = np.asarray(Image.open(tmp_path / "out" / row["base"]), dtype=np.int16)
    apl = np.asarray(Image.open(tmp_path / "out" / row["apl"]), dtype=np.int16)
    assert base.shape == (16, 16, 3) and np.abs(apl - base).max() > 1


@pytest.mark.slow
def test_the_run_continues_without_what_it_cannot_use(inputs, tmp_path, capsys):
    """An identity without a usable reference face, a CLIP folder without weights, a FID file that is no
    network: the rest is still generated and measured, and the report says what was left out."""
    eileen = str(inputs / "refs" / "eileen")
    ids = [{"name": "Ghost", "references": "nowhere"}, {"name": "Eileen Collins", "references": eileen}]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")  # a folder that looks like CLIP but holds no model
    (tmp_path / "inception.pt").write_bytes(b"not a torchscript archive")
    args = _args(inputs, tmp_path / "out", "--clip-model", str(tmp_path / "clip"))
    args += ["--fid-model", str(tmp_path / "inception.pt")]
    args[args.index("--identities") + 1] = str(tmp_path / "ids.json")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["identity"]["base"]["num_images"] == len(TEMPLATES) * len(SEEDS)  # Eileen only
    assert report["quality"]["unchanged"]["num_pairs"] == len(NEUTRAL) * len(SEEDS)
    assert report["quality"]["clip_score"]["skipped"].startswith("could not load")
    assert report["quality"]["fid"]["skipped"].startswith("could not load")
    assert {r["identity"] for r in report["images"]} == {None, "Eileen Collins"}
    err = capsys.readouterr().err
    for needle in ("'Ghost'", "CLIP score: could not load", "FID: could not load"):
        assert needle in err
