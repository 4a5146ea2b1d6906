"""The graphs of Stable Diffusion 3 / FLUX.1 exports: ``nn.Module`` wrappers with plain tensor signatures.

Text encoders take int32 ``input_ids`` only; a prefix is a constant of the graph (baked), so no caller can encode a
prompt without it. Each gives what the pipeline's ``encode_prompt`` reads:

- SD3 CLIP-L / CLIP-G (``CLIPTextModelWithProjection``): ``penultimate_hidden_state`` ``(B, 77, D)`` (the
  second-to-last layer's output, no final layer norm: ``hidden_states[-2]``) and ``text_embeds`` ``(B, P)``;
- FLUX CLIP (``CLIPTextModel``): ``pooler_output`` ``(B, D)`` only;
- T5 (both): ``last_hidden_state`` ``(B, L, D)`` at the pipeline's window ``L`` (256 / 512); the prefix takes
  positions ``0..m-1`` and the window keeps its length (:func:`~apl_adapter.tuners.apl.prefix.insert_t5_prefix_ids`).

The CLIP graphs run :class:`~apl_adapter.tuners.apl.prefixed_encoder.PrefixedCLIPEncoder` (a deep prefix as its
per-layer keys / values, plain attention); the T5 graph runs T5's own blocks on the prefixed embeddings. The
references (:class:`PeftEncoderReference`) are the adapters' own PyTorch forwards.

The denoisers: :class:`SD3TransformerGraph` and :class:`FluxTransformerGraph` call diffusers' transformers with
positional tensors and ``return_dict=False``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from apl_adapter.tuners.apl.prefix import (
    PrefixWeights,
    base_model_of,
    insert_t5_prefix_ids,
    prepend_prefix,
    t5_eos_token_id,
)
from apl_adapter.tuners.apl.prefixed_encoder import PrefixedCLIPEncoder, PrefixState

from .errors import ExportError

#: what each CLIP output name reads from an encoder's result
CLIP_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "text_embeds", "pooler_output")


def _check_width(prefix: PrefixWeights, width: int, what: str) -> None:
    if prefix.embeds.shape[1] != width:
        raise ExportError(
            f"The APL prefix has shape {tuple(prefix.embeds.shape)} but {what} has width {width}; export an adapter "
            "trained for this encoder."
        )


class FlowCLIPGraph(nn.Module):
    """A CLIP text encoder of SD3 / FLUX: int32 ``input_ids`` ``(B, 77)`` -> the outputs named in ``outputs``.

    ``prefix``: ``None`` (the plain encoder), a shallow prefix (spliced at positions ``1..m``, all 77 positions in one
    causal pass) or a deep one (its per-layer keys / values and hidden states are graph constants; positions
    ``m+1..76`` run). ``outputs`` picks from :data:`CLIP_OUTPUTS`, in order.
    """

    def __init__(self, text_encoder: nn.Module, prefix: PrefixWeights | None, outputs: tuple[str, ...]) -> None:
        super().__init__()
        unknown = [name for name in outputs if name not in CLIP_OUTPUTS]
        if unknown:
            raise ExportError(f"Unknown CLIP outputs {unknown}; choose from {CLIP_OUTPUTS}.")
        self.encoder = PrefixedCLIPEncoder(base_model_of(text_encoder), use_kernel=False)
        self.output_names = outputs
        self.deep = prefix is not None and prefix.is_deep
        self.hide_rows = prefix is not None and prefix.hide_rows
        self.num_layers = self.encoder.config.num_hidden_layers
        if prefix is not None:
            _check_width(prefix, self.encoder.config.hidden_size, "this CLIP text encoder")
            prefix = prefix.detached()
        if self.deep and prefix is not None:
            with torch.no_grad():
                state = self.encoder.prefix_state(prefix)
            for i, (k, v) in enumerate(zip(state.keys, state.values)):
                self.register_buffer(f"prefix_key_{i}", k.clone(), persistent=False)
                self.register_buffer(f"prefix_value_{i}", v.clone(), persistent=False)
            for i, hidden in enumerate(state.hidden_states):
                self.register_buffer(f"prefix_hidden_{i}", hidden.clone(), persistent=False)
            self.prefix = None
        else:
            self.register_buffer("prefix", None if prefix is None else prefix.embeds, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``input_ids`` ``(B, 77)`` int32 -> one tensor per name of ``output_names``."""
        hidden = "penultimate_hidden_state" in self.output_names
        if self.deep:
            state = PrefixState(
                [getattr(self, f"prefix_key_{i}") for i in range(self.num_layers)],
                [getattr(self, f"prefix_value_{i}") for i in range(self.num_layers)],
                [getattr(self, f"prefix_hidden_{i}") for i in range(self.num_layers + 1)],
                hide_rows=self.hide_rows,
            )
            out = self.encoder.encode_with_state(input_ids, state, output_hidden_states=hidden)
        else:
            out = self.encoder.encode(input_ids, self.prefix, output_hidden_states=hidden, hide_rows=self.hide_rows)
        values = {
            "last_hidden_state": out.last_hidden_state,
            "penultimate_hidden_state": out.hidden_states[-2] if out.hidden_states else None,
            "text_embeds": out.text_embeds,
            "pooler_output": out.pooler_output,
        }
        return tuple(values[name] for name in self.output_names)


class T5EncoderGraph(nn.Module):
    """A T5 encoder (``T5EncoderModel``): int32 ``input_ids`` ``(B, L)`` -> ``last_hidden_state`` ``(B, L, D)``.

    With a (shallow) ``prefix`` ``(m, D)``: the ids shift right by ``m`` within the window (EOS kept), the prefix
    vectors replace the embeddings at ``0..m-1``, and T5's blocks run on that as ``T5Stack`` does with no attention
    mask (what SD3 and FLUX pass): the first block's relative position bias is shared by the others.
    """

    output_names = ("last_hidden_state",)

    def __init__(self, t5: nn.Module, prefix: PrefixWeights | None) -> None:
        super().__init__()
        model = base_model_of(t5)
        self.stack = model.encoder
        embed = self.stack.embed_tokens
        self.embed = getattr(embed, "base_layer", embed)  # the plain table under an APL wrapper
        config = model.config
        self.eos = t5_eos_token_id(config)
        self.pad = int(config.pad_token_id or 0)
        if prefix is not None:
            if prefix.is_deep:
                raise ExportError("A deep prefix on a T5 encoder does not exist (T5 prefixes are shallow only).")
            _check_width(prefix, int(config.d_model), "this T5 encoder")
        self.register_buffer("prefix", None if prefix is None else prefix.detached().embeds, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` ``(B, L)`` int32 -> ``(B, L, D)``."""
        ids = input_ids.to(torch.int64)
        if self.prefix is not None:
            ids = insert_t5_prefix_ids(ids, self.prefix.shape[0], self.eos, placeholder_id=self.pad)
        hidden = self.embed(ids)
        if self.prefix is not None:
            hidden = prepend_prefix(hidden, self.prefix)
        position_bias = None
        for block in self.stack.block:
            hidden, position_bias, _ = block(hidden, None, position_bias)
        return self.stack.final_layer_norm(hidden)


class PeftEncoderReference(nn.Module):
    """An encoder's own PyTorch forward (the ``PeftModel`` with its prefix, or the plain model), with the tensor
    signature of the exported graph: ``input_ids`` -> the outputs named in ``output_names``.

    ``plain``: the adapter is disabled (the reference of a negative-prompt encoder)."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...], plain: bool = False) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names
        self.plain = plain

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = "penultimate_hidden_state" in self.output_names
        disable = getattr(self.model, "disable_adapter", None)
        with disable() if self.plain and disable is not None else nullcontext():
            out = self.model(input_ids=input_ids.to(torch.int64), output_hidden_states=hidden)
        values = {
            "last_hidden_state": lambda: out.last_hidden_state,
            "penultimate_hidden_state": lambda: out.hidden_states[-2],
            "text_embeds": lambda: out.text_embeds,
            "pooler_output": lambda: out.pooler_output,
        }
        return tuple(values[name]() for name in self.output_names)


class SD3TransformerGraph(nn.Module):
    """``SD3Transformer2DModel``: ``hidden_states`` ``(N, C, h, w)``, ``encoder_hidden_states`` ``(N, 77 + L, J)``,
    ``pooled_projections`` ``(N, P)``, ``timestep`` ``(N,)`` float32 (0..1000) -> ``model_output`` ``(N, C, h, w)``.
    ``N`` is twice the prompt batch under classifier-free guidance."""

    output_names = ("model_output",)

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        out = self.transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False)
        return out[0]


class FluxTransformerGraph(nn.Module):
    """``FluxTransformer2DModel``: packed ``hidden_states`` ``(B, S, C)`` (``S = h/2 * w/2`` latent tokens),
    ``encoder_hidden_states`` ``(B, L, J)``, ``pooled_projections`` ``(B, P)``, ``timestep`` ``(B,)`` float32
    (0..1, as FluxPipeline passes it), ``img_ids`` ``(S, 3)``, ``txt_ids`` ``(L, 3)`` [, ``guidance`` ``(B,)``
    when the model is guidance-distilled (``guidance_embeds``, FLUX.1-dev)] -> ``model_output`` ``(B, S, C)``."""

    output_names = ("model_output",)

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
