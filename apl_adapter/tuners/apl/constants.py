"""The values an APL config may hold, shared by :class:`~apl_adapter.tuners.apl.config.APLConfig` and the checks
of a saved ``adapter_config.json`` (:mod:`apl_adapter.tuners.apl.serialization`).

A leaf: the config checks a saved folder before loading it, so the checks cannot import the config for these.
"""

from __future__ import annotations

from typing import Literal

# CLIP's text encoder has 77 positions; BOS and EOS must keep theirs.
MAX_CLIP_POSITIONS = 77

InitMethod = Literal["random_uniform", "text", "vocab"]
INIT_METHODS: tuple[InitMethod, ...] = ("random_uniform", "text", "vocab")
PrefixDepth = Literal["shallow", "deep"]
PREFIX_DEPTHS: tuple[PrefixDepth, ...] = ("shallow", "deep")
