"""One object per exported model, as TensorRT's demo/Diffusion has one class per model.

Each holds every per-model fact: the ``graph`` exported to ONNX (:mod:`.modules`), the PyTorch ``reference`` its ONNX
file is checked against, its ``spec`` (names, dtypes, dynamic dims and their ranges: the ONNX dynamic axes and the
TensorRT min/opt/max profile, which the manifest carries to :mod:`.engines` and :mod:`.triton`), its validation
``feeds``, its tolerance, and the files written next to its ``model.onnx``. :func:`pipeline_models` lists them;
the exporter loops over that list.

Validation tolerances are absolute, on the maximum error over every element (fp16: :data:`FP16_ATOL` for all; the
PyTorch side always runs in fp32):

==========================  ======  ======
model                       fp32    fp16
==========================  ======  ======
text encoder (standard)     1e-4    2e-2
text encoder (fast)         1e-5    --
negative text encoder       1e-4    2e-2
UNet                        1e-3    2e-2
VAE decoder                 3e-4    2e-2
==========================  ======  ======

The fp16 bounds are loose on purpose: fp16 activations carry ~1e-3 relative error per op; these bounds catch a wrong
graph, not rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from apl_adapter.tuners.apl.prefix import PrefixWeights

from .errors import ExportError
from .modules import CLIPTextEncoderGraph, UNetGraph, VAEDecoderGraph, make_standard_text_encoder
from .onnx_export import Exporter
from .specs import ModelSpec, ShapeRanges, text_encoder_spec, unet_spec, vae_decoder_spec
from .trt_plugin.fast_encoder import make_fast_text_encoder
from .trt_plugin.onnx_op import OP_DOMAIN, OP_NAME, onnx_reference_ops, onnx_translation_table
from .validate import ValidationReport, compare_custom_op_graph, compare_with_torch

TEXT_ENCODER, NEGATIVE_TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "negative_text_encoder", "unet", "vae_decoder"
FP16_ATOL = 2e-2
# Prompts for the "real input" validation feeds: with and without a person, short and truncated.
VALIDATION_PROMPTS = (
    "a photo of Ann Lee",
    "a red cube on a wooden table",
    "a close-up portrait of Zorblax Quentaro smiling, studio light, " + "very detailed " * 20,
    "",
)
Feeds = list[dict[str, np.ndarray]]
Progress = Callable[[str], None]


@dataclass
class LoadedPipeline:
    """The PyTorch pipeline every exported model is cut from (see :func:`apl_export.exporter.load_pipeline`)."""

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
# The models
# ----------------------------------------------------------------------------------------------


class ExportedModel(ABC):
    """One model of the exported pipeline, written as ``<name>/model.onnx`` next to its config."""

    name: str
    fp32_atol: float

    def __init__(self, loaded: LoadedPipeline, graph: torch.nn.Module, reference: torch.nn.Module, spec: ModelSpec):
        self.loaded = loaded
        self.graph = graph
        self.reference = reference
        self.spec = spec

    @abstractmethod
    def feeds(self) -> Feeds:
        """Validation inputs at the spec's profile shapes (the first is also the export's example input)."""

    @abstractmethod
    def save_files(self, folder: Path) -> None:
        """Write what the runtime needs next to ``model.onnx`` (its config)."""

    def atol(self, fp16: bool) -> float:
        return FP16_ATOL if fp16 else self.fp32_atol

    def onnx_exporter(self, requested: Exporter) -> Exporter:
        """The ONNX exporter this model is exported with (``--exporter`` unless the graph needs another)."""
        return requested

    def translation_table(self) -> dict | None:
        """``custom_translation_table`` for the dynamo exporter; None: no custom ops."""
        return None

    def manifest_extras(self, path: Path, exporter: Exporter) -> dict:
        """Manifest keys only this model has, read from its exported ONNX file."""
        return {}

    def validate(self, path: Path, feeds: Feeds, fp16: bool, progress: Progress) -> ValidationReport:
        """Compare the ONNX file with the reference on ``feeds``; raises :class:`ValidationError` beyond tolerance."""
        return compare_with_torch(path, self.reference, self.spec, feeds, self.atol(fp16), progress)


class TextEncoder(ExportedModel):
    """The prefixed text encoder, the only one that takes the user's prompt: prefix baked, or a second input."""

    name = TEXT_ENCODER
    fp32_atol = 1e-4
    make_graph: Callable[..., torch.nn.Module] = staticmethod(make_standard_text_encoder)

    def __init__(self, loaded: LoadedPipeline, ranges: ShapeRanges, baked: bool) -> None:
        width, m = loaded.clip.config.hidden_size, loaded.prefix.shape[0]
        hide_rows = loaded.prefix_weights is not None and loaded.prefix_weights.hide_rows
        graph = self.make_graph(loaded.clip, loaded.prefix_weights if baked else None, not baked, m, hide_rows)
        # The graph runs CLIP's submodules directly: the PEFT hook must not shift the ids a second time.
        spec = text_encoder_spec(self.name, width, graph.output_names[1], width, ranges, prefix_len=0 if baked else m)
        reference = PeftTextEncoderReference(loaded.text_encoder, spec.output_names, prefix_as_input=not baked)
        super().__init__(loaded, graph, reference, spec)
        self.baked = baked

    def feeds(self) -> Feeds:
        return text_feeds(self.loaded, self.spec, with_prefix=not self.baked)

    def save_files(self, folder: Path) -> None:
        self.loaded.clip.config.to_json_file(folder / "config.json")
        if not self.baked:  # the trained prefix, fed by the runtime
            np.save(folder / "prefix.npy", self.loaded.prefix.float().numpy())


FAST_VALIDATION_NOTE = (
    f"onnxruntime has no kernel for the custom {OP_DOMAIN}::{OP_NAME} node, so instead of onnxruntime the ONNX file "
    "was run by onnx.reference.ReferenceEvaluator with a NumPy implementation of that node "
    "(apl_export.trt_plugin.prefix_attention_numpy), and the exported PyTorch module (FastCLIPTextEncoderGraph) "
    "was run too; both against the adapter's PeftModel forward. The TensorRT plugin's CUDA enqueue is not run here."
)


class FastTextEncoder(TextEncoder):
    """The prefixed text encoder with one ``apl::PrefixAttention`` node per layer (a TensorRT plugin,
    :mod:`apl_export.trt_plugin`); onnxruntime cannot run that node, so it is validated without it. fp32 only."""

    fp32_atol = 1e-5
    make_graph = staticmethod(make_fast_text_encoder)

    def atol(self, fp16: bool) -> float:
        return self.fp32_atol  # fp16 is refused before export (see check_text_encoder_options)

    def onnx_exporter(self, requested: Exporter) -> Exporter:
        return "dynamo"  # only dynamo takes the custom node's translation table

    def translation_table(self) -> dict | None:
        return onnx_translation_table()

    def manifest_extras(self, path: Path, exporter: Exporter) -> dict:
        nodes = sum(n.domain == OP_DOMAIN and n.op_type == OP_NAME for n in onnx.load(str(path)).graph.node)
        if nodes == 0:
            raise ExportError(f"{path}: the fast text encoder was exported without {OP_DOMAIN}::{OP_NAME} nodes.")
        return {"exporter": exporter, "plugins": {f"{OP_DOMAIN}::{OP_NAME}": nodes}}

    def validate(self, path: Path, feeds: Feeds, fp16: bool, progress: Progress) -> ValidationReport:
        """The ONNX file run by onnx's reference evaluator (the node in NumPy), and the exported PyTorch graph."""
        return compare_custom_op_graph(
            path, self.graph, self.reference, self.spec, feeds, self.atol(fp16), onnx_reference_ops(),
            FAST_VALIDATION_NOTE, progress,
        )  # fmt: skip


class NegativeTextEncoder(ExportedModel):
    """The plain text encoder, for the negative (or empty) prompt: the paper prefixes the positive prompt only."""

    name = NEGATIVE_TEXT_ENCODER
    fp32_atol = 1e-4

    def __init__(self, loaded: LoadedPipeline, ranges: ShapeRanges) -> None:
        width = loaded.clip.config.hidden_size
        graph = CLIPTextEncoderGraph(loaded.clip)
        spec = text_encoder_spec(self.name, width, graph.output_names[1], width, ranges)
        reference = PeftTextEncoderReference(loaded.text_encoder, spec.output_names, plain=True)
        super().__init__(loaded, graph, reference, spec)

    def feeds(self) -> Feeds:
        return text_feeds(self.loaded, self.spec, with_prefix=False)

    def save_files(self, folder: Path) -> None:
        self.loaded.clip.config.to_json_file(folder / "config.json")


class UNet(ExportedModel):
    name = UNET
    fp32_atol = 1e-3

    def __init__(self, loaded: LoadedPipeline, ranges: ShapeRanges) -> None:
        config = loaded.unet.config
        graph = UNetGraph(loaded.unet)
        spec = unet_spec(config.cross_attention_dim, loaded.vae_factor, ranges, config.in_channels)
        super().__init__(loaded, graph, graph, spec)

    def feeds(self) -> Feeds:
        return unet_feeds(self.loaded, self.spec)

    def save_files(self, folder: Path) -> None:
        self.loaded.unet.save_config(folder)


class VAEDecoder(ExportedModel):
    name = VAE_DECODER
    fp32_atol = 3e-4

    def __init__(self, loaded: LoadedPipeline, ranges: ShapeRanges) -> None:
        graph = VAEDecoderGraph(loaded.vae)
        spec = vae_decoder_spec(loaded.vae_factor, ranges, loaded.vae.config.latent_channels)
        super().__init__(loaded, graph, graph, spec)

    def feeds(self) -> Feeds:
        return latent_feeds(self.spec)

    def save_files(self, folder: Path) -> None:
        self.loaded.vae.save_config(folder)


# The prefixed text encoder's graph, by --text-encoder. "fast": the prefix's per-layer keys/values are graph
# constants and each layer's attention is one apl::PrefixAttention node; onnxruntime cannot run that node.
TEXT_ENCODER_VARIANTS: dict[str, type[TextEncoder]] = {"standard": TextEncoder, "fast": FastTextEncoder}
FAST_TEXT_ENCODER = "fast"


def check_text_encoder_options(loaded: LoadedPipeline, variant: str, baked: bool, fp16: bool, triton: bool) -> None:
    """Refuse, before exporting anything, the text-encoder settings that cannot be exported or served."""
    if variant not in TEXT_ENCODER_VARIANTS:
        raise ExportError(
            f"--text-encoder {variant!r} is not available in this build; choose one of {sorted(TEXT_ENCODER_VARIANTS)}."
        )
    fast = variant == FAST_TEXT_ENCODER
    if fast and fp16:
        raise ExportError(
            "--text-encoder fast is exported and validated in fp32 only (onnxruntime cannot check an fp16 "
            "conversion of its custom nodes); drop --fp16 or use --text-encoder standard."
        )
    if fast and triton:
        raise ExportError(
            "--triton cannot serve --text-encoder fast: its apl::PrefixAttention node is a Python TensorRT plugin, "
            "which Triton's TensorRT backend cannot load, and onnxruntime cannot run it; use --text-encoder standard."
        )
    if loaded.prefix_weights.is_deep and not baked:
        raise ExportError(
            "This adapter is a deep prefix (keys and values at every encoder layer); --prefix-mode input feeds only "
            "the (m, D) input vectors, so a deep prefix is exported baked. Use --prefix-mode baked (the default)."
        )


def pipeline_models(loaded: LoadedPipeline, ranges: ShapeRanges, variant: str, baked: bool) -> list[ExportedModel]:
    """The models to export, in manifest order. An adapter saved with ``apply_to_negative_prompt=True`` prefixes the
    negative prompt too, so it needs no plain encoder."""
    models: list[ExportedModel] = [TEXT_ENCODER_VARIANTS[variant](loaded, ranges, baked)]
    if not loaded.apply_to_negative_prompt:
        models.append(NegativeTextEncoder(loaded, ranges))
    return [*models, UNet(loaded, ranges), VAEDecoder(loaded, ranges)]


# ----------------------------------------------------------------------------------------------
# Validation feeds: real prompts and random inputs at the profile's shapes
# ----------------------------------------------------------------------------------------------


def _batches(spec: ModelSpec, dim: str) -> list[int]:
    rng = spec.dim_ranges[dim]
    return sorted({max(rng.opt, 2), rng.max})  # > 1 first: the exporter must not specialise the batch


def text_feeds(loaded: LoadedPipeline, spec: ModelSpec, with_prefix: bool) -> Feeds:
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


def unet_feeds(loaded: LoadedPipeline, spec: ModelSpec) -> Feeds:
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


def latent_feeds(spec: ModelSpec) -> Feeds:
    generator = np.random.default_rng(2)
    feeds = []
    for level in ("opt", "min"):
        dims = {k: getattr(r, level) for k, r in spec.dim_ranges.items()}
        dims["batch"] = max(dims["batch"], 2)
        feeds.append({"latent_sample": generator.standard_normal(spec.inputs[0].shape_for(dims)).astype(np.float32)})
    return feeds
