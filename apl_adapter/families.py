"""The diffusers pipeline families APL knows, and how each one's ``encode_prompt`` works.

A leaf (it imports only :mod:`apl_adapter.errors`): :mod:`apl_adapter.pipelines` applies prefixes by family, and
``apl-train`` / ``apl-export`` read a folder's ``model_index.json`` to pick their SD 1.x or flow-matching path.

- ``sd``: CLIP ``text_encoder`` (+ CLIP ``text_encoder_2`` for XL); the negative prompt is encoded inside
  ``encode_prompt``, which repeats given ``prompt_embeds`` per image.
- ``sd3``: CLIP ``text_encoder``, CLIP ``text_encoder_2``, T5 ``text_encoder_3``; the negative prompt is encoded
  inside ``encode_prompt``, which takes given ``prompt_embeds`` as already repeated per image.
- ``flux``: CLIP ``text_encoder`` (pooled output only), T5 ``text_encoder_2``; no negative branch in
  ``encode_prompt`` (guidance-distilled models), given embeds taken as they are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from .errors import APLAdapterError


@dataclass(frozen=True)
class PipelineFamily:
    """How one family of diffusers pipelines encodes prompts.

    Attributes:
        name: ``"sd"``, ``"sd3"`` or ``"flux"``.
        title: the family in words, for messages.
        encoders: the pipeline attributes holding text encoders, in the order ``adapter``, ``adapter_2``,
            ``adapter_3`` of :func:`apl_adapter.pipelines.apply_apl` map to them.
        negative_in_encode_prompt: ``encode_prompt`` also encodes the negative prompt (classifier-free guidance).
        repeats_given_embeds: ``encode_prompt`` repeats ``prompt_embeds`` passed in ``num_images_per_prompt`` times
            (so a pre-encoded positive prompt must be passed once per prompt, not per image).
    """

    name: str
    title: str
    encoders: tuple[str, ...]
    negative_in_encode_prompt: bool
    repeats_given_embeds: bool


SD = PipelineFamily("sd", "Stable Diffusion 1.x / 2.x / XL", ("text_encoder", "text_encoder_2"), True, True)
SD3 = PipelineFamily(
    "sd3", "Stable Diffusion 3 / 3.5", ("text_encoder", "text_encoder_2", "text_encoder_3"), True, False
)
FLUX = PipelineFamily("flux", "FLUX.1", ("text_encoder", "text_encoder_2"), False, False)


def family_of(pipe: Any) -> PipelineFamily:
    """The family of a diffusers pipeline, read from its ``encode_prompt`` signature (so img2img / inpaint
    siblings count too); a clear error for a pipeline APL cannot prefix."""
    encode_prompt = getattr(pipe, "encode_prompt", None)
    if encode_prompt is None:
        raise APLAdapterError(
            f"{type(pipe).__name__} has no encode_prompt(); APL supports Stable Diffusion 1.x / 2.x / XL, "
            "Stable Diffusion 3 / 3.5 and FLUX.1 pipelines."
        )
    params = inspect.signature(encode_prompt).parameters
    if "prompt_3" in params:
        return SD3
    if "do_classifier_free_guidance" in params:
        return SD
    if "max_sequence_length" in params and "pooled_prompt_embeds" in params:
        return FLUX
    raise APLAdapterError(
        f"{type(pipe).__name__}.encode_prompt takes ({', '.join(params)}), which matches none of the pipelines APL "
        "supports (Stable Diffusion 1.x / 2.x / XL, SD3 / 3.5, FLUX.1). Encode prompts with a supported pipeline "
        "and pass prompt_embeds."
    )


def family_of_class_name(class_name: str) -> PipelineFamily | None:
    """The family a ``model_index.json`` ``_class_name`` names (``None`` for anything else, SD 1.x included)."""
    if class_name.startswith("StableDiffusion3"):
        return SD3
    if class_name.startswith("Flux"):
        return FLUX
    return None
