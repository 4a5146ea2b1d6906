"""A Triton Inference Server model repository from the exported folder, and its structural check.

One Triton model per exported model, under ``<out>/triton/``::

    triton/
      text_encoder/config.pbtxt            1/model.plan   (or 1/model.onnx without --trt)
      negative_text_encoder/config.pbtxt   1/...
      unet/config.pbtxt                    1/...
      vae_decoder/config.pbtxt             1/...
      CLIENT.md                            the request flow of one image

Engines (``platform: "tensorrt_plan"``) are used when ``--trt`` built them, else the ONNX files
(``platform: "onnxruntime_onnx"``). Batch dims are explicit (``max_batch_size: 0``), so the I/O
dims are exactly the exported ones. The denoising loop is iterative, which a Triton ensemble
cannot express; the client drives it (CLIENT.md), as :class:`~apl_export.runtime_ort.ORTAPLPipeline`
does locally.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import ExportError
from .onnx_export import EXTERNAL_DATA_NAME

TRITON_DIR = "triton"
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}

CLIENT_FLOW = """# Serving this APL pipeline with Triton

Start: `tritonserver --model-repository {root}`

One request flow (batch B prompts, guidance g, N steps, latents h x w = image / {vae_factor}):

1. Tokenize the prompts with `../tokenizer` (pad to 77, truncate): `input_ids` int32 (B, 77).
2. `text_encoder` <- `input_ids`{prefix_note} -> `last_hidden_state` (B, 77, D): the prompt WITH the
   APL prefix.
3. `{negative}` <- the negative prompts' ids ("" if none) -> `last_hidden_state` (B, 77, D).
4. latents = scheduler.init_noise_sigma * randn(B, 4, h, w); scheduler = `../scheduler`.
5. For each timestep t: `unet` <- `sample` = scale_model_input(concat[latents, latents]),
   `timestep` = [t] (float32, shape (1,)), `encoder_hidden_states` = concat[negative, positive]
   -> `out_sample`; split in halves (uncond, text); eps = uncond + g * (text - uncond);
   latents = scheduler.step(eps, t, latents).
6. `vae_decoder` <- `latent_sample` = latents / {scaling} -> `sample` (B, 3, H, W) in [-1, 1].

`apl_export.runtime_ort.ORTAPLPipeline` implements exactly this flow with onnxruntime.
"""


def write_triton_repository(staging: Path, manifest: dict) -> Path:
    """Write ``<staging>/triton`` from the manifest (engines if built, else ONNX) and check it."""
    root = staging / TRITON_DIR
    root.mkdir(exist_ok=True)
    engines = (manifest.get("engines") or {}).get("models", {})
    for name, model in manifest["models"].items():
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if name in engines:
            platform, filename = "tensorrt_plan", "model.plan"
            _link_or_copy(staging / engines[name]["path"], version / filename)
        else:
            platform, filename = "onnxruntime_onnx", "model.onnx"
            onnx_path = staging / model["path"]
            _link_or_copy(onnx_path, version / filename)
            if (onnx_path.parent / EXTERNAL_DATA_NAME).exists():
                _link_or_copy(onnx_path.parent / EXTERNAL_DATA_NAME, version / EXTERNAL_DATA_NAME)
        (root / name / "config.pbtxt").write_text(model_config(name, platform, filename, model))
    (root / "CLIENT.md").write_text(
        CLIENT_FLOW.format(
            root=TRITON_DIR,
            vae_factor=manifest["vae_factor"],
            scaling=manifest["vae_scaling_factor"],
            negative=manifest["negative_prompt_encoder"],
            prefix_note=" and `prefix` (m, D) from ../text_encoder/prefix.npy"
            if manifest["prefix_mode"] == "input"
            else "",
        )
    )
    check_triton_repository(root)
    return root


def model_config(name: str, platform: str, filename: str, model: dict) -> str:
    """``config.pbtxt`` text for one model: explicit dims, no implicit batching."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f'default_model_filename: "{filename}"', "max_batch_size: 0"]
    for kind in ("input", "output"):
        entries = [_tensor_config(t) for t in model[f"{kind}s"]]
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if platform == "tensorrt_plan":
        lines.append("instance_group [ { kind: KIND_GPU, count: 1 } ]")
    return "\n".join(lines) + "\n"


def _tensor_config(tensor: dict) -> str:
    dims = ", ".join(str(d if isinstance(d, int) else -1) for d in tensor["dims"])
    dtype = _TRITON_DTYPES[tensor["dtype"]]
    return f'  {{ name: "{tensor["name"]}", data_type: {dtype}, dims: [ {dims} ] }}'


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # same file system: no second copy of a multi-GB UNet
    except OSError:
        shutil.copy2(source, target)


# ----------------------------------------------------------------------------------------------
# Structural check
# ----------------------------------------------------------------------------------------------

_TENSOR_RE = re.compile(r'\{\s*name:\s*"([^"]+)",\s*data_type:\s*(\w+),\s*dims:\s*\[([^\]]*)\]\s*\}')


def parse_model_config(text: str) -> dict:
    """The fields this exporter writes: name, platform, default_model_filename, inputs, outputs."""
    fields = dict(re.findall(r'^(name|platform|default_model_filename):\s*"([^"]*)"', text, re.MULTILINE))
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
        tensors = _TENSOR_RE.findall(block.group(1)) if block else []
        fields[kind + "s"] = [(n, t, [int(d) for d in dims.split(",") if d.strip()]) for n, t, dims in tensors]
    return fields


def check_triton_repository(root: Path) -> list[str]:
    """Every model folder has a config naming itself, a model file that exists, and I/O matching the model.

    I/O is checked against the ONNX file's graph (for ``onnxruntime_onnx``) or the ONNX file it was
    built from (for ``tensorrt_plan``, next to the repository). Returns the model names.
    """
    import onnx

    models = sorted(p.parent.name for p in root.glob("*/config.pbtxt"))
    if not models:
        raise ExportError(f"{root} holds no model (no */config.pbtxt).")
    for name in models:
        config = parse_model_config((root / name / "config.pbtxt").read_text())
        where = root / name / "config.pbtxt"
        if config.get("name") != name:
            raise ExportError(f"{where}: name {config.get('name')!r} differs from its folder {name!r}.")
        filename = config.get("default_model_filename", "")
        model_file = root / name / "1" / filename
        if not filename or not model_file.is_file() or model_file.stat().st_size == 0:
            raise ExportError(f"{where}: model file 1/{filename} is missing or empty.")
        platform = config.get("platform")
        onnx_file = model_file if platform == "onnxruntime_onnx" else root.parent / name / "model.onnx"
        if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
            raise ExportError(f"{where}: platform {platform!r} is not one this exporter writes.")
        if not onnx_file.is_file():
            raise ExportError(f"{where}: the ONNX file {onnx_file} its I/O is checked against is missing.")
        graph = onnx.load(str(onnx_file), load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        for kind, values in (("inputs", [v for v in graph.input if v.name not in initializers]),
                             ("outputs", list(graph.output))):  # fmt: skip
            expected = [(v.name, _onnx_triton_dtype(v), _onnx_dims(v)) for v in values]
            if config[kind] != expected:
                raise ExportError(f"{where}: {kind} {config[kind]} do not match the model's {expected}.")
    return models


def _onnx_triton_dtype(value) -> str:
    import onnx

    return _TRITON_DTYPES[str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))]


def _onnx_dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
