"""The values an APL config may hold, shared by :class:`~apl_adapter.tuners.apl.config.APLConfig` and the checks
of a saved ``adapter_config.json`` (:mod:`apl_adapter.tuners.apl.serialization`).

A leaf: the config checks a saved folder before loading it, so the checks cannot import the config for these.
"""

from __future__ import annotations

from typing import Literal

# CLIP's text encoder has 77 positions; BOS and EOS must keep theirs.
MAX_CLIP_POSITIONS = 77
# T5 has relative positions and no window of its own; the pipelines choose one (SD3 256, FLUX.1-dev 512,
# FLUX.1-schnell 256). A prefix must leave room for EOS in the smallest of them.
MAX_T5_VIRTUAL_TOKENS = 255

TextEncoderType = Literal["clip", "t5"]
TEXT_ENCODER_TYPES: tuple[TextEncoderType, ...] = ("clip", "t5")

InitMethod = Literal["random_uniform", "text", "vocab"]
INIT_METHODS: tuple[InitMethod, ...] = ("random_uniform", "text", "vocab")
PrefixDepth = Literal["shallow", "deep"]
PREFIX_DEPTHS: tuple[PrefixDepth, ...] = ("shallow", "deep")


def max_virtual_tokens(text_encoder_type: str | None) -> int:
    """The longest prefix an encoder of this type takes: CLIP keeps BOS and EOS in its 77 positions; T5 keeps EOS
    in the smallest window its pipelines use. ``None`` (not yet known) is held to CLIP's bound."""
    return MAX_T5_VIRTUAL_TOKENS if text_encoder_type == "t5" else MAX_CLIP_POSITIONS - 2
