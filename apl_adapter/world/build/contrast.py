"""A text-side objective of the base model: a person's description stays apart from their name.

The base text encoder is trained from scratch with the UNet, so nothing stops it from encoding "a male person, brown
hair, light skin, round face" almost as it encodes the one person of the world with that look; the UNet then draws
that person for the description (the *sampled look-alike floor*). Measured on a world built without it: the floor
people are those whose description-to-name cosine similarity is highest, and moving a description's states away
from its person's name (``c_D + 0.5 (c_D - c_X)``) cut the floor 18 -> 5 of 160 images with 151 of 160 still showing
all four attributes (docs/experiments/2026-12-05-name-contrast.md). A web-scale CLIP knows a celebrity's name from
their description because contrastive training saw both; this loss gives the world's encoder that separation.

``loss = weight * mean(relu(cos(flat(enc(name prompt)), flat(enc(description prompt))) - margin))`` over a few people
per step (drawn with replacement), name and description in the same template. Flattened token states, since the
UNet reads every position; they include the template's shared words and the padding, so the cosine never nears 0.
The prompts sit at their usual positions (a prefix moves them right; the base's position jitter covers that for the
diffusion loss, not for this one).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from ..spec import WorldSpec
from .diffusion import TextLoss


def name_description_contrast(
    world: WorldSpec,
    ids: Callable[[list[str]], torch.Tensor],
    weight: float,
    margin: float,
    people_per_step: int,
    seed: int,
) -> TextLoss:
    """The hinge above on ``people_per_step`` seen / unseen people a step (late people are left out: the base
    model learns a late name *as* its description, see ``BuildConfig.late_described_faces``).

    ``ids`` tokenizes prompts (``PromptEncoder.ids``). Returns a function of the text encoder being trained.
    """
    if not (math.isfinite(weight) and weight > 0 and -1.0 <= margin < 1.0 and people_per_step >= 1):
        raise ValueError(
            f"name-description contrast needs weight > 0, margin in [-1, 1) and people_per_step >= 1; got weight="
            f"{weight}, margin={margin}, people_per_step={people_per_step}"
        )
    people = [p.name for p in world.seen + world.unseen]
    templates = len(world.person_templates)
    rng = random.Random(seed)

    def loss(text_encoder: CLIPTextModel) -> torch.Tensor:
        picks = [(rng.choice(people), rng.randrange(templates)) for _ in range(people_per_step)]
        names = [world.identity_prompt(n, k) for n, k in picks]
        descriptions = [world.attribute_prompt(n, k) for n, k in picks]
        states = text_encoder(ids(names + descriptions))[0].flatten(1)
        cos = F.cosine_similarity(states[: len(picks)], states[len(picks) :], dim=1)
        return weight * F.relu(cos - margin).mean()

    return loss
