"""A Triton Inference Server model repository from the exported folder, and its structural check.

By default the repository holds one public model, a Python-backend *pipeline* (prompt strings in, images out,
as NVIDIA's Stable Diffusion Triton tutorial serves it)::

    triton/
      apl_pipeline/config.pbtxt     PROMPT (+ NEGATIVE_PROMPT, SEED, ...) -> IMAGE uint8 (B, H, W, 3)
      apl_pipeline/1/model.py       a thin shell around apl_export.triton_serving
      apl_pipeline/1/pipeline/      the exported folder (hard links): engines or ONNX, tokenizer, scheduler
      CLIENT.md

The text encoders, the UNet and the VAE run *inside* that model, so no client can send its own token ids to a
plain text encoder, or its own embeddings to the UNet: every prompt gets the prefix. ``expose_parts=True``
(``apl-export --triton-expose-parts``) also publishes each exported model on its own (``platform:
"tensorrt_plan"`` or ``"onnxruntime_onnx"``, explicit dims) for clients that drive the loop themselves; then
the plain ``negative_text_encoder`` and the ``unet`` are public too and the prefix can be bypassed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import ExportError
from .onnx_export import EXTERNAL_DATA_NAME
from .triton_serving import PIPELINE_INPUTS, PIPELINE_MODEL, PIPELINE_OUTPUT

TRITON_DIR = "triton"
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}

MODEL_PY = '''"""Triton Python backend: the APL pipeline, prompt strings in, uint8 images out (written by apl-export).

Needs apl-adapter[export] (and tensorrt for engines) in the Python environment Triton runs this model with.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from apl_export.triton_serving import PIPELINE_INPUTS, load_serving_pipeline, parse_request, run_request


class TritonPythonModel:
    def initialize(self, args):
        self.pipe = load_serving_pipeline(Path(args["model_repository"]) / args["model_version"] / "pipeline")

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name, *_ in PIPELINE_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                images = run_request(self.pipe, parse_request(inputs))
            except Exception as err:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
                continue
            image = pb_utils.Tensor("IMAGE", np.ascontiguousarray(images))
            responses.append(pb_utils.InferenceResponse(output_tensors=[image]))
        return responses
'''

CLIENT_PIPELINE = """# Serving this APL pipeline with Triton

Start: `tritonserver --model-repository {root}` (the Python backend's environment needs `apl-adapter[export]`{trt}).

One public model, `{model}`: send `PROMPT` (TYPE_STRING, one or more prompts) and optionally `NEGATIVE_PROMPT`
(one, or one per prompt), `SEED` (int64), `NUM_INFERENCE_STEPS` (int32, default 20), `GUIDANCE_SCALE` (fp32,
default 7), `HEIGHT` / `WIDTH` (int32, within the exported range); receive `IMAGE`, uint8 (B, H, W, 3).

Guaranteed: every prompt is encoded with the APL prefix (the text encoders, UNet and VAE are not Triton models,
so no request reaches them except through the pipeline). Not guaranteed: what the prefix does to a given name
(see the bench), or anything if the repository is changed or re-exported with `--triton-expose-parts`.
"""

CLIENT_PARTS = """
## The parts (`--triton-expose-parts`)

These models are public too; a client can then send any prompt to the plain `negative_text_encoder` and its
embeddings to the `unet`, skipping the prefix. One request flow (batch B, guidance g, N steps, latents h x w =
image / {vae_factor}):

1. Tokenize the prompts with `../tokenizer` (pad to 77, truncate): `input_ids` int32 (B, 77).
2. `text_encoder` <- `input_ids`{prefix_note} -> `last_hidden_state` (B, 77, D): the prompt WITH the APL prefix.
3. `{negative}` <- the negative prompts' ids ("" if none) -> `last_hidden_state` (B, 77, D).
4. latents = scheduler.init_noise_sigma * randn(B, 4, h, w); scheduler = `../scheduler`.
5. For each timestep t: `unet` <- `sample` = scale_model_input(concat[latents, latents]),
   `timestep` = [t] (float32, shape (1,)), `encoder_hidden_states` = concat[negative, positive]
   -> `out_sample`; split in halves (uncond, text); eps = uncond + g * (text - uncond);
   latents = scheduler.step(eps, t, latents).
6. `vae_decoder` <- `latent_sample` = latents / {scaling} -> `sample` (B, 3, H, W) in [-1, 1].
"""


def write_triton_repository(staging: Path, manifest: dict, expose_parts: bool = False) -> Path:
    """Write ``<staging>/triton``: the pipeline model (and, with ``expose_parts``, each part); check it.

    SD 1.x / 2.x exports only: the pipeline model runs the UNet loop."""
    family = manifest.get("family", "sd")
    if family != "sd":
        raise ExportError(
            f"The Triton repository serves Stable Diffusion 1.x / 2.x exports only; this is a {family} export "
            "(SD3 / FLUX: the ONNX graphs and TensorRT engines, no serving pipeline). Drop --triton."
        )
    root = staging / TRITON_DIR
    root.mkdir(exist_ok=True)
    engines = (manifest.get("engines") or {}).get("models", {})
    _write_pipeline_model(staging, root, manifest, on_gpu=bool(engines))
    client = CLIENT_PIPELINE.format(root=TRITON_DIR, model=PIPELINE_MODEL, trt=" and tensorrt" if engines else "")
    if expose_parts:
        for name, model in manifest["models"].items():
            _write_part(staging, root, name, model, engines)
        client += CLIENT_PARTS.format(
            vae_factor=manifest["vae_factor"],
            scaling=manifest["vae_scaling_factor"],
            negative=manifest["negative_prompt_encoder"],
            prefix_note=" and `prefix` (m, D) from ../text_encoder/prefix.npy"
            if manifest["prefix_mode"] == "input"
            else "",
        )
    (root / "CLIENT.md").write_text(client)
    check_triton_repository(root)
    return root


def _write_pipeline_model(staging: Path, root: Path, manifest: dict, on_gpu: bool) -> None:
    version = root / PIPELINE_MODEL / "1"
    folder = version / "pipeline"
    for source in sorted(staging.rglob("*")):
        relative = source.relative_to(staging)
        if relative.parts[0] == TRITON_DIR or source.is_dir():
            continue
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, folder / relative)
    (folder / "apl_export.json").write_text(json.dumps(manifest, indent=2))  # written last in staging: not linked
    (version / "model.py").write_text(MODEL_PY)
    lines = [f'name: "{PIPELINE_MODEL}"', 'backend: "python"', "max_batch_size: 0"]
    inputs = [_entry(name, dtype, dims, optional) for name, dtype, dims, optional in PIPELINE_INPUTS]
    lines.append("input [\n" + ",\n".join(inputs) + "\n]")
    lines.append("output [\n" + _entry(*PIPELINE_OUTPUT, False) + "\n]")
    lines.append(f"instance_group [ {{ kind: {'KIND_GPU' if on_gpu else 'KIND_CPU'}, count: 1 }} ]")
    (root / PIPELINE_MODEL / "config.pbtxt").write_text("\n".join(lines) + "\n")


def _entry(name: str, dtype: str, dims: list, optional: bool) -> str:
    extra = ", optional: true" if optional else ""
    return f'  {{ name: "{name}", data_type: {dtype}, dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def _write_part(staging: Path, root: Path, name: str, model: dict, engines: dict) -> None:
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

_TENSOR_RE = re.compile(
    r'\{\s*name:\s*"([^"]+)",\s*data_type:\s*(\w+),\s*dims:\s*\[([^\]]*)\]\s*(?:,\s*optional:\s*true\s*)?\}'
)


def parse_model_config(text: str) -> dict:
    """The fields this exporter writes: name, platform, default_model_filename, inputs, outputs."""
    fields = dict(re.findall(r'^(name|platform|backend|default_model_filename):\s*"([^"]*)"', text, re.MULTILINE))
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
        if config.get("backend") == "python":
            _check_pipeline_model(root / name, config)
            continue
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


def _check_pipeline_model(folder: Path, config: dict) -> None:
    """The Python pipeline model: its shell, the export it runs, and the I/O the serving module reads."""
    where = folder / "config.pbtxt"
    for needed in ("1/model.py", "1/pipeline/apl_export.json", "1/pipeline/tokenizer", "1/pipeline/scheduler"):
        if not (folder / needed).exists():
            raise ExportError(f"{where}: {needed} is missing.")
    expected = [(name, dtype, dims) for name, dtype, dims, _ in PIPELINE_INPUTS]
    if config["inputs"] != expected or config["outputs"] != [tuple(PIPELINE_OUTPUT)]:
        raise ExportError(f"{where}: inputs/outputs {config['inputs']} {config['outputs']} are not the pipeline's.")


def public_models_taking_token_ids(root: Path) -> list[str]:
    """The models of a repository a client could send ``input_ids`` to, or embeddings to a UNet: the ways around
    the prefix. Empty for the default repository."""
    found = []
    for config_path in sorted(root.glob("*/config.pbtxt")):
        names = {n for n, _, _ in parse_model_config(config_path.read_text())["inputs"]}
        if names & {"input_ids", "encoder_hidden_states"}:
            found.append(config_path.parent.name)
    return found


def _onnx_triton_dtype(value) -> str:
    import onnx

    return _TRITON_DTYPES[str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))]


def _onnx_dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
