"""The TensorRT runtime: engines deserialize only on a CUDA GPU, so the generation test skips without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from apl_export.errors import ExportError, TensorRTUnavailableError
from apl_export.exporter import ExportOptions, export_pipeline
from apl_export.runtime_ort import ORTAPLPipeline
from apl_export.runtime_trt import TRTAPLPipeline
from apl_export.specs import ShapeRange, ShapeRanges
from apl_export.tensorrt_loader import load_tensorrt
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.testing import tiny_sd_pipeline


def _trt_runnable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        load_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; this machine has a GPU")
def test_trt_runtime_refuses_without_gpu(tmp_path):
    with pytest.raises(ExportError, match="needs a CUDA GPU"):
        TRTAPLPipeline.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not _trt_runnable(), reason="TensorRT engines deserialize only on a CUDA GPU with TensorRT")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_trt_pipeline_matches_onnxruntime(tmp_path, cuda_graphs):
    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    save_adapter(get_peft_model(tiny_sd_pipeline().text_encoder, APLConfig()), tmp_path / "adapter")
    ranges = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 32), width=ShapeRange(16, 16, 32))
    options = ExportOptions(ranges=ranges, exporter="torchscript", trt=True)
    out = export_pipeline(tmp_path / "sd", tmp_path / "adapter", tmp_path / "out", options, progress=lambda s: None)
    prompts = ["a photo of Ann Lee", "a red cube"]
    expected = ORTAPLPipeline.from_pretrained(out)(
        prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np"
    ).images
    pipe = TRTAPLPipeline.from_pretrained(out, cuda_graphs=cuda_graphs)
    for _ in range(2):  # the second call replays captured graphs
        images = pipe(
            prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np"
        ).images
        # TF32 / kernel choice on the GPU: looser than the fp32 CPU comparison.
        np.testing.assert_allclose(images, expected, atol=5e-3, rtol=0)
