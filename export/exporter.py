"""Export a Stable Diffusion pipeline with an APL adapter: load, export, validate, lay out.

The stages, each printed as it runs:

1. load the diffusers folder and the adapter (``PeftModel.from_pretrained``: the reference);
2. ONNX: ``text_encoder`` (with the APL prefix, baked or as an input), ``negative_text_encoder``
   (the plain encoder, for the negative / unconditional prompt), ``unet``, ``vae_decoder``: one object per model
   (:mod:`.exported_models`: graph, reference, I/O spec and TensorRT profile, feeds, tolerance, config), looped over;
3. validation of each ONNX file against PyTorch (fatal on failure, see :mod:`.validate`); the ``fast`` text
   encoder (``apl::PrefixAttention`` nodes, which onnxruntime cannot run) is run by onnx's ``ReferenceEvaluator``
   with the node in NumPy, and as the exported PyTorch module, both against the ``PeftModel`` (atol 1e-5);
4. the optimum-style folder: each model's config (written with it), tokenizer, scheduler, ``model_index.json``
   and the ``apl_export.json`` manifest (I/O, profiles, validation results);
5. optional TensorRT engines (:mod:`.engines`) and Triton repository (:mod:`.triton`).

Everything is written into a temporary folder next to ``out`` and renamed at the end, so a
failure leaves no partial output behind. The stages shared with SD3 / FLUX exports live in :mod:`.stages`;
:func:`export_pipeline` hands SD3 / FLUX folders to :mod:`.flow_exporter`.

Why a plain encoder ships next to the baked one: the paper applies the prefix to the positive
prompt only; the unconditional branch of classifier-free guidance needs the *plain* embedding of
the negative (or empty) prompt. The baked ``text_encoder`` is the only encoder that takes the
user's prompt; the runtime feeds ``negative_text_encoder`` only the negative prompt. An adapter
saved with ``apply_to_negative_prompt=True`` needs no plain encoder, and none is exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from apl_adapter.families import family_of_class_name

from .errors import ExportError
from .exported_models import (
    FAST_TEXT_ENCODER,
    NEGATIVE_TEXT_ENCODER,
    TEXT_ENCODER,
    UNET,
    LoadedPipeline,
    check_text_encoder_options,
    pipeline_models,
)
from .memory import available_memory
from .runtime_base import load_scheduler
from .specs import ShapeRanges
from .stages import (  # noqa: F401 - ExportOptions, Progress, MANIFEST_NAME stay importable from here
    FORMAT_VERSION,
    MANIFEST_NAME,
    ExportOptions,
    Progress,
    build_engines_and_publish,
    check_out_keeps_inputs,
    export_and_validate,
    prepare_output,
    read_model_index,
)


def export_pipeline(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    progress: Progress = print,
) -> Path:
    """Export ``model_dir`` (a diffusers Stable Diffusion 1.x / 2.x, SD3 or FLUX.1 folder) with the APL adapter
    (SD3 / FLUX: a folder with one adapter subfolder per encoder, see :mod:`.flow_exporter`) to ``out_dir``."""
    options = options or ExportOptions()
    out = Path(out_dir)
    class_name = str(read_model_index(Path(model_dir)).get("_class_name", ""))
    family = family_of_class_name(class_name)
    if family is not None:
        from .flow_exporter import export_flow_pipeline

        return export_flow_pipeline(Path(model_dir), Path(adapter_dir), out, options, family, class_name, progress)
    if options.max_sequence_length is not None:
        raise ExportError(
            "--max-sequence-length sets the T5 window of SD3 / FLUX exports; a Stable Diffusion 1.x / 2.x pipeline has "
            "no T5 encoder (CLIP's 77 positions are fixed). Drop --max-sequence-length."
        )
    if options.models is not None:
        raise ExportError(
            "--models picks graphs of SD3 / FLUX exports; SD 1.x / 2.x exports every model. Drop --models."
        )
    check_out_keeps_inputs(out, {"model": Path(model_dir), "--adapter": Path(adapter_dir)})
    staging = prepare_output(out, options.overwrite)
    try:
        progress(f"[1/5] loading {model_dir} and adapter {adapter_dir}")
        loaded = load_pipeline(Path(model_dir), Path(adapter_dir))
        options = replace(options, ranges=options.ranges.resolved(loaded.native_size))
        options.ranges.check_image_multiple(loaded.image_multiple)
        check_validation_fits(loaded, options.ranges)
        progress("[2/5] ONNX export and [3/5] validation against PyTorch")
        manifest = export_onnx_models(loaded, staging, options, progress)
        progress("[4/5] folder layout: configs, tokenizer, scheduler, model_index.json")
        write_layout(loaded, staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return build_engines_and_publish(staging, out, manifest, options, progress)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_pipeline(model_dir: Path, adapter_dir: Path) -> LoadedPipeline:
    """Load the components of a diffusers SD folder and attach the adapter to its text encoder."""
    from apl_adapter import APLAdapterError, check_adapter_folder

    class_name = str(read_model_index(model_dir).get("_class_name", ""))
    if family_of_class_name(class_name) is not None:
        raise ExportError(
            f"{model_dir} is a {class_name}; load_pipeline loads Stable Diffusion 1.x / 2.x folders. Export it with "
            "export_pipeline (apl-export), which exports SD3 / FLUX folders through apl_export.flow_exporter."
        )
    for part in (TEXT_ENCODER, UNET, "vae", "tokenizer", "scheduler"):
        if not (model_dir / part).is_dir():
            raise ExportError(f"{model_dir} has no {part}/ folder; apl-export needs a Stable Diffusion 1.x/2.x folder.")
    try:
        check_adapter_folder(adapter_dir)
    except APLAdapterError as err:
        raise ExportError(f"--adapter: {err}") from err

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import apl_adapter  # noqa: F401 - registers the APL PEFT type

    text_encoder = CLIPTextModel.from_pretrained(model_dir / TEXT_ENCODER).eval()
    try:
        peft_model = PeftModel.from_pretrained(text_encoder, str(adapter_dir)).eval()
    except APLAdapterError as err:
        raise ExportError(f"--adapter {adapter_dir} does not fit {model_dir}: {err}") from err
    config = peft_model.peft_config["default"]
    weights = peft_model.get_base_model().embeddings.active_prefix_weights.detached()
    return LoadedPipeline(
        text_encoder=peft_model,
        unet=UNet2DConditionModel.from_pretrained(model_dir / UNET).eval(),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        scheduler=load_scheduler(model_dir / "scheduler"),
        prefix=weights.embeds,
        apply_to_negative_prompt=bool(config.apply_to_negative_prompt),
        adapter_dir=adapter_dir,
        prefix_weights=weights,
    )


def validation_peak_bytes(unet, vae_factor: int, ranges: ShapeRanges) -> int:
    """A lower bound on the largest tensor validation makes: one self-attention score matrix of the UNet.

    ONNX Runtime materializes ``(batch x heads, hw, hw)`` float32 scores at every attention level; at the
    latent resolution of the opt image size (what :func:`unet_feeds` runs) the first level dominates.
    """
    config = unet.config
    heads = config.num_attention_heads or config.attention_head_dim
    heads = heads if isinstance(heads, int) else heads[0]
    batch = max(2 * ranges.batch.opt, 2)
    latent_hw = (ranges.height.opt // vae_factor) * (ranges.width.opt // vae_factor)
    peak = 0
    for level, block in enumerate(config.down_block_types):
        if "Attn" in block:
            hw = latent_hw // 4**level
            peak = max(peak, batch * heads * hw * hw * 4)
    return peak


def check_validation_fits(loaded: LoadedPipeline, ranges: ShapeRanges) -> None:
    """Fail before exporting when validating at these sizes would need more memory than the machine has."""
    need, have = validation_peak_bytes(loaded.unet, loaded.vae_factor, ranges), available_memory()
    if have is not None and need > have:
        raise ExportError(
            f"Validating the UNet at {ranges.height.opt}x{ranges.width.opt} (batch {ranges.batch.opt}) needs at least "
            f"{need / 2**30:.1f} GiB for one attention score matrix, but {have / 2**30:.1f} GiB are free. This "
            f"pipeline's native size is {loaded.native_size} (the default when --height / --width are not given); "
            "export at that size or on a machine with more memory."
        )


# ----------------------------------------------------------------------------------------------
# ONNX export + validation of each model
# ----------------------------------------------------------------------------------------------


def export_onnx_models(loaded: LoadedPipeline, staging: Path, options: ExportOptions, progress: Progress) -> dict:
    """Export and validate every model; returns the manifest (without engines)."""
    baked = options.prefix_mode == "baked"
    check_text_encoder_options(loaded, options.text_encoder, baked, options.fp16, options.triton)
    models = pipeline_models(loaded, options.ranges, options.text_encoder, baked)
    exported = {model.name: export_and_validate(model, staging, options, progress) for model in models}
    negative_source = NEGATIVE_TEXT_ENCODER if NEGATIVE_TEXT_ENCODER in exported else TEXT_ENCODER
    ranges = options.ranges
    weights = loaded.adapter_dir / "adapter_model.safetensors"
    return {
        "format_version": FORMAT_VERSION,
        "prefix_mode": options.prefix_mode,
        "prefix_depth": "deep" if loaded.prefix_weights.is_deep else "shallow",
        "hide_prefix_rows": loaded.prefix_weights.hide_rows,
        "text_encoder_variant": options.text_encoder,
        "num_virtual_tokens": loaded.prefix.shape[0],
        "hidden_size": loaded.clip.config.hidden_size,
        "negative_prompt_encoder": negative_source,
        "vae_factor": loaded.vae_factor,
        "image_multiple": loaded.image_multiple,
        "vae_scaling_factor": float(loaded.vae.config.scaling_factor),
        "opset": options.opset,
        "exporter": options.exporter,
        "fp16": options.fp16,
        "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "ranges": {k: list(vars(getattr(ranges, k)).values()) for k in ("batch", "height", "width")},
        "models": exported,
    }


# ----------------------------------------------------------------------------------------------
# Folder layout (optimum-style)
# ----------------------------------------------------------------------------------------------


def write_layout(loaded: LoadedPipeline, staging: Path, manifest: dict) -> None:
    """Tokenizer, scheduler and a diffusers-style ``model_index.json`` (each model's config is next to it already)."""
    loaded.tokenizer.save_pretrained(staging / "tokenizer")
    loaded.scheduler.save_config(staging / "scheduler")
    # optimum's folder layout, but not its pipeline class: the UNet takes a float32 (1,) timestep and
    # the negative prompt has its own encoder, so the runtime is apl_export's.
    # The fast text encoder's custom nodes run only as a TensorRT plugin: its folder needs the TensorRT runtime.
    runtime = (
        "runtime_trt.TRTAPLPipeline"
        if manifest.get("text_encoder_variant") == FAST_TEXT_ENCODER
        else ("runtime_ort.ORTAPLPipeline")
    )
    index = {
        "_class_name": runtime.split(".")[1],
        "_runtime": f"apl_export.{runtime}",
        **{name: ["apl_export", "onnx"] for name in manifest["models"]},
        "tokenizer": ["transformers", type(loaded.tokenizer).__name__],
        "scheduler": ["diffusers", type(loaded.scheduler).__name__],
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))
