"""``apl-export`` for Stable Diffusion 3 and FLUX.1: tiny random pipelines of the real classes, saved and exported.

One SD3 export (through the Python API) and one FLUX export (through the command line) are shared by the module, both
with TensorRT-RTX engines where the wheels are installed (the tests using them are ``slow``: ~35 s together). The
adapters cover a shallow CLIP prefix, a deep CLIP prefix, T5 prefixes, and an encoder left plain.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from apl_export import memory
from apl_export.cli import main
from apl_export.engines import check_engine_memory
from apl_export.errors import ExportError, InsufficientMemoryError
from apl_export.exporter import ExportOptions, export_pipeline, load_pipeline
from apl_export.flow_graphs import FlowCLIPGraph, PeftEncoderReference
from apl_export.onnx_export import export_model
from apl_export.runtime_ort import ORTAPLPipeline
from apl_export.specs import F32, I32, ModelSpec, ShapeRange, ShapeRanges, TensorSpec
from apl_export.stages import build_engines_and_publish
from apl_export.validate import compare_with_torch
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.pipelines import apply_apl
from apl_adapter.testing import tiny_flux_pipeline, tiny_sd3_pipeline
from apl_adapter.tuners.apl.model import prefix_embedding_of

from .export_helpers import has_trt_builder

WINDOW = 32  # --max-sequence-length: a short T5 window keeps the tiny runs fast; the layout is that of 256 / 512
M = 4
# min 8 / opt 16 px: validation runs both sizes (the SD3 position-embedding crop and FLUX's tokens follow them)
RANGES = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(8, 16, 32), width=ShapeRange(8, 16, 32))
PROMPTS = ["a photo of Ann Lee", "a red cube on a table"]
QUIET = {"progress": lambda s: None}


def _save(model, folder, **config) -> None:
    save_adapter(get_peft_model(model, APLConfig(num_virtual_tokens=M, **config)), folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Saved tiny pipelines; SD3 adapters for CLIP-L and T5 (CLIP-G plain), FLUX adapters for CLIP (deep) and T5.
    The FLUX transformer is guidance-distilled, as FLUX.1-dev's (a ``guidance`` input)."""
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flow-sources")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    flux_dev = tiny_flux_pipeline()
    torch.manual_seed(0)
    config = {k: v for k, v in flux_dev.transformer.config.items() if not k.startswith("_")}  # not the defaults list
    config["guidance_embeds"] = True
    flux_dev.register_modules(transformer=FluxTransformer2DModel.from_config(config).eval())
    flux_dev.save_pretrained(root / "flux")
    sd3, flux = tiny_sd3_pipeline(), tiny_flux_pipeline()  # fresh copies: get_peft_model changes them in place
    _save(sd3.text_encoder, root / "sd3-apl" / "text_encoder", init_seed=1)
    _save(sd3.text_encoder_3, root / "sd3-apl" / "text_encoder_3", init_seed=3)
    _save(flux.text_encoder, root / "flux-apl" / "text_encoder", init_seed=4, prefix_depth="deep")
    _save(flux.text_encoder_2, root / "flux-apl" / "text_encoder_2", init_seed=5)
    return root


@pytest.fixture(scope="module")
def sd3_export(sources):
    options = ExportOptions(ranges=RANGES, exporter="torchscript", max_sequence_length=WINDOW, trt=has_trt_builder())
    return export_pipeline(sources / "sd3", sources / "sd3-apl", sources / "sd3-out", options, **QUIET)


@pytest.fixture(scope="module")
def flux_export(sources):
    out = sources / "flux-out"
    argv = [sources / "flux", "--adapter", sources / "flux-apl", "--out", out, "--exporter", "torchscript", "--batch",
            "1:1:2", "--height", "8:16:32", "--width", "8:16:32", "--max-sequence-length", WINDOW]  # fmt: skip
    code = main([str(a) for a in [*argv, *(["--trt"] if has_trt_builder() else [])]])
    assert code == 0
    return out


def _manifest(folder) -> dict:
    return json.loads((folder / "apl_export.json").read_text())


def _run(folder, name: str, ids: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(folder / name / "model.onnx")).run(None, {"input_ids": ids.astype(np.int32)})


def _ids(tokenizer, length: int, prompts=PROMPTS) -> np.ndarray:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids


# ----------------------------------------------------------------------------------------------------------------
# SD3
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd3_graphs_io_and_validation(sd3_export):
    manifest = _manifest(sd3_export)
    assert manifest["family"] == "sd3" and manifest["max_sequence_length"] == WINDOW
    assert list(manifest["models"]) == ["text_encoder", "text_encoder_2", "text_encoder_3", "negative_text_encoder",
                                        "negative_text_encoder_3", "transformer", "vae_decoder"]  # fmt: skip
    assert manifest["negative_prompt_encoders"] == {
        "text_encoder": "negative_text_encoder", "text_encoder_2": "text_encoder_2",
        "text_encoder_3": "negative_text_encoder_3",
    }  # fmt: skip
    assert [manifest["encoders"][e]["prefix"] for e in ("text_encoder", "text_encoder_2", "text_encoder_3")] == [
        "shallow", None, "shallow"
    ]  # fmt: skip
    for name, model in manifest["models"].items():
        validation = model["validation"]
        assert validation["method"] == "onnxruntime vs PyTorch"
        assert 0 <= max(validation["max_abs_error"].values()) <= validation["atol"], name
        if "text_encoder" in name:  # exact in fp32: the prefixed graphs against the PeftModel
            assert max(validation["max_abs_error"].values()) <= 1e-5, name
            assert model["inputs"] == [{"name": "input_ids", "dtype": "int32",
                                        "dims": ["batch", WINDOW if name.endswith("_3") else 77]}]  # fmt: skip
    clip = manifest["models"]["text_encoder"]["outputs"]
    assert [(t["name"], t["dims"]) for t in clip] == [
        ("penultimate_hidden_state", ["batch", 77, 32]), ("text_embeds", ["batch", 32])
    ]  # fmt: skip
    transformer = manifest["models"]["transformer"]
    assert [(t["name"], t["dims"]) for t in transformer["inputs"]] == [
        ("hidden_states", ["transformer_batch", 4, "latent_height", "latent_width"]),
        ("encoder_hidden_states", ["transformer_batch", 77 + WINDOW, 64]),
        ("pooled_projections", ["transformer_batch", 64]),
        ("timestep", ["transformer_batch"]),
    ]
    assert transformer["profile"]["hidden_states"] == [[2, 4, 8, 8], [2, 4, 16, 16], [4, 4, 32, 32]]
    assert manifest["exporter"] == "torchscript" and transformer["exporter"] == "dynamo"  # TorchScript: no rms_norm
    index = json.loads((sd3_export / "model_index.json").read_text())
    assert index["_runtime"] is None and index["_source_class_name"] == "StableDiffusion3Pipeline"
    assert {"tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"} <= set(index)


@pytest.mark.slow
def test_sd3_baked_encoders_give_what_the_prefixed_pipeline_encodes(sd3_export, sources):
    """The exported graphs, joined as SD3's encode_prompt joins them, equal the PyTorch pipeline with the adapters
    applied (apply_apl): the positive prompt prefixed, the negative one plain."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sources / "sd3")
    with torch.no_grad():
        plain = pipe.encode_prompt(PROMPTS, None, None, "cpu", 1, True, negative_prompt=PROMPTS,
                                   max_sequence_length=WINDOW)  # fmt: skip
    apply_apl(pipe, sources / "sd3-apl")
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, "cpu", 1, True, negative_prompt=PROMPTS, max_sequence_length=WINDOW
        )

    def joined(names: tuple[str, str, str]) -> tuple[np.ndarray, np.ndarray]:
        h1, p1 = _run(sd3_export, names[0], _ids(pipe.tokenizer, 77))
        h2, p2 = _run(sd3_export, names[1], _ids(pipe.tokenizer_2, 77))  # pads with "!", not EOS
        (t5,) = _run(sd3_export, names[2], _ids(pipe.tokenizer_3, WINDOW))
        clip = F.pad(torch.from_numpy(np.concatenate([h1, h2], -1)), (0, t5.shape[-1] - 64)).numpy()
        return np.concatenate([clip, t5], 1), np.concatenate([p1, p2], -1)

    positive = joined(("text_encoder", "text_encoder_2", "text_encoder_3"))
    np.testing.assert_allclose(positive[0], embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(positive[1], pooled.numpy(), atol=1e-5, rtol=0)
    negatives = joined(("negative_text_encoder", "text_encoder_2", "negative_text_encoder_3"))
    np.testing.assert_allclose(negatives[0], negative.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(negatives[1], negative_pooled.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(negatives[0], plain[1].numpy(), atol=1e-5, rtol=0)
    assert np.abs(positive[0][:, :77] - negatives[0][:, :77]).max() > 1e-2, "CLIP-L prefix baked"
    assert np.abs(positive[0][:, 77:] - negatives[0][:, 77:]).max() > 1e-2, "T5 prefix baked"


@pytest.mark.slow
@pytest.mark.skipif(not has_trt_builder(), reason="no TensorRT builder installed (pip install 'apl-adapter[trt]')")
def test_tensorrt_engines_for_every_graph(sd3_export, flux_export):
    """TensorRT-RTX builds every graph on the CPU (deserializing and running them needs a GPU: not done here)."""
    for folder in (sd3_export, flux_export):
        manifest = _manifest(folder)
        engines = manifest["engines"]["models"]
        assert set(engines) == set(manifest["models"])
        for name, engine in engines.items():
            model = manifest["models"][name]
            assert (folder / engine["path"]).stat().st_size == engine["bytes"] > 0
            assert [n for n, v in engine["io"].items() if v["mode"] == "input"] == [t["name"] for t in model["inputs"]]
            assert engine["profile"] == model["profile"]
    flux = _manifest(flux_export)["engines"]["models"]["transformer"]
    assert flux["io"]["hidden_states"]["shape"] == [-1, -1, 4] and flux["io"]["img_ids"]["shape"] == [-1, 3]
    assert flux["profile"]["img_ids"] == [[16, 3], [64, 3], [256, 3]]


# ----------------------------------------------------------------------------------------------------------------
# FLUX (exported through the command line)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_flux_graphs_match_the_prefixed_pipeline(flux_export, sources):
    from diffusers import FluxPipeline

    manifest = _manifest(flux_export)
    assert list(manifest["models"]) == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    assert manifest["negative_prompt_encoders"] is None  # no negative branch in FLUX's encode_prompt
    assert manifest["encoders"]["text_encoder"]["prefix"] == "deep"
    transformer = manifest["models"]["transformer"]
    assert [(t["name"], t["dims"]) for t in transformer["inputs"]] == [
        ("hidden_states", ["batch", "latent_tokens", 4]),
        ("encoder_hidden_states", ["batch", WINDOW, 48]),
        ("pooled_projections", ["batch", 32]),
        ("timestep", ["batch"]),
        ("img_ids", ["latent_tokens", 3]),
        ("txt_ids", [WINDOW, 3]),
        ("guidance", ["batch"]),  # guidance-distilled, as FLUX.1-dev (schnell has none: see the next test)
    ]
    for model in manifest["models"].values():
        validation = model["validation"]
        assert 0 <= max(validation["max_abs_error"].values()) <= validation["atol"]
    pipe = FluxPipeline.from_pretrained(sources / "flux")
    apply_apl(pipe, sources / "flux-apl")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=WINDOW)
    (clip,) = _run(flux_export, "text_encoder", _ids(pipe.tokenizer, 77))
    (t5,) = _run(flux_export, "text_encoder_2", _ids(pipe.tokenizer_2, WINDOW))
    np.testing.assert_allclose(clip, pooled.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(t5, embeds.numpy(), atol=1e-5, rtol=0)


def test_flux_schnell_spec_has_no_guidance_input():
    from apl_export.flow_models import flux_transformer_spec

    schnell = tiny_flux_pipeline().transformer.config  # guidance_embeds=False, as FLUX.1-schnell
    spec = flux_transformer_spec(schnell, 1, 256, RANGES)
    assert spec.input_names == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"
    ]  # fmt: skip
    assert spec.dim_ranges["latent_tokens"] == ShapeRange(16, 64, 256)  # (side / 2)^2 at 8, 16, 32 px
    assert spec.profile()["txt_ids"] == ((256, 3),) * 3


@pytest.mark.slow
def test_exports_have_no_runtime_or_triton(sd3_export, flux_export, tmp_path):
    for folder in (sd3_export, flux_export):
        with pytest.raises(ExportError, match=r"1.x / 2.x exports only.*your own SD3 / FLUX loop"):
            ORTAPLPipeline.from_pretrained(folder)
    from apl_export.triton import write_triton_repository

    with pytest.raises(ExportError, match=r"Triton repository serves Stable Diffusion 1\.x / 2\.x exports only"):
        write_triton_repository(tmp_path, _manifest(flux_export))


def test_help_explains_sd3_and_flux(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for words in ("SD3 / FLUX.1", "text_encoder_3/", "--max-sequence-length", "penultimate_hidden_state", "img_ids"):
        assert words in text


# ----------------------------------------------------------------------------------------------------------------
# What is refused, and memory
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prefix-mode", "input"], "--prefix-mode input is not supported for FLUX.1"),
        (["--text-encoder", "fast"], r"apl::PrefixAttention.*T5 cannot use it"),
        (["--triton"], "--triton is not supported for FLUX.1"),
        (
            ["--max-sequence-length", "4"],
            r"--max-sequence-length 4 does not fit text_encoder_2 \(T5\).*4-vector prefix",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(sources, tmp_path, capsys, flags, message):
    code = main([str(sources / "flux"), "--adapter", str(sources / "flux-apl"), "--out", str(tmp_path / "o"), *flags])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_bad_adapter_folders(sources, tmp_path):
    options = ExportOptions(ranges=RANGES, exporter="torchscript", max_sequence_length=WINDOW)

    def export(adapter):
        return export_pipeline(sources / "flux", adapter, tmp_path / "out", options, **QUIET)

    with pytest.raises(ExportError, match=r"is a single adapter.*one subfolder per encoder \(text_encoder/, text_enc"):
        export(sources / "flux-apl" / "text_encoder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no adapter for any encoder"):
        export(tmp_path / "empty")
    with pytest.raises(ExportError, match=r"adapters in text_encoder_3/, but FluxPipeline has text encoders"):
        export(sources / "sd3-apl")  # SD3's layout: FLUX has no text_encoder_3
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "text_encoder").symlink_to(sources / "flux-apl" / "text_encoder_2", target_is_directory=True)
    with pytest.raises(ExportError, match=r"does not fit text_encoder of .*T5"):
        export(swapped)
    sd = tmp_path / "sd"  # an SD 1.x folder: refused before anything loads
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ExportError, match="no T5 encoder"):
        export_pipeline(sd, sources / "flux-apl", tmp_path / "o2", options, **QUIET)
    with pytest.raises(ExportError, match=r"load_pipeline loads Stable Diffusion 1\.x / 2\.x"):
        load_pipeline(sources / "flux", sources / "flux-apl")
    assert not (tmp_path / "out").exists()


def test_models_picks_graphs_and_loads_only_those(sources, tmp_path):
    """--models: a subset is exported (a prefixed encoder's negative copy with it); the rest is not even loaded."""
    options = ExportOptions(ranges=RANGES, exporter="torchscript", models=("text_encoder",))
    out = export_pipeline(sources / "sd3", sources / "sd3-apl", tmp_path / "out", options, **QUIET)
    manifest = _manifest(out)
    assert list(manifest["models"]) == ["text_encoder", "negative_text_encoder"]
    assert list(manifest["encoders"]) == ["text_encoder"] and manifest["max_sequence_length"] == 256  # SD3's default
    assert manifest["selected"] == ["text_encoder"]
    with pytest.raises(ExportError, match=r"--models unet: StableDiffusion3Pipeline exports text_encoder, text_enc"):
        export_pipeline(sources / "sd3", sources / "sd3-apl", tmp_path / "o2", replace(options, models=("unet",)))


def test_components_the_graphs_leave_out_are_refused(sources, tmp_path):
    index = json.loads((sources / "sd3" / "model_index.json").read_text())
    folder = tmp_path / "sd3-controlnet"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**index, "controlnet": ["diffusers", "SD3ControlNetModel"]}))
    with pytest.raises(
        ExportError, match=r"has controlnet, which apl-export does not export.*StableDiffusion3Pipeline"
    ):
        export_pipeline(folder, sources / "sd3-apl", tmp_path / "out", ExportOptions(), **QUIET)
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "SD3Transformer3D"]}))
    with pytest.raises(
        ExportError, match="transformer is a SD3Transformer3D; apl-export exports SD3Transformer2DModel"
    ):
        export_pipeline(folder, sources / "sd3-apl", tmp_path / "out", ExportOptions(), **QUIET)


def test_export_stops_before_loading_when_memory_is_short(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 2**20)  # 1 MiB free
    with pytest.raises(InsufficientMemoryError) as err:
        export_pipeline(sources / "sd3", sources / "sd3-apl", tmp_path / "out", ExportOptions(), **QUIET)
    text = str(err.value)
    assert "(StableDiffusion3Pipeline: " in text and "text_encoder_3 " in text and " M, " in text and "in fp32" in text
    assert "0.0 GiB available" in text and "Export on a machine with at least" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_transformer_validation_at_a_huge_size_stops_before_loading(sources, tmp_path, capsys):
    """No patched figure: at 4096 px the tiny SD3 transformer (VAE factor 1, patch 1) has 16.8 M image tokens."""
    code = main([str(sources / "sd3"), "--adapter", str(sources / "sd3-apl"), "--out", str(tmp_path / "o"),
                 "--height", "4096", "--width", "4096"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "for one attention score matrix of the transformer" in err and "--height" in err, err
    assert not (tmp_path / "o").exists()


def test_engine_build_stops_when_memory_is_short(sd3_export, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    with pytest.raises(
        InsufficientMemoryError, match=r"TensorRT engine of text_encoder \(0.0 GiB of fp32 ONNX weights\).*--fp16"
    ):
        check_engine_memory(sd3_export, _manifest(sd3_export), "tensorrt_rtx")
    monkeypatch.setattr(memory, "available_memory", lambda: 2**40)
    check_engine_memory(sd3_export, _manifest(sd3_export), "tensorrt_rtx")


@pytest.mark.slow
@pytest.mark.skipif(not has_trt_builder(), reason="no TensorRT builder installed (pip install 'apl-adapter[trt]')")
def test_engines_that_do_not_fit_leave_the_validated_onnx_published(sd3_export, tmp_path, monkeypatch):
    """The end of an export with --trt and too little memory for an engine: no engine is built, the validated ONNX
    is published anyway, and the error says where it is (as without a TensorRT builder)."""
    staging = tmp_path / "staging"
    shutil.copytree(sd3_export, staging, ignore=shutil.ignore_patterns("engines"))
    manifest = {k: v for k, v in _manifest(sd3_export).items() if k != "engines"}
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* The validated ONNX export is in .*published"):
        build_engines_and_publish(staging, tmp_path / "published", manifest, ExportOptions(trt=True), **QUIET)
    assert "engines" not in _manifest(tmp_path / "published") and not (tmp_path / "published" / "engines").exists()
    assert (tmp_path / "published" / "transformer" / "model.onnx").is_file() and not staging.exists()


def test_real_size_estimates():
    """The figures docs/sd3_flux.md quotes: T5-XXL alone is 19 GB in fp32; SD3 medium and FLUX.1 do not fit 24 GiB."""
    t5 = 4_762_310_656
    assert round(4 * t5 / 1e9) == 19
    sd3 = memory.ComponentSizes({"text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": t5,
                                 "transformer": 2_028_328_000, "vae": 83_653_863})  # fmt: skip
    flux = memory.ComponentSizes({"text_encoder": 123_060_480, "text_encoder_2": t5,
                                  "transformer": 11_901_408_320, "vae": 83_819_683})  # fmt: skip
    assert memory.export_need_bytes(sd3) / memory.GIB > 80 and memory.export_need_bytes(flux) / memory.GIB > 180
    clip_g = memory.ComponentSizes({"text_encoder_2": 694_659_840})
    assert memory.export_need_bytes(clip_g) / memory.GIB < 11
    assert memory.engine_need_bytes(4 * 2_028_328_000) / memory.GIB > 15


def test_external_data_past_the_threshold(sources, tmp_path, monkeypatch):
    """Weights past the external-data threshold (2 GB for real models; lowered here) go to model.onnx_data, and the
    graph still validates against the prefixed PyTorch encoder."""
    from apl_export import onnx_export
    from peft import PeftModel
    from transformers import CLIPTextModel

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    encoder = PeftModel.from_pretrained(
        CLIPTextModel.from_pretrained(sources / "flux" / "text_encoder"), str(sources / "flux-apl" / "text_encoder")
    ).eval()
    weights = prefix_embedding_of(encoder.get_base_model()).active_prefix_weights
    spec = ModelSpec("clip", (TensorSpec("input_ids", I32, ("batch", 77)),),
                     (TensorSpec("pooler_output", F32, ("batch", 32)),), {"batch": ShapeRange(1, 2, 2)})  # fmt: skip
    graph = FlowCLIPGraph(encoder, weights, ("pooler_output",))
    ids = np.tile(np.array([[49406, 320, 1125, 49407] + [49407] * 73]), (2, 1)).astype(np.int32)
    path = tmp_path / "clip" / "model.onnx"
    export_model(graph, (torch.from_numpy(ids),), spec, path, exporter="torchscript", **QUIET)
    assert (path.parent / "model.onnx_data").stat().st_size > path.stat().st_size
    initializers = onnx.load(str(path), load_external_data=False).graph.initializer
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in initializers)
    reference = PeftEncoderReference(encoder, ("pooler_output",))
    report = compare_with_torch(path, reference, spec, [{"input_ids": ids}], atol=1e-5, **QUIET)
    assert max(report.max_abs_error.values()) <= 1e-5
