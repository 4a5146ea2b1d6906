"""Single graphs through export_model: the dynamo exporter, input-mode prefixes, fp16, shape specs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from apl_export.errors import ExportError
from apl_export.exported_models import PeftTextEncoderReference
from apl_export.modules import CLIPTextEncoderGraph, UNetGraph
from apl_export.onnx_export import export_model
from apl_export.specs import ShapeRange, ShapeRanges, text_encoder_spec, unet_spec
from apl_export.validate import check_structure, compare_with_torch
from peft import get_peft_model

from apl_adapter import APLConfig
from apl_adapter.testing import tiny_clip_text_model, tiny_unet

RANGES = ShapeRanges(batch=ShapeRange(1, 2, 3), height=ShapeRange(16, 16, 32), width=ShapeRange(16, 16, 32))
M = 4


@pytest.fixture(scope="module")
def peft_encoder():
    return get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=M)).eval()


def _ids(prompt_ids, batch: int) -> np.ndarray:
    return prompt_ids[:batch].numpy().astype(np.int32)


def _export_input_mode(peft_encoder, prompt_ids, path, exporter: str, fp16: bool = False):
    spec = text_encoder_spec("text_encoder", 32, "pooler_output", 32, RANGES, prefix_len=M)
    graph = CLIPTextEncoderGraph(peft_encoder.get_base_model(), prefix_as_input=True, num_virtual_tokens=M)
    trained = peft_encoder.get_base_model().embeddings.apl_prefix["default"].detach().numpy()
    example = (torch.from_numpy(_ids(prompt_ids, 2)), torch.from_numpy(trained))
    export_model(graph, example, spec, path, exporter=exporter, fp16=fp16, progress=lambda s: None)
    check_structure(path, spec)
    return spec, trained


@pytest.mark.slow
def test_dynamo_input_mode_follows_pytorch_for_any_prefix(peft_encoder, prompt_ids, tmp_path):
    """The default exporter; a new prefix changes the ONNX output exactly as it changes PyTorch's."""
    path = tmp_path / "text_encoder" / "model.onnx"
    spec, trained = _export_input_mode(peft_encoder, prompt_ids, path, exporter="dynamo")
    other = np.random.default_rng(0).uniform(0, 1, trained.shape).astype(np.float32)
    reference = PeftTextEncoderReference(peft_encoder, spec.output_names, prefix_as_input=True)
    feeds = [{"input_ids": _ids(prompt_ids, b), "prefix": p} for b in (2, 3) for p in (trained, other)]
    report = compare_with_torch(path, reference, spec, feeds, atol=1e-4, progress=lambda s: None)
    assert max(report.max_abs_error.values()) <= 1e-4
    session = ort.InferenceSession(str(path))
    first = session.run(None, feeds[0])[0]
    second = session.run(None, feeds[1])[0]
    # Causal encoder: BOS (position 0) ignores the prefix; every later position sees it.
    np.testing.assert_allclose(first[:, 0], second[:, 0], atol=1e-5)
    assert np.abs(first[:, 1:] - second[:, 1:]).max() > 1e-2
    # PyTorch's own PeftModel agrees with the reference wrapper (the wrapper restores the prefix).
    with torch.no_grad():
        direct = peft_encoder(input_ids=torch.from_numpy(feeds[0]["input_ids"]).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(first, direct, atol=1e-4, rtol=0)


def test_fp16_text_encoder_keeps_fp32_io_within_tolerance(peft_encoder, prompt_ids, tmp_path):
    path = tmp_path / "text_encoder" / "model.onnx"
    spec, trained = _export_input_mode(peft_encoder, prompt_ids, path, exporter="torchscript", fp16=True)
    session = ort.InferenceSession(str(path))
    assert [i.type for i in session.get_inputs()] == ["tensor(int32)", "tensor(float)"]
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    reference = PeftTextEncoderReference(peft_encoder, spec.output_names, prefix_as_input=True)
    feeds = [{"input_ids": _ids(prompt_ids, 3), "prefix": trained}]
    report = compare_with_torch(path, reference, spec, feeds, atol=2e-2, progress=lambda s: None)
    assert 0 < max(report.max_abs_error.values()) <= 2e-2  # fp16 really ran: not bit-exact


@pytest.mark.slow
def test_unet_dynamic_batch_and_size(tmp_path):
    unet = tiny_unet()
    spec = unet_spec(32, 2, RANGES)
    path = tmp_path / "unet" / "model.onnx"
    example = (torch.randn(2, 4, 8, 8), torch.tensor([10.0]), torch.randn(2, 77, 32))
    export_model(UNetGraph(unet), example, spec, path, exporter="torchscript", progress=lambda s: None)
    check_structure(path, spec)
    generator = np.random.default_rng(0)
    feeds = [
        {"sample": generator.standard_normal(shape, np.float32), "timestep": np.array([t], np.float32),
         "encoder_hidden_states": generator.standard_normal((shape[0], 77, 32), np.float32)}
        for shape, t in (((6, 4, 16, 8), 999.0), ((2, 4, 8, 16), 1.0))
    ]  # fmt: skip
    report = compare_with_torch(path, UNetGraph(unet), spec, feeds, atol=1e-3, progress=lambda s: None)
    assert max(report.max_abs_error.values()) <= 1e-3


def test_specs_profiles_and_parsing():
    spec = unet_spec(768, 8, ShapeRanges(batch=ShapeRange(1, 1, 4), height=ShapeRange(512, 512, 768)).resolved(512))
    assert spec.profile()["sample"] == ((2, 4, 64, 64), (2, 4, 64, 64), (8, 4, 96, 64))
    assert spec.profile()["timestep"] == ((1,), (1,), (1,))
    assert spec.dynamic_axes()["out_sample"] == {0: "unet_batch", 2: "latent_height", 3: "latent_width"}
    assert ShapeRange.parse("512", "height") == ShapeRange(512, 512, 512)
    with pytest.raises(ExportError, match="MIN:OPT:MAX"):
        ShapeRange.parse("1:2", "batch")


def test_baked_prefix_width_must_match_encoder():
    with pytest.raises(ExportError, match="width 32"):
        CLIPTextEncoderGraph(tiny_clip_text_model(), prefix=torch.zeros(10, 48))


def test_non_finite_outputs_fail_validation_by_name(tmp_path):
    """An error of NaN must not read as 0: outputs with NaN/Inf fail, naming the output."""
    from apl_export.errors import ValidationError
    from apl_export.specs import ModelSpec, TensorSpec

    class Log(torch.nn.Module):
        def forward(self, x):
            return torch.log(x)

    f32 = np.dtype(np.float32)
    spec = ModelSpec(
        "log", (TensorSpec("x", f32, ("n",)),), (TensorSpec("y", f32, ("n",)),), {"n": ShapeRange(1, 3, 4)}
    )
    path = tmp_path / "log.onnx"
    export_model(Log(), (torch.ones(3),), spec, path, exporter="torchscript", progress=lambda s: None)
    good = {"x": np.array([1.0, 2.0, 3.0], np.float32)}
    compare_with_torch(path, Log(), spec, [good], atol=1e-5, progress=lambda s: None)
    with pytest.raises(ValidationError, match=r"output y from PyTorch has 1 non-finite"):
        compare_with_torch(path, Log(), spec, [good, {"x": np.array([1.0, -1.0, 3.0], np.float32)}], atol=1e-5,
                           progress=lambda s: None)  # fmt: skip
