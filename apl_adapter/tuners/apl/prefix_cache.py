"""A CLIP text encoder that computes the APL prefix once and then runs only the prompt positions.

CLIP's text encoder is causal, so the hidden states of BOS and the prefix (positions ``0..m``) never depend on the
prompt. :class:`CachedPrefixEncoder` computes, once per prefix, every layer's keys and values (and hidden states) at
those ``m + 1`` positions; each call then embeds only positions ``m+1..L-1`` and attends to the cached prefix K/V
plus its own keys with :func:`apl_adapter.ops.prefix_attention` (the fused kernel where built). Both steps are
:class:`~.prefixed_encoder.PrefixedCLIPEncoder`'s (shared with the exported graphs); this module keeps the cache.

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
from typing import Any, cast

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from ...errors import APLAdapterError
from .layer import APLEmbedding
from .prefix import (
    PrefixWeights,
    as_prefix_weights,
    base_model_of,
    clip_eos_token_id,
    clip_text_model_of,
    warn_if_prompt_truncated,
)
from .prefixed_encoder import PrefixedCLIPEncoder, PrefixState, Version

__all__ = ["CachedPrefixEncoder"]

PrefixLike = torch.Tensor | PrefixWeights
PrefixSource = PrefixLike | Callable[[], PrefixLike | None]
EncoderOutput = BaseModelOutputWithPooling | CLIPTextModelOutput | tuple[Any, ...]


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
        self.encoder = PrefixedCLIPEncoder(text_encoder, use_kernel)
        self.prefix = prefix
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

    @property
    def use_kernel(self) -> bool:
        return self.encoder.use_kernel

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
        tensors = tuple(
            (t.untyped_storage().data_ptr(), t.storage_offset(), t._version, t.dtype, t.device, tuple(t.shape))
            for t in prefix.tensors()
        )
        return (*tensors, (prefix.hide_rows,))

    def prefix_state(self, prefix: PrefixLike) -> PrefixState:
        """The state for ``prefix``: cached, or computed now (with autograd when training the prefix)."""
        prefix = as_prefix_weights(prefix)
        track_grad = torch.is_grad_enabled() and any(t.requires_grad for t in prefix.tensors())
        if track_grad:
            return self.encoder.prefix_state(prefix, version=None)
        version = self._version_of(prefix)
        if self._state is None or self._state.version != version:
            with torch.no_grad():
                self._state = self.encoder.prefix_state(prefix, version)
        return self._state

    # ------------------------------------------------------------------------------------------------------------
    # The encoder
    # ------------------------------------------------------------------------------------------------------------

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
        out = self.encoder.encode_with_state(input_ids, self.prefix_state(prefix), output_hidden_states)
        # What the wrapped transformers model would return.
        result: CLIPTextModelOutput | BaseModelOutputWithPooling
        if out.text_embeds is not None:
            result = CLIPTextModelOutput(
                text_embeds=out.text_embeds, last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states
            )
        else:
            result = BaseModelOutputWithPooling(
                last_hidden_state=out.last_hidden_state,
                pooler_output=out.pooler_output,
                hidden_states=out.hidden_states,
            )
        return result if return_dict else result.to_tuple()
