"""CLIP's text-encoder forward, re-implemented over the prefixed layout: the one copy the prefix K/V cache
(:mod:`.prefix_cache`) and the exported graphs (``apl_export.modules``, ``apl_export.trt_plugin``) share.

transformers' ``CLIPTextModel`` stays the reference (the adapter's hooked forward runs it). This copy exists because
the cache and the graphs need what that forward cannot give: each layer's keys and values at the prefix positions
``0..m``, and a forward over the prompt positions alone that attends to them (:func:`apl_adapter.ops.prefix_attention`,
one ``apl::PrefixAttention`` node per layer in the fast graph). The layout (ids, splice, EOS) comes from
:mod:`.prefix`.

- :meth:`PrefixedCLIPEncoder.prefix_state`: ``[BOS][P1..Pm]`` alone, keeping every layer's K/V and hidden states
  (a deep prefix's rows replace each layer's keys and values at ``1..m``);
- :meth:`PrefixedCLIPEncoder.encode_with_state`: the positions after the prefix, attending to such a state;
- :meth:`PrefixedCLIPEncoder.encode`: the whole prefixed sequence in one causal pass (a shallow prefix that is a
  graph input cannot be precomputed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextEmbeddings

from ...ops import prefix_attention, prefix_attention_reference
from .prefix import (
    PrefixWeights,
    clip_bos_token_id,
    clip_eos_token_id,
    clip_text_model_of,
    hide_prefix_rows,
    insert_prefix_ids,
    pool_index,
    splice_prefix,
)

__all__ = ["EncodedText", "PrefixState", "PrefixedCLIPEncoder", "Version", "prefix_layer_kv"]

#: per prefix tensor: its storage, offset, version counter, dtype, device and shape
Version = tuple[tuple[Any, ...], ...]


@dataclass
class PrefixState:
    """What a prefix gives at positions ``0..m``, with ``m + 1 = P``.

    Attributes:
        keys, values: per layer, ``(1, H, P, Dh)`` - batch 1, shared by every request without a copy.
        hidden_states: the embedding output and each layer's output, ``num_layers + 1`` tensors ``(1, P, D)``
            (the exported graphs keep only the last: the final layer norm reads it).
        version: identifies the prefix tensor the state was computed from (its storage, version counter, dtype,
            device); ``None`` when computed with autograd or not cached (never reused).
        hide_rows: the outputs drop the prefix's rows (:func:`~.prefix.hide_prefix_rows`), as the prefix asks.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden_states: list[torch.Tensor]
    version: Version | None = None
    hide_rows: bool = False


@dataclass
class EncodedText:
    """The encoder's outputs over all ``L'`` prefixed positions (the prefix's rows dropped where it hides them).

    Attributes:
        last_hidden_state: ``(B, L', D)``, after the final layer norm.
        pooler_output: ``(B, D)``, at :func:`~.prefix.pool_index`.
        text_embeds: ``(B, P)``, the projected pooled output (``None`` without a projection).
        hidden_states: the embedding output and each layer's output, when asked for.
    """

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    text_embeds: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None

    @property
    def pooled(self) -> torch.Tensor:
        """``text_embeds`` where the encoder has a projection, else ``pooler_output`` (what diffusers reads)."""
        return self.pooler_output if self.text_embeds is None else self.text_embeds


def _plain(projection: nn.Module) -> nn.Module:
    """The projection itself, or the ``nn.Linear`` inside an :class:`~.layer.APLPrefixProjection`."""
    return getattr(projection, "base_layer", projection)


class PrefixedCLIPEncoder(nn.Module):
    """CLIP's text encoder (``CLIPTextModel`` or ``CLIPTextModelWithProjection``) over the prefixed layout.

    Args:
        text_encoder: the transformers model, plain or wrapped by an APL adapter (the adapter's own splicing and
            deep rows are bypassed: the prefix is passed in).
        use_kernel: attend to cached prefix K/V with the fused ``prefix_attention`` (else the PyTorch reference).
    """

    def __init__(self, text_encoder: nn.Module, use_kernel: bool = True) -> None:
        super().__init__()
        self.text_model: CLIPTextModel = clip_text_model_of(text_encoder)
        self.text_projection: nn.Module | None = getattr(text_encoder, "text_projection", None)
        self.use_kernel = use_kernel

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    @property
    def embeddings(self) -> CLIPTextEmbeddings:
        """CLIP's embeddings, under an :class:`~.layer.APLEmbedding` when an adapter wraps them."""
        embeddings = self.text_model.embeddings
        return cast(CLIPTextEmbeddings, getattr(embeddings, "base_layer", embeddings))

    @property
    def layers(self) -> list[CLIPEncoderLayer]:
        # nn.ModuleList is not generic: its items type as Module
        return cast("list[CLIPEncoderLayer]", list(self.text_model.encoder.layers))

    # ------------------------------------------------------------------------------------------------------------
    # The three forwards
    # ------------------------------------------------------------------------------------------------------------

    def prefix_state(self, prefix: PrefixWeights, version: Version | None = None) -> PrefixState:
        """Run ``[BOS][P1..Pm]`` alone (it never sees the prompt: the encoder is causal)."""
        m = prefix.num_virtual_tokens
        weight = self.embeddings.token_embedding.weight
        ids = torch.full((1, 1 + m), clip_bos_token_id(self.config), dtype=torch.long, device=weight.device)
        hidden = self._embed(ids, start=0, prefix=prefix.embeds.to(weight.device))
        keys, values, states = [], [], [hidden]
        for index, layer in enumerate(self.layers):
            rows = None if prefix.keys is None or prefix.values is None else (prefix.keys[index], prefix.values[index])
            hidden, k, v = self._layer(layer, hidden, None, rows)
            keys.append(k)
            values.append(v)
            states.append(hidden)
        return PrefixState(keys, values, states, version, prefix.hide_rows)

    def encode_with_state(
        self, input_ids: torch.Tensor, state: PrefixState, output_hidden_states: bool = False
    ) -> EncodedText:
        """Prompt ids ``(B, L)`` (BOS first) against the state of their prefix: only positions ``m+1..L'-1`` run.

        No Python branch depends on tensor values: traceable (the graphs pass the state's tensors as constants)."""
        m = state.hidden_states[0].shape[1] - 1  # the state covers positions 0..m
        ids = self._prefixed_ids(input_ids, m)
        batch = ids.shape[0]
        hidden = self._embed(ids[:, m + 1 :], start=m + 1)  # (B, L' - P, D)
        per_layer = [hidden]
        for layer, k_prefix, v_prefix in zip(self.layers, state.keys, state.values):
            hidden, _, _ = self._layer(layer, hidden, (k_prefix, v_prefix))
            per_layer.append(hidden)

        def full(prefix_part: torch.Tensor, request_part: torch.Tensor) -> torch.Tensor:
            return torch.cat([prefix_part.expand(batch, -1, -1), request_part], dim=1)

        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(full(p, r) for p, r in zip(state.hidden_states, per_layer))
        hidden_of = m if state.hide_rows else 0
        return self._head(full(state.hidden_states[-1], hidden), ids, hidden_states, hidden_of)

    def encode(
        self,
        input_ids: torch.Tensor,
        prefix: torch.Tensor | None,
        output_hidden_states: bool = False,
        hide_rows: bool = False,
    ) -> EncodedText:
        """Prompt ids ``(B, L)`` with a shallow ``prefix`` ``(m, D)`` spliced in, all ``L'`` positions in one pass.

        ``prefix=None``: the plain encoder (the ids are not touched). ``hide_rows``: drop the prefix's rows from the
        outputs (the prefix's ``hide_rows``; a tensor prefix does not carry it)."""
        ids = input_ids.to(torch.int64) if prefix is None else self._prefixed_ids(input_ids, prefix.shape[0])
        hidden = self._embed(ids, start=0, prefix=prefix)
        per_layer = [hidden]
        for layer in self.layers:
            hidden, _, _ = self._layer(layer, hidden, None)
            per_layer.append(hidden)
        hidden_of = prefix.shape[0] if prefix is not None and hide_rows else 0
        return self._head(hidden, ids, tuple(per_layer) if output_hidden_states else None, hidden_of)

    # ------------------------------------------------------------------------------------------------------------
    # Their parts
    # ------------------------------------------------------------------------------------------------------------

    def _prefixed_ids(self, input_ids: torch.Tensor, m: int) -> torch.Tensor:
        ids = input_ids.to(torch.int64).view(-1, input_ids.shape[-1])
        return insert_prefix_ids(
            ids, m, clip_eos_token_id(self.config), max_positions=self.config.max_position_embeddings
        )

    def _embed(self, ids: torch.Tensor, start: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of ``ids`` (with ``prefix`` spliced in at ``1..m``) plus positions ``start..``."""
        embeds: torch.Tensor = self.embeddings.token_embedding(ids)
        if prefix is not None:
            embeds = splice_prefix(embeds, prefix)
        positions: torch.Tensor = self.embeddings.position_embedding.weight[start : start + ids.shape[1]]
        return embeds + positions

    def _layer(
        self,
        layer: CLIPEncoderLayer,
        hidden: torch.Tensor,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        deep_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ``CLIPEncoderLayer`` on a segment; returns (output, this segment's K, V split into heads).

        ``prefix_kv``: cached ``(1, H, P, Dh)`` keys and values of the positions before the segment, seen by every
        query; ``None``: the segment starts at position 0 (plain causal attention).
        ``deep_rows``: ``(m, D)`` keys and values that replace the segment's own at its positions ``1..m``."""
        attn = layer.self_attn
        batch, length, width = hidden.shape
        normed = layer.layer_norm1(hidden)
        # The plain projections: a deep adapter's wrappers act only inside the hooked forward.
        keys, values = _plain(attn.k_proj)(normed), _plain(attn.v_proj)(normed)
        if deep_rows is not None:
            keys, values = splice_prefix(keys, deep_rows[0]), splice_prefix(values, deep_rows[1])
        q, k, v = (self._split_heads(t) for t in (attn.q_proj(normed), keys, values))
        if prefix_kv is None:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        else:
            attention = prefix_attention if self.use_kernel else prefix_attention_reference
            context = attention(q, k, v, *prefix_kv, causal=True, scale=attn.scale)
        hidden = hidden + attn.out_proj(context.transpose(1, 2).reshape(batch, length, width))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return hidden, k, v

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = self.config.num_attention_heads
        return x.view(batch, length, heads, self.config.hidden_size // heads).transpose(1, 2)  # (B, H, L, Dh)

    def _head(
        self,
        last_layer: torch.Tensor,
        ids: torch.Tensor,
        hidden_states: tuple[torch.Tensor, ...] | None,
        hidden_prefix: int = 0,
    ) -> EncodedText:
        """Final layer norm, pooling at EOS (:func:`~.prefix.pool_index`) and the projection, if any; then, when
        ``hidden_prefix = m > 0``, the prefix's ``m`` rows dropped from the states (after pooling, which reads the
        prefixed positions)."""
        last_hidden = self.text_model.final_layer_norm(last_layer)
        rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
        pooled = last_hidden[rows, pool_index(ids, self.config).to(last_hidden.device)]
        text_embeds: torch.Tensor | None = None if self.text_projection is None else self.text_projection(pooled)
        if hidden_prefix:
            last_hidden = hide_prefix_rows(last_hidden, hidden_prefix)
            if hidden_states is not None:
                hidden_states = tuple(hide_prefix_rows(states, hidden_prefix) for states in hidden_states)
        return EncodedText(last_hidden, pooled, text_embeds, hidden_states)


def prefix_layer_kv(text_model: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a shallow prefix ``embeds`` ``(m, D)`` produces at positions ``1..m`` of every layer.

    Returns ``(keys, values)``, each ``(num_layers, m, D)``: the start of a deep prefix that computes exactly
    what the shallow one does. Computed by the prefix state.
    """
    with torch.no_grad():
        state = PrefixedCLIPEncoder(text_model, use_kernel=False).prefix_state(PrefixWeights(embeds.detach()))

    def merged(per_layer: list[torch.Tensor]) -> torch.Tensor:  # (1, H, P, Dh) per layer -> (layers, m, D)
        return torch.stack([t[0, :, 1:].transpose(0, 1).reshape(t.shape[2] - 1, -1) for t in per_layer])

    return merged(state.keys).float(), merged(state.values).float()
