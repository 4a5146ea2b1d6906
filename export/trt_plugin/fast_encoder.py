"""The "fast" text encoder graph: a baked APL prefix whose per-layer keys/values are graph constants, and one
``apl::PrefixAttention`` node per layer (:mod:`.onnx_op`) instead of plain attention.

``apl-export --text-encoder fast`` exports it as ``text_encoder`` (``FastTextEncoder`` in
:mod:`apl_export.exported_models`).
"""

from __future__ import annotations

import torch
from torch import nn

from apl_adapter.tuners.apl.prefix import PrefixWeights

from ..errors import ExportError
from ..modules import BakedPrefixStateGraph


class FastCLIPTextEncoderGraph(BakedPrefixStateGraph):
    """CLIP text encoder with a baked APL prefix whose K/V are graph constants; int32 ``input_ids`` ``(B, 77)``.

    Same outputs as ``apl_export.modules.CLIPTextEncoderGraph`` with a baked prefix: ``last_hidden_state``
    ``(B, 77, D)`` and ``pooler_output`` ``(B, D)`` (``text_embeds`` for ``CLIPTextModelWithProjection``), but only
    positions ``m+1..76`` are computed; attention is ``torch.ops.apl.prefix_attention`` (exported as
    ``apl::PrefixAttention``). A deep prefix's per-layer rows are part of those constants.
    """

    def __init__(self, text_encoder: nn.Module, prefix: torch.Tensor | PrefixWeights) -> None:
        super().__init__(text_encoder, prefix, use_kernel=True)


def make_fast_text_encoder(
    clip: nn.Module,
    prefix: torch.Tensor | PrefixWeights | None,
    prefix_as_input: bool,
    m: int,
    hide_rows: bool = False,
) -> nn.Module:
    """The graph of ``apl_export.exported_models.FastTextEncoder`` (same arguments as the standard graph)."""
    if prefix_as_input or prefix is None:
        raise ExportError(
            "The fast text encoder bakes the prefix's keys and values into the graph; it needs a baked prefix "
            "(not --prefix-input, and only for the prefixed encoder). Use the standard variant otherwise."
        )
    weights = prefix if isinstance(prefix, PrefixWeights) else PrefixWeights(prefix, hide_rows=hide_rows)
    return FastCLIPTextEncoderGraph(clip, weights)
