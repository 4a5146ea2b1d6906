"""``apl-export --text-encoder fast``: the cached-prefix text encoder with ``apl::PrefixAttention`` nodes.

One export of a tiny pipeline (TensorRT-RTX engines too, where the wheels are installed) is shared by the slow tests.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from apl_export.cli import build_parser
from apl_export.errors import ExportError, ValidationError
from apl_export.exported_models import PeftTextEncoderReference
from apl_export.exporter import ExportOptions, export_pipeline, load_pipeline
from apl_export.runtime_ort import ORTAPLPipeline
from apl_export.specs import ShapeRange, ShapeRanges, text_encoder_spec
from apl_export.trt_plugin import FastCLIPTextEncoderGraph, onnx_reference_ops, prefix_attention_numpy
from apl_export.validate import compare_custom_op_graph

from apl_adapter.ops import prefix_attention_reference

from .export_helpers import has_trt_builder, save_tiny_sources

RANGES = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 16), width=ShapeRange(16, 16, 16))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return save_tiny_sources(tmp_path_factory.mktemp("fast-sources"))


@pytest.fixture(scope="module")
def fast_export(sources):
    options = ExportOptions(ranges=RANGES, exporter="torchscript", text_encoder="fast", trt=has_trt_builder())
    return export_pipeline(sources / "sd", sources / "adapter", sources / "fast", options, progress=lambda s: None)


@pytest.mark.parametrize("causal", [1, 0])
def test_numpy_prefix_attention_matches_torch_reference(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    k_prefix, v_prefix = (torch.randn(1, 3, 4, 8, generator=gen) for _ in range(2))
    expected = prefix_attention_reference(q, k, v, k_prefix, v_prefix, bool(causal), None)
    got = prefix_attention_numpy(*(t.numpy() for t in (q, k, v, k_prefix, v_prefix)), causal=causal)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_cli_text_encoder_choices(capsys):
    args = ["sd/", "--adapter", "a/", "--out", "o/", "--text-encoder", "fast"]
    assert build_parser().parse_args(args).text_encoder == "fast"
    assert build_parser().parse_args(args[:-2]).text_encoder == "standard"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args[:-1], "turbo"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"fp16": True}, "fp32 only"), ({"prefix_mode": "input"}, "needs a baked prefix"), ({"triton": True}, "Triton")],
)
def test_fast_needs_fp32_and_a_baked_prefix(sources, tmp_path, overrides, message):
    options = ExportOptions(ranges=RANGES, exporter="torchscript", text_encoder="fast", **overrides)
    with pytest.raises(ExportError, match=message):
        export_pipeline(sources / "sd", sources / "adapter", tmp_path / "out", options, progress=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fast_export_has_plugin_nodes_and_validated_manifest(fast_export):
    manifest = json.loads((fast_export / "apl_export.json").read_text())
    assert manifest["text_encoder_variant"] == "fast"
    model = onnx.load(str(fast_export / "text_encoder" / "model.onnx"))
    layers = json.loads((fast_export / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    nodes = [n for n in model.graph.node if n.domain == "apl"]
    assert [n.op_type for n in nodes] == ["PrefixAttention"] * layers
    assert all({a.name: a for a in n.attribute}["plugin_namespace"].s == b"apl" for n in nodes)
    initializers = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input if i.name not in initializers] == ["input_ids"]
    text = manifest["models"]["text_encoder"]
    assert text["plugins"] == {"apl::PrefixAttention": layers}
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int32", "dims": ["batch", 77]}]
    assert [(t["name"], t["dims"]) for t in text["outputs"]] == [
        ("last_hidden_state", ["batch", 77, 32]),
        ("pooler_output", ["batch", 32]),
    ]
    validation = text["validation"]
    assert "ReferenceEvaluator" in validation["method"] and "onnxruntime" in validation["note"]
    assert set(validation["max_abs_error"]) == {f"{o}/{s}" for o in ("last_hidden_state", "pooler_output")
                                                for s in ("onnx", "torch")}  # fmt: skip
    assert 0 <= max(validation["max_abs_error"].values()) <= validation["atol"] == 1e-5
    # The plain encoder for the negative prompt is standard and still validated with onnxruntime.
    assert manifest["models"]["negative_text_encoder"]["validation"]["method"] == "onnxruntime vs PyTorch"
    assert not any(
        n.domain == "apl" for n in onnx.load(str(fast_export / "negative_text_encoder" / "model.onnx")).graph.node
    )
    assert json.loads((fast_export / "model_index.json").read_text())["_class_name"] == "TRTAPLPipeline"


@pytest.mark.slow
def test_fast_validation_can_fail(fast_export, sources):
    """The same check against a wrong reference (the plain encoder, prefix off) must fail."""
    loaded = load_pipeline(sources / "sd", sources / "adapter")
    spec = text_encoder_spec("text_encoder", 32, "pooler_output", 32, RANGES)
    wrong = PeftTextEncoderReference(loaded.text_encoder, spec.output_names, plain=True)
    graph = FastCLIPTextEncoderGraph(loaded.clip, loaded.prefix).eval()
    ids = loaded.tokenizer(["a photo of Ann Lee"] * 2, padding="max_length", max_length=77, return_tensors="np")
    feeds = [{"input_ids": ids.input_ids.astype(np.int32)}]
    path = fast_export / "text_encoder" / "model.onnx"
    with pytest.raises(ValidationError, match="beyond atol"):
        compare_custom_op_graph(path, graph, wrong, spec, feeds, 1e-5, onnx_reference_ops(), "", lambda s: None)
    right = PeftTextEncoderReference(loaded.text_encoder, spec.output_names)
    report = compare_custom_op_graph(path, graph, right, spec, feeds, 1e-5, onnx_reference_ops(), "", lambda s: None)
    assert max(report.max_abs_error.values()) <= 1e-5


@pytest.mark.slow
def test_onnxruntime_pipeline_refuses_the_fast_text_encoder(fast_export):
    with pytest.raises(ExportError, match="--text-encoder standard"):
        ORTAPLPipeline.from_pretrained(fast_export)


@pytest.mark.slow
@pytest.mark.skipif(not has_trt_builder(), reason="no TensorRT builder installed (pip install 'apl-adapter[trt]')")
def test_trt_builds_the_fast_text_encoder_engine_with_the_plugin(fast_export):
    """TensorRT-RTX (CPU) parses the plugin nodes in the child process and builds; nothing runs the engine here."""
    manifest = json.loads((fast_export / "apl_export.json").read_text())
    engines = manifest["engines"]["models"]
    assert set(engines) == set(manifest["models"])
    text = engines["text_encoder"]
    assert text["plugins"] == manifest["models"]["text_encoder"]["plugins"]
    assert (fast_export / text["path"]).stat().st_size == text["bytes"] > 0
    assert text["io"]["input_ids"] == {"mode": "input", "dtype": "int32", "shape": [-1, 77]}
    assert text["io"]["last_hidden_state"]["shape"] == [-1, 77, 32]
    assert text["profile"]["input_ids"] == [[1, 77], [1, 77], [2, 77]]
    assert "plugins" not in engines["unet"]
