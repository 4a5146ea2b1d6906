"""The stages every ``apl-export`` run shares, whatever the pipeline family: options, the staged output folder,
one model's export + validation, and the end (engines, Triton, manifest, publication).

:mod:`.exporter` (Stable Diffusion 1.x / 2.x) and :mod:`.flow_exporter` (SD3 / FLUX.1) build on these, so neither
imports the other's loading code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from apl_adapter.atomic import replace_folder, staging_folder
from apl_adapter.errors import check_output_folder

from .errors import ExportError, InsufficientMemoryError, TensorRTUnavailableError
from .exported_models import ExportedModel
from .onnx_export import DEFAULT_OPSET, Exporter, export_model
from .specs import ShapeRanges
from .validate import check_structure

PrefixMode = Literal["baked", "input"]
MANIFEST_NAME = "apl_export.json"
FORMAT_VERSION = 1


@dataclass
class ExportOptions:
    """What to export and how. Defaults give validated fp32 ONNX with the prefix baked in."""

    prefix_mode: PrefixMode = "baked"
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    exporter: Exporter = "dynamo"
    text_encoder: str = "standard"  # a key of exported_models.TEXT_ENCODER_VARIANTS
    trt: bool = False
    triton: bool = False
    triton_expose_parts: bool = False  # also publish each part (then a client can bypass the prefix)
    overwrite: bool = False
    max_sequence_length: int | None = None  # SD3 / FLUX: the T5 window (None: the pipeline's default)
    models: tuple[str, ...] | None = None  # SD3 / FLUX: the graphs to export (None: all)


Progress = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# The end of every export, and the output folder: staged next to the target, renamed at the end
# ----------------------------------------------------------------------------------------------


def build_engines_and_publish(
    staging: Path, out: Path, manifest: dict, options: ExportOptions, progress: Progress
) -> Path:
    """The last stages of every export: TensorRT engines (``--trt``), the Triton repository (``--triton``), the
    manifest, and the swap of ``staging`` into ``out``. Without a TensorRT builder, or without the memory an engine
    build needs, the validated ONNX is still published, then the error is raised."""
    try:
        trt_missing = None
        if options.trt:
            from .engines import build_engines

            progress("[5/5] TensorRT engines")
            try:
                manifest["engines"] = build_engines(staging, manifest, fp16=options.fp16, progress=progress)
            except (TensorRTUnavailableError, InsufficientMemoryError) as err:
                trt_missing = err  # publish the validated ONNX, then report the missing builder / memory
        if options.triton:
            from .triton import write_triton_repository

            progress("[5/5] Triton model repository")
            write_triton_repository(staging, manifest, expose_parts=options.triton_expose_parts)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if trt_missing is not None:
        raise type(trt_missing)(f"{trt_missing} The validated ONNX export is in {out}.")
    progress(f"done: {out}")
    return out


def check_out_keeps_inputs(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an ``--out`` that is, or contains, an input folder: replacing it would delete the user's inputs."""
    target = out.resolve()
    for flag, folder in inputs.items():
        source = folder.resolve()
        if source == target or target in source.parents:
            raise ExportError(
                f"--out {out} {'is' if source == target else 'contains'} the {flag} folder {folder}; writing the "
                "export there would replace it. Choose an --out outside your inputs, e.g. a new sibling folder."
            )


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Check ``out`` can be (re)written and return a fresh staging folder next to it."""
    check_output_folder(out, overwrite, error=ExportError)
    parent = out.resolve().parent
    try:
        return staging_folder(out.resolve(), "export")
    except OSError as err:
        raise ExportError(f"Cannot write to {parent} ({err.strerror}); choose a writable --out folder.") from err


def publish(staging: Path, out: Path) -> None:
    """Swap the finished staging folder into place (the old output survives until the swap)."""
    replace_folder(staging, out)


# ----------------------------------------------------------------------------------------------
# One model: export, validate, describe
# ----------------------------------------------------------------------------------------------


def export_and_validate(model: ExportedModel, staging: Path, options: ExportOptions, progress: Progress) -> dict:
    """Export ``model`` to ``<staging>/<name>/model.onnx``, validate it, write its config; returns its manifest entry
    (I/O, the TensorRT profile, the validation report)."""
    spec = model.spec
    path = staging / spec.name / "model.onnx"
    feeds = model.feeds()
    example = tuple(torch.from_numpy(feeds[0][t.name]) for t in spec.inputs)
    exporter = model.onnx_exporter(options.exporter)
    export_model(model.graph, example, spec, path, opset=options.opset, exporter=exporter, fp16=options.fp16,
                 progress=progress, custom_translation_table=model.translation_table())  # fmt: skip
    check_structure(path, spec)
    extras = model.manifest_extras(path, exporter)
    report = model.validate(path, feeds, options.fp16, progress)
    model.save_files(path.parent)
    return {
        **extras,
        "path": f"{spec.name}/model.onnx",
        "inputs": [_tensor_json(t) for t in spec.inputs],
        "outputs": [_tensor_json(t) for t in spec.outputs],
        "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()},
        "validation": report.as_dict(),
    }


def _tensor_json(tensor) -> dict:
    return {"name": tensor.name, "dtype": str(tensor.dtype), "dims": list(tensor.dims)}


def read_model_index(model_dir: Path) -> dict:
    """``model_index.json`` of a diffusers folder (``{}`` when it is not an object); a clear error without one."""
    if not (model_dir / "model_index.json").is_file():
        raise ExportError(
            f"{model_dir} is not a diffusers pipeline folder (no model_index.json); pass the folder written by "
            "pipe.save_pretrained()."
        )
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{model_dir}/model_index.json is not valid JSON ({err}); re-save the pipeline.") from err
    return index if isinstance(index, dict) else {}
