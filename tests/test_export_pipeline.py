"""End to end: a tiny Stable Diffusion pipeline + an APL adapter through apl-export.

One baked export (ONNX + TensorRT-RTX engines + Triton repository) is shared by the tests of
this module; the input-mode export also checks that a missing TensorRT builder leaves the
validated ONNX in place.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from apl_export import tensorrt_loader
from apl_export.errors import ExportError, TensorRTUnavailableError, ValidationError
from apl_export.exported_models import PeftTextEncoderReference
from apl_export.exporter import ExportOptions, export_pipeline, load_pipeline
from apl_export.runtime_ort import ORTAPLPipeline
from apl_export.specs import ShapeRange, ShapeRanges, text_encoder_spec
from apl_export.triton import check_triton_repository, public_models_taking_token_ids, write_triton_repository
from apl_export.validate import compare_with_torch

from apl_adapter.pipelines import apply_apl, remove_apl

from .export_helpers import has_trt_builder, save_tiny_sources

pytestmark = pytest.mark.slow

RANGES = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 32), width=ShapeRange(16, 16, 32))
PROMPTS = ["a photo of Ann Lee", "a red cube on a table"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A saved tiny SD pipeline and a saved adapter for its text encoder (width 32, m = 10)."""
    return save_tiny_sources(tmp_path_factory.mktemp("export-sources"))


@pytest.fixture(scope="module")
def baked(sources):
    """A baked export with TensorRT engines (where a builder is installed) and a Triton repository."""
    options = ExportOptions(ranges=RANGES, exporter="torchscript", trt=has_trt_builder(), triton=True)
    out = export_pipeline(sources / "sd", sources / "adapter", sources / "baked", options, progress=lambda s: None)
    return out


def _reference_images(sources, prompts, negatives=None, adapter=True, steps=3):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sources / "sd", safety_checker=None, requires_safety_checker=False)
    if adapter:
        apply_apl(pipe, sources / "adapter")
    images = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, height=16, width=16,
                  generator=torch.Generator().manual_seed(7), output_type="np").images  # fmt: skip
    if adapter:
        remove_apl(pipe)
    return images


def test_layout_and_manifest(baked):
    manifest = json.loads((baked / "apl_export.json").read_text())
    assert set(manifest["models"]) == {"text_encoder", "negative_text_encoder", "unet", "vae_decoder"}
    for name, model in manifest["models"].items():
        assert (baked / model["path"]).is_file()
        assert (baked / name / "config.json").is_file()
        validation = model["validation"]
        assert 0 <= max(validation["max_abs_error"].values()) <= validation["atol"]
    assert (baked / "tokenizer" / "tokenizer_config.json").is_file()
    assert (baked / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((baked / "model_index.json").read_text())
    assert {"text_encoder", "negative_text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler"} <= set(index)
    assert not list(baked.parent.glob(".baked.export-*")), "the staging folder must be gone"


def test_baked_text_encoder_has_only_input_ids_and_applies_the_prefix(baked, sources):
    model = onnx.load(str(baked / "text_encoder" / "model.onnx"))
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == ["input_ids"]
    assert inputs[0].type.tensor_type.elem_type == onnx.TensorProto.INT32

    loaded = load_pipeline(sources / "sd", sources / "adapter")
    ids = loaded.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.text_encoder(input_ids=ids).last_hidden_state.numpy()
        with loaded.text_encoder.disable_adapter():
            plain = loaded.text_encoder(input_ids=ids).last_hidden_state.numpy()
    feed = {"input_ids": ids.numpy().astype(np.int32)}
    prefixed = ort.InferenceSession(str(baked / "text_encoder" / "model.onnx")).run(None, feed)[0]
    negative = ort.InferenceSession(str(baked / "negative_text_encoder" / "model.onnx")).run(None, feed)[0]
    assert prefixed.shape == (2, 77, 32)
    np.testing.assert_allclose(prefixed, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(negative, plain, atol=1e-4, rtol=0)
    assert np.abs(prefixed - plain).max() > 1e-2, "the baked graph must not equal the plain encoder"


def test_validation_rejects_a_graph_that_differs_from_pytorch(baked, sources):
    """The validator can fail: the plain encoder's ONNX against the prefixed PyTorch reference."""
    loaded = load_pipeline(sources / "sd", sources / "adapter")
    spec = text_encoder_spec("text_encoder", 32, "pooler_output", 32, RANGES)
    reference = PeftTextEncoderReference(loaded.text_encoder, spec.output_names)
    ids = loaded.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        compare_with_torch(baked / "negative_text_encoder" / "model.onnx", reference, spec,
                           [{"input_ids": ids.astype(np.int32)}], atol=1e-4, progress=lambda s: None)  # fmt: skip


def test_onnxruntime_pipeline_matches_pytorch(baked, sources):
    negatives = ["blurry", ""]
    expected = _reference_images(sources, PROMPTS, negatives)
    plain = _reference_images(sources, PROMPTS, negatives, adapter=False)
    pipe = ORTAPLPipeline.from_pretrained(baked)
    images = pipe(PROMPTS, negative_prompt=negatives, num_inference_steps=3, height=16, width=16,
                  generator=torch.Generator().manual_seed(7), output_type="np").images  # fmt: skip
    assert images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)  # same seed, same image (fp32)
    pil = pipe(PROMPTS, negative_prompt=negatives, num_inference_steps=3, height=16, width=16,
               generator=torch.Generator().manual_seed(7)).images  # fmt: skip
    assert [im.size for im in pil] == [(16, 16)] * 2  # diffusers' default output_type, PIL
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (images * 255).round().astype(np.uint8))
    with pytest.raises(ExportError, match="output_type"):
        pipe(PROMPTS, height=16, width=16, output_type="latent")
    assert np.abs(images - plain).max() > 1e-3, "the prefix must change the image"
    with pytest.raises(ExportError, match="outside the exported range"):
        pipe(PROMPTS, height=64, width=16)


@pytest.mark.skipif(not has_trt_builder(), reason="no TensorRT builder installed (tensorrt or TensorRT-RTX wheels)")
def test_tensorrt_engines_io_and_profiles(baked):
    manifest = json.loads((baked / "apl_export.json").read_text())
    engines = manifest["engines"]
    assert set(engines["models"]) == set(manifest["models"])
    for name, engine in engines["models"].items():
        model = manifest["models"][name]
        assert (baked / engine["path"]).stat().st_size == engine["bytes"] > 0
        inputs = [n for n, v in engine["io"].items() if v["mode"] == "input"]
        outputs = [n for n, v in engine["io"].items() if v["mode"] == "output"]
        assert inputs == [t["name"] for t in model["inputs"]]
        assert outputs == [t["name"] for t in model["outputs"]]
        assert engine["profile"] == model["profile"]
    text = engines["models"]["text_encoder"]
    assert text["io"]["input_ids"] == {"mode": "input", "dtype": "int32", "shape": [-1, 77]}
    assert text["profile"]["input_ids"] == [[1, 77], [1, 77], [2, 77]]
    unet = engines["models"]["unet"]
    assert unet["io"]["sample"]["shape"] == [-1, 4, -1, -1]
    # UNet batch is twice the prompt batch (guidance); latents are the image / 2 for the tiny VAE.
    assert unet["profile"]["sample"] == [[2, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]]
    assert unet["profile"]["encoder_hidden_states"] == [[2, 77, 32], [2, 77, 32], [4, 77, 32]]


def test_triton_serves_one_pipeline_no_client_can_skip_the_prefix(baked, tmp_path):
    """Structural: the default repository publishes only the pipeline (prompt strings in, images out); no public
    model takes token ids or embeddings. With the parts exposed, the plain encoder and the UNet are public."""
    root = baked / "triton"
    assert check_triton_repository(root) == ["apl_pipeline"]
    assert public_models_taking_token_ids(root) == []
    assert "every prompt is encoded with the APL prefix" in (root / "CLIENT.md").read_text()
    parts = tmp_path / "parts"
    shutil.copytree(baked, parts, ignore=shutil.ignore_patterns("triton"))
    manifest = json.loads((parts / "apl_export.json").read_text())
    write_triton_repository(parts, manifest, expose_parts=True)
    assert check_triton_repository(parts / "triton") == [
        "apl_pipeline", "negative_text_encoder", "text_encoder", "unet", "vae_decoder"
    ]  # fmt: skip
    assert public_models_taking_token_ids(parts / "triton") == ["negative_text_encoder", "text_encoder", "unet"]
    # The check can fail: a renamed input, a missing model file, a pipeline without its export.
    broken = parts / "triton"
    config = broken / "unet" / "config.pbtxt"
    config.write_text(config.read_text().replace('"sample"', '"latents"', 1))
    with pytest.raises(ExportError, match="do not match"):
        check_triton_repository(broken)
    shutil.rmtree(broken / "unet")
    (broken / "vae_decoder" / "1").rename(broken / "vae_decoder" / "2")
    with pytest.raises(ExportError, match="missing"):
        check_triton_repository(broken)
    shutil.rmtree(broken / "vae_decoder")
    shutil.rmtree(broken / "apl_pipeline" / "1" / "pipeline" / "tokenizer")
    with pytest.raises(ExportError, match="tokenizer is missing"):
        check_triton_repository(broken)


class _TritonBackendUtils(types.ModuleType):
    """Stand-in for ``triton_python_backend_utils``, which exists only inside the tritonserver image: just the
    calls model.py makes, so the real model.py runs against the real exported pipeline."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


def test_triton_pipeline_model_generates_what_the_exported_pipeline_does(baked, monkeypatch):
    from apl_export.triton_serving import load_serving_pipeline, parse_request, run_request

    version = baked / "triton" / "apl_pipeline" / "1"
    pb = _TritonBackendUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("apl_triton_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(baked / "triton" / "apl_pipeline"), "model_version": "1"})
    good = {
        "PROMPT": pb.Tensor("PROMPT", np.array([p.encode() for p in PROMPTS], dtype=object)),
        "SEED": pb.Tensor("SEED", np.array([7], np.int64)),
        "NUM_INFERENCE_STEPS": pb.Tensor("NUM_INFERENCE_STEPS", np.array([3], np.int32)),
        "GUIDANCE_SCALE": pb.Tensor("GUIDANCE_SCALE", np.array([7.5], np.float32)),  # diffusers' default, as below
        "HEIGHT": pb.Tensor("HEIGHT", np.array([16], np.int32)),
        "WIDTH": pb.Tensor("WIDTH", np.array([16], np.int32)),
    }
    bad = {**good, "NEGATIVE_PROMPT": pb.Tensor("NEGATIVE_PROMPT", np.array([b"a", b"b", b"c"], dtype=object))}
    ok, refused = model.execute([good, bad])
    images = ok.output_tensors[0].array
    assert ok.error is None and images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert refused.output_tensors == [] and "3 NEGATIVE_PROMPT values for 2 prompts" in refused.error.message
    # the same request through the exported pipeline directly, and the prefixed PyTorch pipeline
    inputs = {name: tensor.array for name, tensor in good.items()}
    direct = run_request(load_serving_pipeline(baked), parse_request(inputs))
    np.testing.assert_array_equal(images, direct)
    expected = _reference_images(baked.parent, PROMPTS, ["", ""])
    assert np.abs(images.astype(np.float64) - np.round(expected * 255)).max() <= 1


def test_input_mode_without_trt_builder_keeps_onnx(sources, monkeypatch):
    """Input mode end to end, with no TensorRT builder importable: a clear error, the ONNX published."""
    monkeypatch.setattr(tensorrt_loader, "BUILDER_MODULES", ("apl_no_such_tensorrt_module",))
    options = ExportOptions(ranges=RANGES, exporter="torchscript", prefix_mode="input", trt=True)
    out = sources / "input"
    with pytest.raises(TensorRTUnavailableError, match="needs a TensorRT builder"):
        export_pipeline(sources / "sd", sources / "adapter", out, options, progress=lambda s: None)
    manifest = json.loads((out / "apl_export.json").read_text())
    assert "engines" not in manifest
    model = onnx.load(str(out / "text_encoder" / "model.onnx"))
    assert [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}] == [
        "input_ids",
        "prefix",
    ]
    # The ONNX Runtime pipeline feeds the exported prefix; another prefix changes the image.
    expected = _reference_images(sources, PROMPTS[:1])
    pipe = ORTAPLPipeline.from_pretrained(out)
    images = pipe(PROMPTS[:1], num_inference_steps=3, height=16, width=16, generator=torch.Generator().manual_seed(7),
                  output_type="np").images  # fmt: skip
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)
    pipe.set_prefix(np.random.default_rng(0).uniform(0, 1, (10, 32)).astype(np.float32))
    other = pipe(PROMPTS[:1], num_inference_steps=3, height=16, width=16, generator=torch.Generator().manual_seed(7),
                 output_type="np").images  # fmt: skip
    assert np.abs(other - images).max() > 1e-3
    with pytest.raises(ExportError, match="does not fit"):
        pipe.set_prefix(np.zeros((10, 48), np.float32))
