"""Export a Stable Diffusion pipeline with an APL adapter: load, export, validate, lay out.

The stages, each printed as it runs:

1. load the diffusers folder and the adapter (``PeftModel.from_pretrained``: the reference);
2. ONNX: ``text_encoder`` (with the APL prefix, baked or as an input), ``negative_text_encoder``
   (the plain encoder, for the negative / unconditional prompt), ``unet``, ``vae_decoder``;
3. validation of each ONNX file against PyTorch (fatal on failure, see :mod:`.validate`); the ``fast`` text
   encoder (``apl::PrefixAttention`` nodes, which onnxruntime cannot run) is run by onnx's ``ReferenceEvaluator``
   with the node in NumPy, and as the exported PyTorch module, both against the ``PeftModel`` (atol 1e-5);
4. the optimum-style folder: configs, tokenizer, scheduler, ``model_index.json`` and the
   ``apl_export.json`` manifest (I/O, profiles, validation results);
5. optional TensorRT engines (:mod:`.engines`) and Triton repository (:mod:`.triton`).

Everything is written into a temporary folder next to ``out`` and renamed at the end, so a
failure leaves no partial output behind.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from apl_adapter.atomic import replace_folder, staging_folder
from apl_adapter.errors import check_output_folder
from apl_adapter.model import PrefixWeights

from .errors import ExportError, TensorRTUnavailableError
from .modules import CLIPTextEncoderGraph, UNetGraph, VAEDecoderGraph, make_standard_text_encoder
from .onnx_export import DEFAULT_OPSET, Exporter, export_model
from .runtime_base import load_scheduler
from .specs import ModelSpec, ShapeRanges, text_encoder_spec, unet_spec, vae_decoder_spec
from .trt_plugin.fast_encoder import make_fast_text_encoder
from .trt_plugin.onnx_op import OP_DOMAIN, OP_NAME, onnx_reference_ops, onnx_translation_table
from .validate import check_structure, compare_custom_op_graph, compare_with_torch, tolerance

PrefixMode = Literal["baked", "input"]
MANIFEST_NAME = "apl_export.json"
FORMAT_VERSION = 1
TEXT_ENCODER, NEGATIVE_TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "negative_text_encoder", "unet", "vae_decoder"
# Prompts for the "real input" validation feeds: with and without a person, short and truncated.
VALIDATION_PROMPTS = (
    "a photo of Ann Lee",
    "a red cube on a wooden table",
    "a close-up portrait of Zorblax Quentaro smiling, studio light, " + "very detailed " * 20,
    "",
)


@dataclass
class ExportOptions:
    """What to export and how. Defaults give validated fp32 ONNX with the prefix baked in."""

    prefix_mode: PrefixMode = "baked"
    ranges: ShapeRanges = field(default_factory=ShapeRanges)
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    exporter: Exporter = "dynamo"
    text_encoder: str = "standard"  # a key of TEXT_ENCODER_VARIANTS
    trt: bool = False
    triton: bool = False
    triton_expose_parts: bool = False  # also publish each part (then a client can bypass the prefix)
    overwrite: bool = False


@dataclass
class LoadedPipeline:
    text_encoder: torch.nn.Module  # the PeftModel: the PyTorch reference with the prefix
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    scheduler: object
    prefix: torch.Tensor  # (m, D)
    apply_to_negative_prompt: bool
    adapter_dir: Path
    prefix_weights: PrefixWeights | None = None  # every prefix tensor (a deep prefix's rows too); None = shallow

    def __post_init__(self) -> None:
        if self.prefix_weights is None:
            self.prefix_weights = PrefixWeights(self.prefix)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image side the pipeline makes by default: ``unet.config.sample_size`` x VAE factor (as diffusers)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else max(size)) * self.vae_factor

    @property
    def image_multiple(self) -> int:
        """Image sides must divide by this: the VAE factor times the UNet's downsampling (64 for SD 1.x)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def clip(self):
        return self.text_encoder.get_base_model()


Progress = Callable[[str], None]

# Graph builders for the prefixed text encoder: (clip, baked prefix or None, prefix_as_input, m) -> module.
# "fast": the prefix's per-layer keys/values are graph constants and each layer's attention is one
# apl::PrefixAttention node (a TensorRT plugin, apl_export.trt_plugin); onnxruntime cannot run that node.
TEXT_ENCODER_VARIANTS: dict[str, Callable[..., torch.nn.Module]] = {
    "standard": make_standard_text_encoder,
    "fast": make_fast_text_encoder,
}
FAST_TEXT_ENCODER = "fast"
# The fast variant's graph holds custom nodes: the ONNX translation table for torch.onnx.export (dynamo).
TEXT_ENCODER_TRANSLATIONS: dict[str, Callable[[], dict]] = {FAST_TEXT_ENCODER: onnx_translation_table}
FAST_FP32_ATOL = 1e-5
FAST_VALIDATION_NOTE = (
    f"onnxruntime has no kernel for the custom {OP_DOMAIN}::{OP_NAME} node, so instead of onnxruntime the ONNX file "
    "was run by onnx.reference.ReferenceEvaluator with a NumPy implementation of that node "
    "(apl_export.trt_plugin.prefix_attention_numpy), and the exported PyTorch module (FastCLIPTextEncoderGraph) "
    "was run too; both against the adapter's PeftModel forward. The TensorRT plugin's CUDA enqueue is not run here."
)


def export_pipeline(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    progress: Progress = print,
) -> Path:
    """Export ``model_dir`` (a diffusers Stable Diffusion folder) with the APL adapter to ``out_dir``."""
    options = options or ExportOptions()
    out = Path(out_dir)
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
        trt_missing = None
        if options.trt:
            from .engines import build_engines

            progress("[5/5] TensorRT engines")
            try:
                manifest["engines"] = build_engines(staging, manifest, fp16=options.fp16, progress=progress)
            except TensorRTUnavailableError as err:
                trt_missing = err  # publish the validated ONNX, then report the missing builder
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
        raise TensorRTUnavailableError(f"{trt_missing} The validated ONNX export is in {out}.")
    progress(f"done: {out}")
    return out


# ----------------------------------------------------------------------------------------------
# Output folder: staged next to the target, renamed at the end
# ----------------------------------------------------------------------------------------------


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
# Loading
# ----------------------------------------------------------------------------------------------


def load_pipeline(model_dir: Path, adapter_dir: Path) -> LoadedPipeline:
    """Load the components of a diffusers SD folder and attach the adapter to its text encoder."""
    from apl_adapter import APLAdapterError, check_adapter_folder

    if not (model_dir / "model_index.json").is_file():
        raise ExportError(
            f"{model_dir} is not a diffusers pipeline folder (no model_index.json); pass the folder written by "
            "pipe.save_pretrained()."
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


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_validation_fits(loaded: LoadedPipeline, ranges: ShapeRanges) -> None:
    """Fail before exporting when validating at these sizes would need more memory than the machine has."""
    need, have = validation_peak_bytes(loaded.unet, loaded.vae_factor, ranges), _available_memory()
    if have is not None and need > have:
        raise ExportError(
            f"Validating the UNet at {ranges.height.opt}x{ranges.width.opt} (batch {ranges.batch.opt}) needs at least "
            f"{need / 2**30:.1f} GiB for one attention score matrix, but {have / 2**30:.1f} GiB are free. This "
            f"pipeline's native size is {loaded.native_size} (the default when --height / --width are not given); "
            "export at that size or on a machine with more memory."
        )


# ----------------------------------------------------------------------------------------------
# PyTorch references (what the ONNX files are compared with)
# ----------------------------------------------------------------------------------------------


class PeftTextEncoderReference(torch.nn.Module):
    """The adapter's own PyTorch forward (``PeftModel``), with the tensor signature of the exported graph.

    ``prefix_as_input``: the given prefix is copied into the adapter before each call, so a new
    prefix is compared with what PyTorch does with it. ``plain``: the adapter is disabled.
    """

    def __init__(self, peft_model, output_names: list[str], prefix_as_input: bool = False, plain: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.output_names = output_names
        self.prefix_as_input = prefix_as_input
        self.plain = plain

    def forward(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None):
        ids = input_ids.to(torch.int64)
        if self.plain:
            with self.peft_model.disable_adapter():
                out = self.peft_model(input_ids=ids)
        elif self.prefix_as_input:
            param = self.peft_model.get_base_model().embeddings.apl_prefix["default"]
            saved = param.detach().clone()
            with torch.no_grad():
                param.copy_(prefix)
            try:
                out = self.peft_model(input_ids=ids)
            finally:
                with torch.no_grad():
                    param.copy_(saved)
        else:
            out = self.peft_model(input_ids=ids)
        pooled = out.text_embeds if "text_embeds" in self.output_names else out.pooler_output
        return out.last_hidden_state, pooled


# ----------------------------------------------------------------------------------------------
# ONNX export + validation of each model
# ----------------------------------------------------------------------------------------------


def export_onnx_models(loaded: LoadedPipeline, staging: Path, options: ExportOptions, progress: Progress) -> dict:
    """Export and validate every model; returns the manifest (without engines)."""
    if options.text_encoder not in TEXT_ENCODER_VARIANTS:
        raise ExportError(
            f"--text-encoder {options.text_encoder!r} is not available in this build; "
            f"choose one of {sorted(TEXT_ENCODER_VARIANTS)}."
        )
    make_text_encoder = TEXT_ENCODER_VARIANTS[options.text_encoder]
    fast = options.text_encoder == FAST_TEXT_ENCODER
    if fast and options.fp16:
        raise ExportError(
            "--text-encoder fast is exported and validated in fp32 only (onnxruntime cannot check an fp16 "
            "conversion of its custom nodes); drop --fp16 or use --text-encoder standard."
        )
    if fast and options.triton:
        raise ExportError(
            "--triton cannot serve --text-encoder fast: its apl::PrefixAttention node is a Python TensorRT plugin, "
            "which Triton's TensorRT backend cannot load, and onnxruntime cannot run it; use --text-encoder standard."
        )
    clip = loaded.clip
    width = clip.config.hidden_size
    m = loaded.prefix.shape[0]
    ranges = options.ranges
    baked = options.prefix_mode == "baked"
    if loaded.prefix_weights.is_deep and not baked:
        raise ExportError(
            "This adapter is a deep prefix (keys and values at every encoder layer); --prefix-mode input feeds only "
            "the (m, D) input vectors, so a deep prefix is exported baked. Use --prefix-mode baked (the default)."
        )
    models: dict[str, dict] = {}

    graph = make_text_encoder(clip, loaded.prefix_weights if baked else None, not baked, m)
    # The graph runs CLIP's submodules directly: the PEFT hook must not shift the ids a second time.
    spec = text_encoder_spec(TEXT_ENCODER, width, graph.output_names[1], width, ranges, prefix_len=0 if baked else m)
    reference = PeftTextEncoderReference(loaded.text_encoder, spec.output_names, prefix_as_input=not baked)
    feeds = text_feeds(loaded, spec, with_prefix=not baked)
    models[TEXT_ENCODER] = _export_and_validate(graph, reference, spec, feeds, staging, options, progress, fast=fast)
    if not baked:
        np.save(staging / TEXT_ENCODER / "prefix.npy", loaded.prefix.float().numpy())

    negative_source = TEXT_ENCODER
    if not loaded.apply_to_negative_prompt:
        negative_source = NEGATIVE_TEXT_ENCODER
        graph = CLIPTextEncoderGraph(clip)
        spec = text_encoder_spec(NEGATIVE_TEXT_ENCODER, width, graph.output_names[1], width, ranges)
        reference = PeftTextEncoderReference(loaded.text_encoder, spec.output_names, plain=True)
        feeds = text_feeds(loaded, spec, with_prefix=False)
        models[NEGATIVE_TEXT_ENCODER] = _export_and_validate(graph, reference, spec, feeds, staging, options, progress)

    graph = UNetGraph(loaded.unet)
    spec = unet_spec(loaded.unet.config.cross_attention_dim, loaded.vae_factor, ranges, loaded.unet.config.in_channels)
    models[UNET] = _export_and_validate(graph, graph, spec, unet_feeds(loaded, spec), staging, options, progress)

    graph = VAEDecoderGraph(loaded.vae)
    spec = vae_decoder_spec(loaded.vae_factor, ranges, loaded.vae.config.latent_channels)
    models[VAE_DECODER] = _export_and_validate(graph, graph, spec, latent_feeds(spec), staging, options, progress)

    weights = loaded.adapter_dir / "adapter_model.safetensors"
    return {
        "format_version": FORMAT_VERSION,
        "prefix_mode": options.prefix_mode,
        "prefix_depth": "deep" if loaded.prefix_weights.is_deep else "shallow",
        "text_encoder_variant": options.text_encoder,
        "num_virtual_tokens": m,
        "hidden_size": width,
        "negative_prompt_encoder": negative_source,
        "vae_factor": loaded.vae_factor,
        "image_multiple": loaded.image_multiple,
        "vae_scaling_factor": float(loaded.vae.config.scaling_factor),
        "opset": options.opset,
        "exporter": options.exporter,
        "fp16": options.fp16,
        "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "ranges": {k: list(vars(getattr(ranges, k)).values()) for k in ("batch", "height", "width")},
        "models": models,
    }


def _export_and_validate(
    graph, reference, spec: ModelSpec, feeds, staging: Path, options, progress, fast: bool = False
) -> dict:
    """Export ``graph``; validate it against ``reference``. ``fast``: the graph holds ``apl::PrefixAttention`` nodes
    (exported with dynamo and the custom translation table; numerics checked on the PyTorch graph, see
    :data:`FAST_VALIDATION_NOTE`)."""
    path = staging / spec.name / "model.onnx"
    example = tuple(torch.from_numpy(feeds[0][t.name]) for t in spec.inputs)
    exporter = "dynamo" if fast else options.exporter
    translation = TEXT_ENCODER_TRANSLATIONS[FAST_TEXT_ENCODER]() if fast else None
    export_model(graph, example, spec, path, opset=options.opset, exporter=exporter, fp16=options.fp16,
                 progress=progress, custom_translation_table=translation)  # fmt: skip
    check_structure(path, spec)
    extra = {}
    if fast:
        nodes = sum(n.domain == OP_DOMAIN and n.op_type == OP_NAME for n in onnx.load(str(path)).graph.node)
        if nodes == 0:
            raise ExportError(f"{path}: the fast text encoder was exported without {OP_DOMAIN}::{OP_NAME} nodes.")
        report = compare_custom_op_graph(
            path, graph, reference, spec, feeds, FAST_FP32_ATOL, onnx_reference_ops(), FAST_VALIDATION_NOTE, progress
        )
        extra = {"exporter": exporter, "plugins": {f"{OP_DOMAIN}::{OP_NAME}": nodes}}
    else:
        report = compare_with_torch(path, reference, spec, feeds, tolerance(spec.name, options.fp16), progress)
    return {
        **extra,
        "path": f"{spec.name}/model.onnx",
        "inputs": [_tensor_json(t) for t in spec.inputs],
        "outputs": [_tensor_json(t) for t in spec.outputs],
        "profile": {k: [list(s) for s in v] for k, v in spec.profile().items()},
        "validation": report.as_dict(),
    }


def _tensor_json(tensor) -> dict:
    return {"name": tensor.name, "dtype": str(tensor.dtype), "dims": list(tensor.dims)}


# ----------------------------------------------------------------------------------------------
# Validation feeds: real prompts and random inputs at the profile's shapes
# ----------------------------------------------------------------------------------------------


def _batches(spec: ModelSpec, dim: str) -> list[int]:
    rng = spec.dim_ranges[dim]
    return sorted({max(rng.opt, 2), rng.max})  # > 1 first: the exporter must not specialise the batch


def text_feeds(loaded: LoadedPipeline, spec: ModelSpec, with_prefix: bool) -> list[dict[str, np.ndarray]]:
    """Real prompts (incl. one truncated by the prefix) and random token ids, at the opt and max batch."""
    generator = np.random.default_rng(0)
    tok = loaded.tokenizer
    feeds = []
    for batch in _batches(spec, "batch"):
        prompts = [VALIDATION_PROMPTS[i % len(VALIDATION_PROMPTS)] for i in range(batch)]
        real = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        random_ids = real.copy()
        for row in random_ids:
            n = int(generator.integers(1, 60))
            row[1 : 1 + n] = generator.integers(0, tok.bos_token_id - 1, n)
            row[1 + n :] = tok.eos_token_id
        feeds += [{"input_ids": real.astype(np.int32)}, {"input_ids": random_ids.astype(np.int32)}]
    if with_prefix:
        trained = loaded.prefix.float().numpy()
        other = generator.uniform(0, 1, trained.shape).astype(np.float32)
        feeds = [{**f, "prefix": p} for f in feeds for p in (trained, other)]
    return feeds


def unet_feeds(loaded: LoadedPipeline, spec: ModelSpec) -> list[dict[str, np.ndarray]]:
    """Random latents at the opt and min image size; real prompt embeddings and random ones; early/late t."""
    generator = np.random.default_rng(1)
    sample_spec, _, text_spec = spec.inputs
    feeds = []
    for level, t in (("opt", 999.0), ("min", 1.0)):
        dims = {k: getattr(r, level) for k, r in spec.dim_ranges.items()}
        dims["unet_batch"] = max(dims["unet_batch"], 2)
        sample = generator.standard_normal(sample_spec.shape_for(dims)).astype(np.float32)
        if level == "opt":
            ids = loaded.tokenizer(
                [VALIDATION_PROMPTS[i % 2] for i in range(dims["unet_batch"])],
                padding="max_length", max_length=77, truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            with torch.no_grad():
                hidden = loaded.text_encoder(input_ids=ids).last_hidden_state.numpy()
        else:
            hidden = generator.standard_normal(text_spec.shape_for(dims)).astype(np.float32)
        feeds.append({"sample": sample, "timestep": np.array([t], np.float32), "encoder_hidden_states": hidden})
    return feeds


def latent_feeds(spec: ModelSpec) -> list[dict[str, np.ndarray]]:
    generator = np.random.default_rng(2)
    feeds = []
    for level in ("opt", "min"):
        dims = {k: getattr(r, level) for k, r in spec.dim_ranges.items()}
        dims["batch"] = max(dims["batch"], 2)
        feeds.append({"latent_sample": generator.standard_normal(spec.inputs[0].shape_for(dims)).astype(np.float32)})
    return feeds


# ----------------------------------------------------------------------------------------------
# Folder layout (optimum-style)
# ----------------------------------------------------------------------------------------------


def write_layout(loaded: LoadedPipeline, staging: Path, manifest: dict) -> None:
    """Configs next to each model, tokenizer, scheduler and a diffusers-style ``model_index.json``."""
    for name in (TEXT_ENCODER, NEGATIVE_TEXT_ENCODER):
        if name in manifest["models"]:
            loaded.clip.config.to_json_file(staging / name / "config.json")
    loaded.unet.save_config(staging / UNET)
    loaded.vae.save_config(staging / VAE_DECODER)
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
