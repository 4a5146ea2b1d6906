"""What the Triton ``apl_pipeline`` model does with one request: prompt strings in, uint8 images out.

The Python-backend model (``triton/apl_pipeline/1/model.py``, written by :mod:`.triton`) is a thin shell around
these functions, so the request handling is tested here with the real runtimes, without a Triton server.

Inputs (Triton names; all but ``PROMPT`` optional, one value each unless said):

=====================  ===========  ====================================================
``PROMPT``             string [B]   the prompts; the APL prefix is always applied to them
``NEGATIVE_PROMPT``    string [B]   one per prompt, or one for all (never prefixed)
``SEED``               int64        seed of the initial latents (default 0)
``NUM_INFERENCE_STEPS`` int32       default 20 (the paper's)
``GUIDANCE_SCALE``     fp32         default 7 (the paper's)
``HEIGHT``, ``WIDTH``  int32        default: the export's opt size
=====================  ===========  ====================================================

Output ``IMAGE``: uint8 ``(B, H, W, 3)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError

PIPELINE_MODEL = "apl_pipeline"
#: (name, Triton data type, dims, optional)
PIPELINE_INPUTS = (
    ("PROMPT", "TYPE_STRING", [-1], False),
    ("NEGATIVE_PROMPT", "TYPE_STRING", [-1], True),
    ("SEED", "TYPE_INT64", [1], True),
    ("NUM_INFERENCE_STEPS", "TYPE_INT32", [1], True),
    ("GUIDANCE_SCALE", "TYPE_FP32", [1], True),
    ("HEIGHT", "TYPE_INT32", [1], True),
    ("WIDTH", "TYPE_INT32", [1], True),
)
PIPELINE_OUTPUT = ("IMAGE", "TYPE_UINT8", [-1, -1, -1, 3])
DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 7.0


@dataclass
class PipelineRequest:
    prompts: list[str]
    negative_prompts: list[str]
    seed: int = 0
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None


def _strings(array: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(array, dtype=object).ravel()]


def _scalar(inputs: dict[str, np.ndarray], name: str, kind: type, default):
    if name not in inputs:
        return default
    values = np.asarray(inputs[name]).ravel()
    if values.size != 1:
        raise ExportError(f"{name} takes one value, got {values.size}.")
    return kind(values[0])


def parse_request(inputs: dict[str, np.ndarray]) -> PipelineRequest:
    """Triton input arrays -> a checked :class:`PipelineRequest` (a clear error names the bad input)."""
    if "PROMPT" not in inputs:
        raise ExportError("PROMPT is required: a string tensor of one or more prompts.")
    prompts = _strings(inputs["PROMPT"])
    if not prompts:
        raise ExportError("PROMPT is empty: send at least one prompt.")
    negatives = _strings(inputs["NEGATIVE_PROMPT"]) if "NEGATIVE_PROMPT" in inputs else [""]
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ExportError(f"{len(negatives)} NEGATIVE_PROMPT values for {len(prompts)} prompts; send one or one each.")
    request = PipelineRequest(
        prompts,
        negatives,
        seed=_scalar(inputs, "SEED", int, 0),
        num_inference_steps=_scalar(inputs, "NUM_INFERENCE_STEPS", int, DEFAULT_STEPS),
        guidance_scale=_scalar(inputs, "GUIDANCE_SCALE", float, DEFAULT_GUIDANCE),
        height=_scalar(inputs, "HEIGHT", int, None),
        width=_scalar(inputs, "WIDTH", int, None),
    )
    if not 1 <= request.num_inference_steps <= 1000:
        raise ExportError(f"NUM_INFERENCE_STEPS must be 1..1000, got {request.num_inference_steps}.")
    return request


def load_serving_pipeline(folder: str | Path):
    """The runtime of an exported folder: its TensorRT engines on a CUDA GPU, else its ONNX files (ONNX Runtime)."""
    import json

    manifest = json.loads((Path(folder) / "apl_export.json").read_text())
    if manifest.get("engines") and torch.cuda.is_available():
        from .runtime_trt import TRTAPLPipeline

        return TRTAPLPipeline.from_pretrained(folder)
    from .runtime_ort import ORTAPLPipeline

    return ORTAPLPipeline.from_pretrained(folder)


def run_request(pipe, request: PipelineRequest) -> np.ndarray:
    """Generate the request's images with ``pipe`` (an exported pipeline); uint8 ``(B, H, W, 3)``."""
    images = pipe(
        request.prompts,
        negative_prompt=request.negative_prompts,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        height=request.height,
        width=request.width,
        generator=torch.Generator().manual_seed(request.seed),
        output_type="np",
    ).images
    return np.round(np.asarray(images) * 255).astype(np.uint8)
