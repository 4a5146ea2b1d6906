"""One object per exported model of a Stable Diffusion 3 / FLUX.1 pipeline (as :mod:`.exported_models` for SD 1.x).

Each holds its graph (:mod:`.flow_graphs`), its PyTorch reference, its I/O spec (ONNX dynamic axes and the TensorRT
min/opt/max profile), its validation feeds and tolerance; :func:`flow_models` lists them for the exporter's loop.

Models (``<name>/model.onnx``):

==============================  =============================================================================
``text_encoder[_2][_3]``        each encoder, prefix baked where the adapter folder has one for it, else plain
``negative_text_encoder[_N]``   SD3 only, for each prefixed encoder: the plain encoder for the negative prompt
                                (SD3 prefixes the positive prompt only; none with ``apply_to_negative_prompt``)
``transformer``                 the MMDiT denoiser (SD3 batch = 2 x prompt batch: classifier-free guidance)
``vae_decoder``                 latents (already ``/ scaling + shift``) -> image
==============================  =============================================================================

Tolerances (max abs error, fp32 / fp16): text encoders 1e-4 / 2e-2 (as SD 1.x; measured <= 1e-6 on the tiny
models), transformer 1e-3 / 2e-2 (as the UNet), VAE decoder 3e-4 / 2e-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from apl_adapter.families import SD3, PipelineFamily
from apl_adapter.tuners.apl.prefix import PrefixWeights

from .exported_models import VALIDATION_PROMPTS, ExportedModel, Feeds, VAEDecoder, _batches
from .flow_graphs import FlowCLIPGraph, FluxTransformerGraph, PeftEncoderReference, SD3TransformerGraph, T5EncoderGraph
from .onnx_export import Exporter
from .specs import F32, I32, TEXT_SEQ_LEN, ModelSpec, ShapeRange, ShapeRanges, TensorSpec

TRANSFORMER, VAE_DECODER = "transformer", "vae_decoder"
#: the outputs each family's encode_prompt reads from its CLIP encoders
CLIP_OUTPUTS = {"sd3": ("penultimate_hidden_state", "text_embeds"), "flux": ("pooler_output",)}


@dataclass
class EncoderSlot:
    """One text encoder of the pipeline and its adapter, if the adapter folder has one for it.

    Attributes:
        name: the pipeline attribute (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``).
        kind: ``"clip"`` or ``"t5"``.
        model: the ``PeftModel`` when prefixed, else the plain transformers model.
        tokenizer: its tokenizer.
        prefix: every prefix tensor (``None``: plain).
        adapter_dir: where the adapter came from (``None``: plain).
        apply_to_negative_prompt: the adapter's setting (SD3: no plain negative encoder is needed when True).
    """

    name: str
    kind: str
    model: nn.Module
    tokenizer: object
    prefix: PrefixWeights | None = None
    adapter_dir: Path | None = None
    apply_to_negative_prompt: bool = False

    @property
    def width(self) -> int:
        config = self.model.config
        return int(config.d_model if self.kind == "t5" else config.hidden_size)


@dataclass
class LoadedFlowPipeline:
    """An SD3 / FLUX pipeline's components, adapters attached (see :func:`apl_export.flow_exporter.load_flow_pipeline`).

    ``max_sequence_length`` is the T5 window the graphs are exported at; ``selection`` the graphs to export (the
    encoders and the transformer outside it are not loaded: ``transformer`` is then ``None``, its config read from
    the folder)."""

    family: PipelineFamily
    class_name: str
    encoders: list[EncoderSlot]
    transformer: nn.Module | None
    transformer_config: Any
    vae: nn.Module
    scheduler: object
    max_sequence_length: int
    selection: tuple[str, ...]

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return native_size(self.family, self.transformer_config, self.vae_factor)

    @property
    def image_multiple(self) -> int:
        return image_multiple(self.family, self.transformer_config, self.vae_factor)


def native_size(family: PipelineFamily, transformer_config: Any, vae_factor: int) -> int:
    """The image side the pipeline makes by default (SD3: ``sample_size`` x VAE factor; FLUX: 128 x VAE factor,
    FluxPipeline's ``default_sample_size``). ``transformer_config``: the model's config or its ``config.json``."""
    if family is SD3:
        return int(transformer_config["sample_size"]) * vae_factor
    return 128 * vae_factor


def image_multiple(family: PipelineFamily, transformer_config: Any, vae_factor: int) -> int:
    """Image sides must divide by this: VAE factor x patch size (SD3) or x 2 (FLUX's 2 x 2 latent packing)."""
    if family is SD3:
        return vae_factor * int(transformer_config["patch_size"])
    return vae_factor * 2


def attention_score_bytes(
    family: PipelineFamily, transformer_config: Any, vae_factor: int, window: int, ranges: ShapeRanges
) -> int:
    """A lower bound on the largest tensor validating the transformer makes: one float32 joint-attention score
    matrix ``(batch x heads, S + T, S + T)`` at the opt image size and batch (what :func:`flow_transformer_feeds`
    runs), ``S`` image tokens, ``T`` text tokens (SD3: 77 + window, FLUX: window)."""
    height, width = ranges.resolved(native_size(family, transformer_config, vae_factor)).image_sides()
    side = vae_factor * (int(transformer_config["patch_size"]) if family is SD3 else 2)
    tokens = (height.opt // side) * (width.opt // side) + window + (TEXT_SEQ_LEN if family is SD3 else 0)
    batch = max(2 * ranges.batch.opt if family is SD3 else ranges.batch.opt, 2)
    return batch * int(transformer_config["num_attention_heads"]) * tokens * tokens * 4


# ----------------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------------


def flow_text_encoder_spec(name: str, slot: EncoderSlot, family: PipelineFamily, window: int, batch: ShapeRange):
    """CLIP: ``input_ids`` int32 ``(batch, 77)``; T5: ``(batch, window)``; outputs as :data:`CLIP_OUTPUTS` / T5's
    ``last_hidden_state`` ``(batch, window, D)``."""
    if slot.kind == "t5":
        inputs = (TensorSpec("input_ids", I32, ("batch", window)),)
        outputs = (TensorSpec("last_hidden_state", F32, ("batch", window, slot.width)),)
        return ModelSpec(name, inputs, outputs, {"batch": batch})
    projection = getattr(slot.model.config, "projection_dim", slot.width)
    dims = {
        "penultimate_hidden_state": ("batch", TEXT_SEQ_LEN, slot.width),
        "last_hidden_state": ("batch", TEXT_SEQ_LEN, slot.width),
        "text_embeds": ("batch", projection),
        "pooler_output": ("batch", slot.width),
    }
    outputs = tuple(TensorSpec(o, F32, dims[o]) for o in CLIP_OUTPUTS[family.name])
    return ModelSpec(name, (TensorSpec("input_ids", I32, ("batch", TEXT_SEQ_LEN)),), outputs, {"batch": batch})


def sd3_transformer_spec(config, vae_factor: int, window: int, ranges: ShapeRanges) -> ModelSpec:
    """``hidden_states`` ``(2B, C, h, w)``, ``encoder_hidden_states`` ``(2B, 77 + L, J)``, ``pooled_projections``
    ``(2B, P)``, ``timestep`` ``(2B,)`` -> ``model_output`` ``(2B, C_out, h, w)``."""
    height, width = ranges.image_sides()
    latent = ("transformer_batch", config.in_channels, "latent_height", "latent_width")
    inputs = (
        TensorSpec("hidden_states", F32, latent),
        TensorSpec(
            "encoder_hidden_states", F32, ("transformer_batch", TEXT_SEQ_LEN + window, config.joint_attention_dim)
        ),
        TensorSpec("pooled_projections", F32, ("transformer_batch", config.pooled_projection_dim)),
        TensorSpec("timestep", F32, ("transformer_batch",)),
    )
    out_channels = config.out_channels or config.in_channels
    outputs = (TensorSpec("model_output", F32, ("transformer_batch", out_channels, "latent_height", "latent_width")),)
    dims = {
        "transformer_batch": ranges.batch.scaled(2),
        "latent_height": height.divided(vae_factor),
        "latent_width": width.divided(vae_factor),
    }
    return ModelSpec(TRANSFORMER, inputs, outputs, dims)


def flux_transformer_spec(config, vae_factor: int, window: int, ranges: ShapeRanges) -> ModelSpec:
    """``hidden_states`` ``(B, S, C)``, ``encoder_hidden_states`` ``(B, L, J)``, ``pooled_projections`` ``(B, P)``,
    ``timestep`` ``(B,)``, ``img_ids`` ``(S, 3)``, ``txt_ids`` ``(L, 3)`` [, ``guidance`` ``(B,)``] ->
    ``model_output`` ``(B, S, C_out)``, with ``S = (H / f / 2) * (W / f / 2)`` packed latent tokens."""
    height, width = ranges.image_sides()
    side = 2 * vae_factor
    tokens = ShapeRange(*((getattr(height, k) // side) * (getattr(width, k) // side) for k in ("min", "opt", "max")))
    inputs = [
        TensorSpec("hidden_states", F32, ("batch", "latent_tokens", config.in_channels)),
        TensorSpec("encoder_hidden_states", F32, ("batch", window, config.joint_attention_dim)),
        TensorSpec("pooled_projections", F32, ("batch", config.pooled_projection_dim)),
        TensorSpec("timestep", F32, ("batch",)),
        TensorSpec("img_ids", F32, ("latent_tokens", 3)),
        TensorSpec("txt_ids", F32, (window, 3)),
    ]
    if config.guidance_embeds:
        inputs.append(TensorSpec("guidance", F32, ("batch",)))
    out_channels = config.out_channels or config.in_channels
    outputs = (TensorSpec("model_output", F32, ("batch", "latent_tokens", out_channels)),)
    return ModelSpec(TRANSFORMER, tuple(inputs), outputs, {"batch": ranges.batch, "latent_tokens": tokens})


# ----------------------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------------------


class FlowTextEncoder(ExportedModel):
    """One SD3 / FLUX text encoder, prefix baked (or plain: no adapter for it, or the negative prompt's encoder)."""

    fp32_atol = 1e-4

    def __init__(self, loaded: LoadedFlowPipeline, slot: EncoderSlot, ranges: ShapeRanges, negative: bool) -> None:
        self.name = f"negative_{slot.name}" if negative else slot.name
        self.slot = slot
        prefix = None if negative else slot.prefix
        family, window = loaded.family, loaded.max_sequence_length
        spec = flow_text_encoder_spec(self.name, slot, family, window, ranges.batch)
        if slot.kind == "t5":
            graph: nn.Module = T5EncoderGraph(slot.model, prefix)
        else:
            graph = FlowCLIPGraph(slot.model, prefix, CLIP_OUTPUTS[family.name])
        reference = PeftEncoderReference(slot.model, tuple(spec.output_names), plain=negative)
        super().__init__(loaded, graph, reference, spec)  # type: ignore[arg-type]

    def feeds(self) -> Feeds:
        length = self.spec.inputs[0].dims[1]
        return flow_text_feeds(self.slot, self.spec, int(length))

    def save_files(self, folder: Path) -> None:
        self.slot.model.config.to_json_file(folder / "config.json")


class FlowTransformer(ExportedModel):
    """The MMDiT denoiser. Exported with the dynamo exporter whatever ``--exporter`` says: TorchScript tracing has
    no ``aten::rms_norm`` (diffusers' RMSNorm), which both transformers use."""

    name = TRANSFORMER
    fp32_atol = 1e-3

    def __init__(self, loaded: LoadedFlowPipeline, ranges: ShapeRanges) -> None:
        config, window = loaded.transformer_config, loaded.max_sequence_length
        if loaded.family is SD3:
            graph: nn.Module = SD3TransformerGraph(loaded.transformer)
            spec = sd3_transformer_spec(config, loaded.vae_factor, window, ranges)
        else:
            graph = FluxTransformerGraph(loaded.transformer)
            spec = flux_transformer_spec(config, loaded.vae_factor, window, ranges)
        super().__init__(loaded, graph, graph, spec)  # type: ignore[arg-type]
        self.sides = ranges.image_sides()

    def onnx_exporter(self, requested: Exporter) -> Exporter:
        return "dynamo"

    def manifest_extras(self, path: Path, exporter: Exporter) -> dict:
        return {"exporter": exporter}  # dynamo, whatever --exporter said

    def feeds(self) -> Feeds:
        return flow_transformer_feeds(self.loaded, self.spec, self.sides)  # type: ignore[arg-type]

    def save_files(self, folder: Path) -> None:
        self.loaded.transformer.save_config(folder)  # type: ignore[union-attr]  # loaded when selected


def flow_models(loaded: LoadedFlowPipeline, ranges: ShapeRanges) -> list[ExportedModel]:
    """The models to export, in manifest order: encoders, SD3's plain negative encoders, transformer, VAE decoder
    (those of ``loaded.selection``; the loaded encoders are the selected ones)."""
    models: list[ExportedModel] = [FlowTextEncoder(loaded, slot, ranges, negative=False) for slot in loaded.encoders]
    if loaded.family.negative_in_encode_prompt:
        models += [
            FlowTextEncoder(loaded, slot, ranges, negative=True)
            for slot in loaded.encoders
            if slot.prefix is not None and not slot.apply_to_negative_prompt
        ]
    if TRANSFORMER in loaded.selection:
        models.append(FlowTransformer(loaded, ranges))
    if VAE_DECODER in loaded.selection:
        models.append(VAEDecoder(loaded, ranges))  # type: ignore[arg-type]
    return models


def negative_prompt_encoders(loaded: LoadedFlowPipeline) -> dict[str, str] | None:
    """``{encoder: the model that encodes the negative prompt for it}`` (SD3); ``None`` for FLUX (no negative
    branch in its encode_prompt)."""
    if not loaded.family.negative_in_encode_prompt:
        return None
    prefixed = {slot.name for slot in loaded.encoders if slot.prefix is not None and not slot.apply_to_negative_prompt}
    return {slot.name: f"negative_{slot.name}" if slot.name in prefixed else slot.name for slot in loaded.encoders}


# ----------------------------------------------------------------------------------------------------------------
# Validation feeds
# ----------------------------------------------------------------------------------------------------------------


def flow_text_feeds(slot: EncoderSlot, spec: ModelSpec, length: int) -> Feeds:
    """Real prompts (one cut by the prefix) and random ids ending in EOS then padding, at the opt and max batch."""
    generator = np.random.default_rng(0)
    tok = slot.tokenizer
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id)
    first_free = 3 if slot.kind == "t5" else 0  # T5: <pad> 0, </s> 1, <unk> 2
    last = (len(tok) if slot.kind == "t5" else tok.bos_token_id) - 1
    feeds = []
    for batch in _batches(spec, "batch"):
        prompts = [VALIDATION_PROMPTS[i % len(VALIDATION_PROMPTS)] for i in range(batch)]
        real = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
        random_ids = real.copy()
        start = 0 if slot.kind == "t5" else 1  # CLIP keeps its BOS
        for row in random_ids:
            n = int(generator.integers(1, length - start - 1))
            row[start : start + n] = generator.integers(first_free, last, n)
            row[start + n] = eos
            row[start + n + 1 :] = pad if slot.kind == "t5" else eos
        feeds += [{"input_ids": real.astype(np.int32)}, {"input_ids": random_ids.astype(np.int32)}]
    return feeds


def flux_image_ids(latent_height: int, latent_width: int) -> np.ndarray:
    """``(h/2 * w/2, 3)`` float32 ids ``[0, row, column]`` of the packed latent tokens, as FluxPipeline makes them."""
    rows, cols = latent_height // 2, latent_width // 2
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def flow_transformer_feeds(loaded: LoadedFlowPipeline, spec: ModelSpec, sides: tuple[ShapeRange, ShapeRange]) -> Feeds:
    """Random latents and text states at the opt and the min image size; early and late timesteps (SD3 0..1000,
    FLUX 0..1 as their pipelines pass them); FLUX's ids as FluxPipeline builds them, guidance 3.5 / 1."""
    generator = np.random.default_rng(1)
    feeds = []
    for level, t in (("opt", 0.999), ("min", 0.02)):
        dims = {k: getattr(r, level) for k, r in spec.dim_ranges.items()}
        batch_dim = "transformer_batch" if "transformer_batch" in dims else "batch"
        dims[batch_dim] = max(dims[batch_dim], 2)  # > 1: the exporter must not specialise the batch
        batch = dims[batch_dim]
        feed = {}
        for tensor in spec.inputs:
            if tensor.name == "timestep":
                scale = 1000.0 if loaded.family is SD3 else 1.0
                feed["timestep"] = np.full((batch,), t * scale, np.float32)
            elif tensor.name == "guidance":
                feed["guidance"] = np.full((batch,), 3.5 if level == "opt" else 1.0, np.float32)
            elif tensor.name == "txt_ids":
                feed["txt_ids"] = np.zeros(tensor.shape_for(dims), np.float32)
            elif tensor.name == "img_ids":
                height, width = (getattr(r, level) // loaded.vae_factor for r in sides)
                feed["img_ids"] = flux_image_ids(height, width)
            else:
                feed[tensor.name] = generator.standard_normal(tensor.shape_for(dims)).astype(np.float32)
        feeds.append(feed)
    return feeds
