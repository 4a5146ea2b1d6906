"""``apl-world build``: train the whole world from scratch, stage by stage, seeded.

Stages, in the order of the stage table (:mod:`.stages`; each writes its result under ``--work`` or ``--out`` so a
later stage can be re-run alone):

1. ``vae``: the ``AutoencoderKL`` on renders of faces and scenes (both styles);
2. ``recognizer``: the CNN of :mod:`..recognizers` on renders, half of them VAE round-tripped;
3. ``base``: text encoder + UNet from scratch on name prompts (seen + unseen people), attribute
   prompts (random people who are not in the world), scene captions, with 10% empty prompts;
4. ``sibling``: the base UNet fine-tuned on the sibling style, text encoder frozen;
5. ``auxiliary`` (only when asked for): the base UNet fine-tuned on a third style (cool grade, light frame) as
   the sibling was on its own: a model prefixes may *train* through (``apl-train --also-through``) so that they
   meet more than one UNet, and that no bench measures (the sibling stays a model the prefix never saw);
6. ``dreambooth``: the base UNet fine-tuned on the late people (name prompts) mixed with the
   base data as prior preservation, text encoder frozen;
7. ``evaluate``: samples every model and measures the world's bars with the recognizers
   (``world_card.json``).

Modules: :mod:`.config` (what a build does), :mod:`.seeds` (its random streams), :mod:`.banks` (the renders),
:mod:`.vae`, :mod:`.recognizer`, :mod:`.diffusion` (the training loop of :mod:`.base` and :mod:`.finetunes`),
:mod:`.contrast` (the base text encoder's name-description contrast),
:mod:`.card` (``evaluate`` and the world card), :mod:`.storage`, :mod:`.context` and :mod:`.driver`.
"""

from .banks import (
    KIND_NAMED,
    KIND_NOISE,
    KIND_SCENE,
    KIND_STRANGER,
    Bank,
    TrainingBanks,
    concat_banks,
    lookalike_fine_features,
    render_bank,
    render_lookalikes,
    style_bank,
)
from .base import leg_stamp, train_base
from .config import DEFAULT_STAGES, LONG_LEG, MIX, PRESETS, SHIPPED_BASE_PHASES, BasePhase, BuildConfig
from .context import BuildContext
from .diffusion import LatentSet, PromptEncoder, make_sampler, mix_groups, train_diffusion
from .driver import build_world
from .finetunes import finetune_unet
from .latents import encode_latents, roundtrip
from .recognizer import recognizer_loss, train_recognizer
from .seeds import SEEDS, SeedOffsets
from .stages import STAGE_TABLE, STAGES, Stage
from .storage import LEG_STAMP, drop_local_paths, save_world_pipeline, save_world_unet, store_weights_half
from .vae import train_vae

__all__ = [
    "DEFAULT_STAGES",
    "KIND_NAMED",
    "KIND_NOISE",
    "KIND_SCENE",
    "KIND_STRANGER",
    "LEG_STAMP",
    "LONG_LEG",
    "MIX",
    "PRESETS",
    "SEEDS",
    "SHIPPED_BASE_PHASES",
    "STAGES",
    "STAGE_TABLE",
    "Bank",
    "BasePhase",
    "BuildConfig",
    "BuildContext",
    "LatentSet",
    "PromptEncoder",
    "SeedOffsets",
    "Stage",
    "TrainingBanks",
    "build_world",
    "concat_banks",
    "drop_local_paths",
    "encode_latents",
    "finetune_unet",
    "leg_stamp",
    "lookalike_fine_features",
    "make_sampler",
    "mix_groups",
    "recognizer_loss",
    "render_bank",
    "render_lookalikes",
    "roundtrip",
    "save_world_pipeline",
    "save_world_unet",
    "store_weights_half",
    "style_bank",
    "train_base",
    "train_diffusion",
    "train_recognizer",
    "train_vae",
]
