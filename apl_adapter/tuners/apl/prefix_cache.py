"""A CLIP text encoder that computes the APL prefix once and then runs only the prompt positions.

CLIP's text encoder is causal, so the hidden states of BOS and the prefix (positions ``0..m``) never depend on the
prompt. :class:`CachedPrefixEncoder` computes, once per prefix, every layer's keys and values (and hidden states) at
those ``m + 1`` positions; each call then embeds only positions ``m+1..L-1`` and attends to the cached prefix K/V
plus its own keys with :func:`apl_adapter.ops.prefix_attention` (the fused kernel where built).

The result equals the full prefixed encoder (``[BOS][P1..Pm][prompt][EOS][pad]``, see
:func:`apl_adapter.tuners.apl.prefix.insert_prefix_ids`): last hidden state, pooled output, projected ``text_embeds``
and every layer's hidden states. The cache refreshes itself when the prefix tensor changes (a new tensor, or an in-place
update such as an optimizer step); :meth:`CachedPrefixEncoder.refresh` forces it (after changing encoder weights).

With gradients enabled and a prefix that requires grad (training), the prefix states are recomputed on every call
with autograd and the attention runs in PyTorch, so the encoder stays trainable, just not faster.

Example:

```python
>>> import torch
>>> from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder
>>> from apl_adapter.testing import tiny_clip_text_model
>>> text_model = tiny_clip_text_model()
>>> encoder = CachedPrefixEncoder(text_model, prefix=torch.rand(10, 32))
>>> ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
>>> out = encoder(ids, output_hidden_states=True)
>>> out.last_hidden_state.shape, out.pooler_output.shape, len(out.hidden_states)
(torch.Size([1, 77, 32]), torch.Size([1, 32]), 3)

```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextModelOutput

from ...errors import APLAdapterError
from ...ops import prefix_attention, prefix_attention_reference
from .layer import APLEmbedding
from .prefix import (
    PrefixWeights,
    as_prefix_weights,
    base_model_of,
    clip_eos_token_id,
    clip_text_model_of,
    insert_prefix_ids,
    splice_prefix,
    warn_if_prompt_truncated,
)

__all__ = ["CachedPrefixEncoder", "PrefixState", "prefix_layer_kv"]


def _plain(projection: nn.Module) -> nn.Module:
    """The projection itself, or the ``nn.Linear`` inside an :class:`~.layer.APLPrefixProjection`."""
    return getattr(projection, "base_layer", projection)


PrefixLike = torch.Tensor | PrefixWeights
PrefixSource = PrefixLike | Callable[[], PrefixLike | None]
#: per prefix tensor: its storage, offset, version counter, dtype, device and shape
Version = tuple[tuple[Any, ...], ...]
EncoderOutput = BaseModelOutputWithPooling | CLIPTextModelOutput | tuple[Any, ...]


@dataclass
class PrefixState:
    """What the encoder keeps per prefix: for positions ``0..m``, with ``m + 1 = P``.

    Attributes:
        keys, values: per layer, ``(1, H, P, Dh)`` - batch 1, shared by every request without a copy.
        hidden_states: the embedding output and each layer's output, ``num_layers + 1`` tensors ``(1, P, D)``.
        version: identifies the prefix tensor the state was computed from (its storage, version counter, dtype,
            device); ``None`` when computed with autograd (never reused).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden_states: list[torch.Tensor]
    version: Version | None


class CachedPrefixEncoder(nn.Module):
    """A drop-in for a prefixed ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` call, with the prefix cached.

    Args:
        text_encoder: a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` (plain, or wrapped by an
            APL adapter - the adapter's own prefix splicing is bypassed, its base embeddings are used).
        prefix: the ``(m, D)`` prefix vectors (a tensor or ``nn.Parameter``, tracked for in-place changes), a
            :class:`~.prefix.PrefixWeights` (a deep prefix: per-layer keys and values at ``1..m`` too), or a
            callable returning either (``None``: no prefix, the encoder runs unchanged).
        use_kernel: use the fused ``prefix_attention`` kernel where built (else the PyTorch reference).

    ``forward`` takes ``input_ids`` ``(B, L)`` as produced by the CLIP tokenizer (BOS first, ``L <= 77``) and returns
    what the wrapped model returns: ``BaseModelOutputWithPooling`` (``last_hidden_state (B, L', D)``,
    ``pooler_output (B, D)``) or ``CLIPTextModelOutput`` (``text_embeds``, ``last_hidden_state``) for the projection
    variant, with ``hidden_states`` (``num_layers + 1`` tensors) when ``output_hidden_states=True``.
    ``L' = min(L + m, 77)``.
    """

    def __init__(self, text_encoder: nn.Module, prefix: PrefixSource, use_kernel: bool = True) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_model: CLIPTextModel = clip_text_model_of(text_encoder)
        self.prefix = prefix
        self.use_kernel = use_kernel
        self._state: PrefixState | None = None

    @classmethod
    def from_adapter(cls, peft_model: nn.Module, use_kernel: bool = True) -> CachedPrefixEncoder:
        """The cached encoder for a PEFT-wrapped text encoder; follows its active adapter (and ``disable_adapter``)."""
        base = base_model_of(peft_model)
        embeddings = clip_text_model_of(base).embeddings
        if not isinstance(embeddings, APLEmbedding):
            raise APLAdapterError(
                "from_adapter needs a text encoder with an APL adapter (get_peft_model(..., APLConfig()))"
            )
        return cls(base, prefix=lambda: embeddings.active_prefix_weights, use_kernel=use_kernel)

    # What diffusers' encode_prompt reads from a text encoder besides calling it.
    @property
    def config(self) -> CLIPTextConfig:
        # clip_text_model_of accepted text_encoder in __init__: a CLIP text model, whose config this is
        return cast(CLIPTextConfig, self.text_encoder.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    # ------------------------------------------------------------------------------------------------------------
    # The prefix state
    # ------------------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Drop the cached prefix state; the next call recomputes it (needed after changing the encoder weights)."""
        self._state = None

    def current_prefix(self) -> PrefixWeights | None:
        prefix = self.prefix() if callable(self.prefix) else self.prefix
        return None if prefix is None else as_prefix_weights(prefix)

    @staticmethod
    def _version_of(prefix: PrefixWeights) -> Version:
        return tuple(
            (t.untyped_storage().data_ptr(), t.storage_offset(), t._version, t.dtype, t.device, tuple(t.shape))
            for t in prefix.tensors()
        )

    def prefix_state(self, prefix: PrefixLike) -> PrefixState:
        """The state for ``prefix``: cached, or computed now (with autograd when training the prefix)."""
        prefix = as_prefix_weights(prefix)
        track_grad = torch.is_grad_enabled() and any(t.requires_grad for t in prefix.tensors())
        if track_grad:
            return self._compute_state(prefix, version=None)
        version = self._version_of(prefix)
        if self._state is None or self._state.version != version:
            with torch.no_grad():
                self._state = self._compute_state(prefix, version)
        return self._state

    def _compute_state(self, prefix: PrefixWeights, version: Version | None) -> PrefixState:
        """Run the causal encoder on ``[BOS][P1..Pm]`` alone, keeping every layer's K/V and hidden states.

        A deep prefix replaces each layer's keys and values at ``1..m`` with its own rows before attention."""
        tm = self.text_model
        weight = tm.embeddings.token_embedding.weight
        m = prefix.num_virtual_tokens
        bos = weight[tm.config.bos_token_id][None]
        tokens = torch.cat([bos, prefix.embeds.to(device=weight.device, dtype=weight.dtype)], dim=0)
        hidden = (tokens + tm.embeddings.position_embedding.weight[: m + 1])[None]  # (1, P, D)
        empty = hidden.new_empty(1, self._heads, 0, self._head_dim)
        keys, values, states = [], [], [hidden]
        for index, layer in enumerate(self._layers):
            rows = None if prefix.keys is None or prefix.values is None else (prefix.keys[index], prefix.values[index])
            hidden, k, v = self._layer(layer, hidden, empty, empty, rows)
            keys.append(k)
            values.append(v)
            states.append(hidden)
        return PrefixState(keys, values, states, version)

    # ------------------------------------------------------------------------------------------------------------
    # The encoder
    # ------------------------------------------------------------------------------------------------------------

    @property
    def _heads(self) -> int:
        return self.text_model.config.num_attention_heads

    @property
    def _head_dim(self) -> int:
        return self.text_model.config.hidden_size // self._heads

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self._heads, self._head_dim).transpose(1, 2)  # (B, H, L, Dh)

    @property
    def _layers(self) -> list[CLIPEncoderLayer]:
        # nn.ModuleList is not generic: its items type as Module
        return cast("list[CLIPEncoderLayer]", list(self.text_model.encoder.layers))

    def _layer(
        self,
        layer: CLIPEncoderLayer,
        hidden: torch.Tensor,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
        deep_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ``CLIPEncoderLayer`` on a segment; returns (output, this segment's K, V).

        ``deep_rows``: ``(m, D)`` keys and values that replace the segment's own at its positions ``1..m`` (the
        ``[BOS][P1..Pm]`` segment of a deep prefix)."""
        attn = layer.self_attn
        batch, length, width = hidden.shape
        normed = layer.layer_norm1(hidden)
        # The plain projections: a deep adapter's wrappers act only inside the full prefixed forward.
        keys, values = _plain(attn.k_proj)(normed), _plain(attn.v_proj)(normed)
        if deep_rows is not None:
            keys, values = splice_prefix(keys, deep_rows[0]), splice_prefix(values, deep_rows[1])
        q = self._split_heads(attn.q_proj(normed))
        k = self._split_heads(keys)
        v = self._split_heads(values)
        attention = prefix_attention if self.use_kernel else prefix_attention_reference
        context = attention(q, k, v, k_prefix, v_prefix, causal=True, scale=attn.scale)
        hidden = hidden + attn.out_proj(context.transpose(1, 2).reshape(batch, length, width))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return hidden, k, v

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers' CLIPTextModel, applied to the shifted ids.
        if self.text_model.config.eos_token_id == 2:
            return ids.to(torch.int).argmax(dim=-1)
        return (ids.to(torch.int) == clip_eos_token_id(self.text_model.config)).int().argmax(dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused: Any,
    ) -> EncoderOutput:
        prefix = self.current_prefix()
        if prefix is None:
            plain: EncoderOutput = self.text_encoder(
                input_ids,
                attention_mask=attention_mask,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            )
            return plain
        if attention_mask is not None and not bool(attention_mask.all()):
            raise APLAdapterError(
                "CachedPrefixEncoder supports causal masking only (as Stable Diffusion uses CLIP); "
                "pass no attention_mask, or use the full encoder for padded masks."
            )
        config = self.text_model.config
        m = prefix.num_virtual_tokens
        warn_if_prompt_truncated(input_ids, m, clip_eos_token_id(config), config.max_position_embeddings)
        return self.encode_with_state(input_ids, self.prefix_state(prefix), output_hidden_states, return_dict)

    def encode_with_state(
        self, input_ids: torch.Tensor, state: PrefixState, output_hidden_states: bool = False, return_dict: bool = True
    ) -> EncoderOutput:
        """Encode with a given prefix state (what ``forward`` does after its cache lookup; exporters call it with
        the state's tensors as graph constants). No Python branch depends on tensor values: traceable."""
        tm = self.text_model
        m = state.hidden_states[0].shape[1] - 1  # the state covers positions 0..m
        ids = insert_prefix_ids(
            input_ids.view(-1, input_ids.shape[-1]),
            m,
            clip_eos_token_id(tm.config),
            max_positions=tm.config.max_position_embeddings,
        )
        batch, length = ids.shape

        positions = tm.embeddings.position_embedding.weight[m + 1 : length]
        hidden = tm.embeddings.token_embedding(ids[:, m + 1 :]) + positions  # (B, L' - P, D)
        per_layer = [hidden]
        for layer, k_prefix, v_prefix in zip(self._layers, state.keys, state.values):
            hidden, _, _ = self._layer(layer, hidden, k_prefix, v_prefix)
            per_layer.append(hidden)

        def full(prefix_part: torch.Tensor, request_part: torch.Tensor) -> torch.Tensor:
            return torch.cat([prefix_part.expand(batch, -1, -1), request_part], dim=1)

        last_hidden = tm.final_layer_norm(full(state.hidden_states[-1], hidden))
        rows = torch.arange(batch, device=last_hidden.device)
        pooled = last_hidden[rows, self._pool_index(ids).to(last_hidden.device)]
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(full(p, r) for p, r in zip(state.hidden_states, per_layer))

        result: CLIPTextModelOutput | BaseModelOutputWithPooling
        if isinstance(self.text_encoder, CLIPTextModelWithProjection):
            result = CLIPTextModelOutput(
                text_embeds=self.text_encoder.text_projection(pooled),
                last_hidden_state=last_hidden,
                hidden_states=hidden_states,
            )
        else:
            result = BaseModelOutputWithPooling(
                last_hidden_state=last_hidden, pooler_output=pooled, hidden_states=hidden_states
            )
        return result if return_dict else result.to_tuple()


def prefix_layer_kv(text_model: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a shallow prefix ``embeds`` ``(m, D)`` produces at positions ``1..m`` of every layer.

    Returns ``(keys, values)``, each ``(num_layers, m, D)``: the start of a deep prefix that computes exactly
    what the shallow one does. Computed by the cache, the one re-implementation of CLIP's layers.
    """
    with torch.no_grad():
        state = CachedPrefixEncoder(text_model, embeds.detach(), use_kernel=False).prefix_state(embeds.detach())

    def merged(per_layer: list[torch.Tensor]) -> torch.Tensor:  # (1, H, P, Dh) per layer -> (layers, m, D)
        return torch.stack([t[0, :, 1:].transpose(0, 1).reshape(t.shape[2] - 1, -1) for t in per_layer])

    return merged(state.keys).float(), merged(state.values).float()
