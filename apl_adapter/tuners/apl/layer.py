"""The APL tuner layers: what PEFT wraps inside a text encoder.

- :class:`APLEmbedding` wraps ``CLIPTextEmbeddings``: it owns every prefix tensor (one set per adapter name) and
  splices the active prefix in after BOS;
- :class:`APLT5Embedding` wraps T5's ``encoder.embed_tokens`` the same way, with the prefix at positions ``0..m-1``
  (T5 has no BOS; shallow prefixes only);
- :class:`APLPrefixProjection` wraps a layer's ``k_proj`` / ``v_proj`` for a deep prefix and replaces the rows at
  positions ``1..m`` of its output.

The layers expect ids already shifted by :func:`~apl_adapter.tuners.apl.prefix.insert_prefix_ids`; the text
model's pre-hook (:mod:`apl_adapter.tuners.apl.model`) does that.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from ...errors import APLAdapterError
from .prefix import PrefixWeights, prepend_prefix, splice_prefix


class APLEmbedding(nn.Module, BaseTunerLayer):
    """``CLIPTextEmbeddings`` with learnable prefixes (one per adapter name) spliced in after BOS.

    Expects ids already shifted by :func:`~apl_adapter.tuners.apl.prefix.insert_prefix_ids`.
    """

    adapter_layer_names = ("apl_prefix", "apl_deep_keys", "apl_deep_values")
    other_param_names = ("num_virtual_tokens", "hide_rows")

    def __init__(
        self, base_layer: CLIPTextEmbeddings | nn.Embedding, adapter_name: str, weights: PrefixWeights
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.apl_prefix = nn.ParameterDict()
        self.apl_deep_keys = nn.ParameterDict()
        self.apl_deep_values = nn.ParameterDict()
        self.num_virtual_tokens: dict[str, int] = {}
        #: per adapter, whether the encoder's outputs drop the prefix's rows (APLConfig.hide_prefix_rows)
        self.hide_rows: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        #: the prefix of the prefixed forward now running (set and cleared by the text model's hooks): its deep
        #: rows reach the projections, its ``hide_rows`` the end hook
        self._forward_scope: PrefixWeights | None = None
        self.update_layer(adapter_name, weights)

    def update_layer(self, adapter_name: str, weights: PrefixWeights) -> None:
        """Add (or replace) adapter ``adapter_name``'s tensors, starting from ``weights``.

        The tuner computes the starting weights: a deep prefix starts from what the shallow one gives at every
        layer, which needs the whole text model, not just this layer.
        """
        self.apl_prefix[adapter_name] = nn.Parameter(weights.embeds)
        if weights.keys is not None and weights.values is not None:
            self.apl_deep_keys[adapter_name] = nn.Parameter(weights.keys)
            self.apl_deep_values[adapter_name] = nn.Parameter(weights.values)
        self.num_virtual_tokens[adapter_name] = weights.num_virtual_tokens
        self.hide_rows[adapter_name] = weights.hide_rows
        self.set_adapter(self.active_adapters)

    # The wrapped module's embeddings stay reachable where callers expect them
    # (``CLIPTextModel.get_input_embeddings()`` returns ``embeddings.token_embedding``).
    @property
    def token_embedding(self) -> nn.Embedding:
        return self._clip_embeddings().token_embedding

    @property
    def position_embedding(self) -> nn.Embedding:
        return self._clip_embeddings().position_embedding

    def _clip_embeddings(self) -> CLIPTextEmbeddings:
        layer = self.base_layer
        if not isinstance(layer, CLIPTextEmbeddings):
            raise APLAdapterError(f"APLEmbedding wraps CLIPTextEmbeddings, got {type(layer).__name__}")
        return layer

    @property
    def active_prefix(self) -> torch.Tensor | None:
        """The prefix of the active adapter, ``None`` when adapters are disabled."""
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.apl_prefix]
        if len(active) > 1:
            raise APLAdapterError(
                f"APL applies one prefix at a time, but adapters {active} are active; call set_adapter(name)."
            )
        return self.apl_prefix[active[0]] if active else None

    @property
    def active_prefix_weights(self) -> PrefixWeights | None:
        """Every tensor of the active adapter's prefix (deep rows included), ``None`` when adapters are disabled."""
        prefix = self.active_prefix
        if prefix is None:
            return None
        name = next(n for n in self.active_adapters if n in self.apl_prefix)
        hide_rows = self.hide_rows.get(name, False)
        if name not in self.apl_deep_keys:
            return PrefixWeights(prefix, hide_rows=hide_rows)
        return PrefixWeights(prefix, self.apl_deep_keys[name], self.apl_deep_values[name], hide_rows=hide_rows)

    def deep_rows(self, kind: Literal["keys", "values"], layer_index: int) -> torch.Tensor | None:
        """The ``(m, D)`` rows layer ``layer_index``'s projection must give, inside a deep prefixed forward."""
        scope = self._forward_scope
        if scope is None or scope.keys is None:
            return None
        rows = scope.keys if kind == "keys" else scope.values
        return None if rows is None else rows[layer_index]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        prefix = self.active_prefix
        out: torch.Tensor
        if prefix is None:
            out = self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
            return out
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        out = self.base_layer(position_ids=position_ids, inputs_embeds=splice_prefix(inputs_embeds, prefix))
        return out

    def __repr__(self) -> str:
        return "apl." + super().__repr__()


class APLPrefixProjection(nn.Module, BaseTunerLayer):
    """A layer's ``k_proj`` or ``v_proj`` whose output rows at positions ``1..m`` come from a deep prefix.

    It holds no weights of its own: the rows live in the :class:`APLEmbedding` (one place for every prefix
    tensor, so PEFT saves them side by side). Inside the text model's prefixed forward the embedding exposes the
    active deep rows (:meth:`APLEmbedding.deep_rows`); anywhere else - the prefix K/V cache and the export graphs
    call the projections on other segments - this is the plain projection.
    """

    adapter_layer_names = ()
    other_param_names = ()
    _embedding: APLEmbedding

    def __init__(
        self, base_layer: nn.Linear, embedding: APLEmbedding, layer_index: int, kind: Literal["keys", "values"]
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: the text model owns it
        self.layer_index = layer_index
        self.kind = kind
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = embedding._active_adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base_layer(hidden)
        rows = self._embedding.deep_rows(self.kind, self.layer_index)
        if rows is None or out.shape[-2] <= rows.shape[0]:
            return out
        return splice_prefix(out, rows)

    def __repr__(self) -> str:
        return f"apl.prefix_{self.kind}[{self.layer_index}](" + repr(self.base_layer) + ")"


class APLT5Embedding(APLEmbedding):
    """T5's ``encoder.embed_tokens`` with learnable prefixes (one per adapter name) at positions ``0..m-1``.

    Expects ids already shifted by :func:`~apl_adapter.tuners.apl.prefix.insert_t5_prefix_ids` (the placeholders'
    embeddings are replaced). Shallow prefixes only: a deep T5 prefix is refused by the config.
    """

    @property
    def token_embedding(self) -> nn.Embedding:
        layer = self.base_layer
        if not isinstance(layer, nn.Embedding):
            raise APLAdapterError(f"APLT5Embedding wraps T5's nn.Embedding, got {type(layer).__name__}")
        return layer

    @property
    def position_embedding(self) -> nn.Embedding:
        raise AttributeError("T5 has no position embedding table (its attention adds a relative position bias)")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # nn.Embedding's call
        """``input_ids`` ``(B, L)`` -> ``(B, L, D)`` embeddings, the active prefix at positions ``0..m-1``."""
        out: torch.Tensor = self.base_layer(input_ids)
        prefix = self.active_prefix
        return out if prefix is None else prepend_prefix(out, prefix)
