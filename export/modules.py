"""Small ``nn.Module`` wrappers with plain tensor signatures: the graphs that get exported.

Each wrapper calls the diffusers / transformers submodules directly, so the traced graph holds no
hooks, no dataclass outputs and no Python control flow that depends on data.

The text encoder graphs run :class:`~apl_adapter.tuners.apl.prefixed_encoder.PrefixedCLIPEncoder`, the
re-implementation of CLIP's forward that the prefix K/V cache runs too: it lays the APL prefix out exactly as
:mod:`apl_adapter.tuners.apl` does (ids shifted by :func:`insert_prefix_ids`, the prefix at positions ``1..m``,
pooling at the shifted EOS).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from apl_adapter.tuners.apl.prefix import PrefixWeights, as_prefix_weights, clip_text_model_of
from apl_adapter.tuners.apl.prefixed_encoder import PrefixedCLIPEncoder, PrefixState

from .errors import ExportError


def _output_names(encoder: PrefixedCLIPEncoder) -> list[str]:
    return ["last_hidden_state", "pooler_output" if encoder.text_projection is None else "text_embeds"]


class CLIPTextEncoderGraph(nn.Module):
    """CLIP text encoder taking int32 ``input_ids`` ``(B, 77)``, optionally with an APL prefix.

    Modes:
        - ``prefix=None, prefix_as_input=False``: the plain encoder (for the negative prompt).
        - ``prefix`` given: *baked*; the prefix ``(m, D)`` is a constant of the graph and
          ``input_ids`` is the only input, so no caller can encode a prompt without it.
        - ``prefix_as_input=True``: the prefix ``(m, D)`` is the second input; ``num_virtual_tokens``
          fixes ``m`` (a new prefix of the same ``m`` needs no rebuild).

    ``hide_rows``: the adapter hides its rows (``APLConfig.hide_prefix_rows``): the graph drops them from
    ``last_hidden_state`` (:func:`~apl_adapter.tuners.apl.prefix.hide_prefix_rows`), after pooling.

    Outputs: ``last_hidden_state`` ``(B, 77, D)`` and ``pooler_output`` ``(B, D)`` (``text_embeds``
    ``(B, P)`` instead for ``CLIPTextModelWithProjection``), pooled at the (shifted) EOS. All 77 positions run in
    one causal pass (:meth:`PrefixedCLIPEncoder.encode`): plain attention, which onnxruntime and TensorRT run.
    """

    def __init__(
        self,
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
        prefix: torch.Tensor | None = None,
        prefix_as_input: bool = False,
        num_virtual_tokens: int | None = None,
        hide_rows: bool = False,
    ) -> None:
        super().__init__()
        if prefix is not None and prefix_as_input:
            raise ExportError("Give either a baked prefix or prefix_as_input=True, not both.")
        if prefix_as_input and not num_virtual_tokens:
            raise ExportError("prefix_as_input=True needs num_virtual_tokens (the m of the prefix input).")
        self.encoder = PrefixedCLIPEncoder(text_encoder)
        self.hidden_size = self.encoder.config.hidden_size
        self.prefix_as_input = prefix_as_input
        self.hide_rows = hide_rows
        if prefix is not None:
            if prefix.ndim != 2 or prefix.shape[1] != self.hidden_size:
                raise ExportError(
                    f"The APL prefix has shape {tuple(prefix.shape)} but this text encoder has width "
                    f"{self.hidden_size}; export an adapter trained for this encoder width."
                )
            self.register_buffer("prefix", prefix.detach().float().clone(), persistent=False)
            self.num_virtual_tokens = prefix.shape[0]
        else:
            self.prefix = None
            self.num_virtual_tokens = num_virtual_tokens or 0

    @property
    def output_names(self) -> list[str]:
        return _output_names(self.encoder)

    def forward(self, input_ids: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder.encode(input_ids, prefix if self.prefix_as_input else self.prefix, hide_rows=self.hide_rows)
        return out.last_hidden_state, out.pooled


class BakedPrefixStateGraph(nn.Module):
    """CLIP text encoder whose prefix is baked as its per-layer keys / values; int32 ``input_ids`` ``(B, 77)``.

    The prefix positions ``0..m`` are computed once, here, by
    :meth:`~apl_adapter.tuners.apl.prefixed_encoder.PrefixedCLIPEncoder.prefix_state` (deep rows included); the
    graph runs only positions ``m+1..76``, attending to the constant prefix K/V.
    ``use_kernel=False`` writes that attention as plain SDPA (onnxruntime and stock TensorRT run it): the graph
    of a *deep* prefix, whose per-layer rows the input-splicing :class:`CLIPTextEncoderGraph` cannot express.
    ``use_kernel=True`` is the fast variant (one ``apl::PrefixAttention`` node per layer, see ``trt_plugin``).

    Outputs as :class:`CLIPTextEncoderGraph` with a baked prefix: ``last_hidden_state`` ``(B, 77, D)`` and
    ``pooler_output`` ``(B, D)`` (``text_embeds`` for ``CLIPTextModelWithProjection``).
    """

    def __init__(self, text_encoder: nn.Module, prefix: torch.Tensor | PrefixWeights, use_kernel: bool) -> None:
        super().__init__()
        clip = clip_text_model_of(text_encoder)
        weights = as_prefix_weights(prefix).detached()
        if weights.embeds.shape[1] != clip.config.hidden_size:
            raise ExportError(
                f"The APL prefix has shape {tuple(weights.embeds.shape)} but this text encoder has width "
                f"{clip.config.hidden_size}; export an adapter trained for this encoder width."
            )
        if weights.is_deep and weights.keys.shape[0] != clip.config.num_hidden_layers:
            raise ExportError(
                f"The deep prefix has rows for {weights.keys.shape[0]} layers but this text encoder has "
                f"{clip.config.num_hidden_layers}; export it with the encoder it was trained for."
            )
        self.encoder = PrefixedCLIPEncoder(text_encoder, use_kernel=use_kernel)
        with torch.no_grad():
            state = self.encoder.prefix_state(weights)
        self.num_layers = len(state.keys)
        for i, (k, v) in enumerate(zip(state.keys, state.values)):
            self.register_buffer(f"prefix_key_{i}", k.detach().clone(), persistent=False)
            self.register_buffer(f"prefix_value_{i}", v.detach().clone(), persistent=False)
        self.register_buffer("prefix_hidden", state.hidden_states[-1].detach().clone(), persistent=False)
        self.hide_rows = weights.hide_rows

    @property
    def output_names(self) -> list[str]:
        return _output_names(self.encoder)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [getattr(self, f"prefix_key_{i}") for i in range(self.num_layers)]
        values = [getattr(self, f"prefix_value_{i}") for i in range(self.num_layers)]
        # Only the last layer's prefix hidden state is read (final layer norm); the others stay out of the graph.
        state = PrefixState(keys, values, [self.prefix_hidden], hide_rows=self.hide_rows)
        out = self.encoder.encode_with_state(input_ids, state)
        return out.last_hidden_state, out.pooled


def make_standard_text_encoder(
    clip: nn.Module,
    prefix: torch.Tensor | PrefixWeights | None,
    prefix_as_input: bool,
    m: int,
    hide_rows: bool = False,
) -> nn.Module:
    """The standard (onnxruntime- and TensorRT-ready) graph of the prefixed text encoder.

    A shallow or no prefix: :class:`CLIPTextEncoderGraph`. A deep prefix (baked only): :class:`BakedPrefixStateGraph`
    without the custom kernel. ``hide_rows``: the prefix input's adapter hides its rows (a baked
    :class:`PrefixWeights` says so itself)."""
    if prefix is not None and as_prefix_weights(prefix).is_deep:
        return BakedPrefixStateGraph(clip, prefix, use_kernel=False)
    if isinstance(prefix, PrefixWeights):
        return CLIPTextEncoderGraph(clip, prefix.embeds, prefix_as_input, m, hide_rows=prefix.hide_rows)
    return CLIPTextEncoderGraph(clip, prefix, prefix_as_input, m, hide_rows=hide_rows)


class UNetGraph(nn.Module):
    """``UNet2DConditionModel`` with a tensor signature.

    Inputs: ``sample`` ``(N, C, h, w)``, ``timestep`` ``(1,)`` float32 (broadcast over the batch),
    ``encoder_hidden_states`` ``(N, 77, D)``. Output: ``out_sample`` ``(N, C, h, w)``.
    ``N`` is twice the prompt batch under classifier-free guidance.
    """

    input_names = ("sample", "timestep", "encoder_hidden_states")
    output_names = ("out_sample",)

    def __init__(self, unet) -> None:
        super().__init__()
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ExportError(
                f"This UNet uses addition_embed_type={unet.config.addition_embed_type!r} (SDXL-style extra "
                "conditioning), which apl-export does not export yet; export a Stable Diffusion 1.x/2.x pipeline."
            )
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEDecoderGraph(nn.Module):
    """The VAE decoder: ``latent_sample`` ``(B, 4, h, w)`` (already divided by the scaling factor)
    to ``sample`` ``(B, 3, h * f, w * f)`` in [-1, 1], as ``AutoencoderKL.decode``."""

    input_names = ("latent_sample",)
    output_names = ("sample",)

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]
