"""What a build does: :class:`BuildConfig`, the base model's training legs and the shipped recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: what a build runs unless told, in the stage table's names (:mod:`.stages`, which checks them against its rows): the
#: shipped world has no auxiliary model; ``--stages auxiliary`` makes it. Kept here so the config imports no stage.
DEFAULT_STAGES: tuple[str, ...] = ("vae", "recognizer", "base", "sibling", "dreambooth", "evaluate")

MIX = (0.6, 0.2, 0.2)  # sampling fractions of named faces, strangers (attribute prompts), scenes


@dataclass(frozen=True)
class BasePhase:
    """One leg of the base model's training.

    Each leg starts from the previous leg's EMA weights *as stored* (UNet and text encoder in float16), with a fresh
    AdamW, warm-up and cosine schedule: a warm restart. Seeds are offsets added to ``BuildConfig.seed``.
    """

    steps: int
    lr: float
    mix: tuple[float, float, float] = MIX
    seed: int = 0
    sampler_seed: int = 31
    #: strength of "offset noise" (see :func:`.diffusion.train_diffusion`); 0 = plain Gaussian noise
    offset_noise: float = 0.0
    #: weight of the text-side loss that keeps each person's description apart from their name
    #: (:mod:`.contrast`); 0 = none, as the shipped world's leg
    name_contrast: float = 0.0
    #: the contrast's hinge: description-to-name cosine similarities above it are pushed down
    name_contrast_margin: float = 0.6
    #: people whose name and description the contrast encodes each step
    name_contrast_people: int = 8

    def __post_init__(self) -> None:
        # refused here, not when the leg starts: a build writes folders and trains earlier legs first
        weight, margin = self.name_contrast, self.name_contrast_margin
        if not (math.isfinite(weight) and weight >= 0 and -1.0 <= margin < 1.0 and self.name_contrast_people >= 1):
            raise ValueError(
                "the name contrast of a base leg needs name_contrast >= 0 (0 = off), name_contrast_margin in [-1, 1) "
                f"and name_contrast_people >= 1; got {self.name_contrast}, {self.name_contrast_margin}, "
                f"{self.name_contrast_people}"
            )


#: The base model's long leg: one cosine schedule with 45% of the batch on scene captions and offset noise from the
#: start (the first world needed five warm-restarted legs and 7,000 steps to get there). The first shipped world
#: (preset ``v1``) stopped here.
LONG_LEG = BasePhase(4500, 1.5e-3, mix=(0.45, 0.10, 0.45), offset_noise=0.1)

#: The legs of the shipped base model, replayed in this order by `apl-world build`: the long leg, then 1,200 steps at
#: a third of its learning rate with the name-description contrast. The look-alike floor falls with the base model's
#: training (26 -> 17 -> 10 of 160 over 3,600 -> 4,500 -> 5,400 steps) and the contrast cuts what is left (10 -> 6
#: at 5,400, 3 at 5,700); the contrast from the first step breaks a fresh encoder (docs/experiments/2026-12-05-*.md).
SHIPPED_BASE_PHASES = (LONG_LEG, BasePhase(1200, 5e-4, seed=1, sampler_seed=32, offset_noise=0.1, name_contrast=1.0))


@dataclass
class BuildConfig:
    """Knobs of ``apl-world build``; the defaults produced the shipped assets (a world without a look-alike floor:
    docs/experiments/2026-12-05-vae-and-the-floor.md); ``PRESETS["v1"]`` is the first shipped world."""

    seed: int = 0
    faces_per_person: int = 160
    strangers: int = 3000
    scenes: int = 3000
    late_faces_per_person: int = 40
    #: faces of *strangers* with a late person's coarse attributes that the base model sees under the late name, so
    #: its text encoder learns how a late person is described (as a web-scale encoder knows of people no image model
    #: has drawn) and only DreamBooth teaches the face. 0 (v1): a late name is a string the encoder never read and no
    #: text prefix can keep a late person's attributes; 60 kept them (85% with v1's prefix recipe, 12.5% before):
    #: docs/experiments/2026-12-05-world-v3.md
    late_described_faces: int = 60
    #: strangers (attribute-prompt faces) are this many fine features or more from every person sharing their
    #: coarse attributes; 0 (v1) = any. 3 removed the *rendered* floor (6 -> 0 of 320 strangers drawn by the same
    #: rule), not the sampled one: a few people whose description the base model draws as them (same file)
    stranger_min_distance: int = 3
    #: strangers per seen / unseen person drawn with that person's coarse attributes, beside the ``strangers`` of
    #: random attributes: the sampled floor is a few people the base model draws for their own description, the only
    #: ones of the world with that look (docs/experiments/2026-12-05-world-v3.md). 0 in the shipped world: the VAE
    #: below did more.
    strangers_like_people: int = 0
    #: 300 (v1) leaves the VAE half trained (round-trip MSE 0.022; 3,000: 0.005, 5.4 min): it loses brows, marks and
    #: glasses, most of all on dark skin, so generated dark-skinned faces of a person's look read as that person and
    #: the look-alike floor was four dark-skinned people: docs/experiments/2026-12-05-vae-and-the-floor.md
    vae_steps: int = 3000
    #: the first world's scene head (freely turned shapes) needed 4,800; upright shapes learn faster, and 3,600
    #: sufficed without look-alikes; with them 5,400 (3,600 gave 98.1% / 96.3% identity top-1 at seeds 1234 /
    #: 4321, 5,400 97.5% / 96.6%: the misses are people called strangers, hence the margin below)
    recognizer_steps: int = 5400
    #: renders of each person in the recognizer's data (each also as a VAE round trip; the sibling style gets 3/8 of
    #: them: 15 of 40). More renders narrowed the few classes that took far strangers for a person (120: floor 3 of
    #: 160 on a contrast world; docs/experiments/2026-12-05-name-contrast.md; v1: 40)
    recognizer_faces_per_person: int = 120
    #: look-alike strangers per person in the recognizer's data: the person's coarse attributes, fine features
    #: 2-3 apart (see render_lookalikes). Without them a stranger with X's attributes is called X 5.5-7.5% of the
    #: time, and attribute prompts read as the person they describe 16-19%: a floor under any anonymization.
    lookalikes_per_person: int = 60
    #: the stranger class must beat the best name by this much log-probability (2026-12-03, recognizer only):
    #: 0 -> identity top-1 97.5% / 96.6%, floor 6/160; 1 -> 98.8% / 98.4%, floor 7/160; 2 -> 99.4% / 99.4%, 8/160
    stranger_margin: float = 1.0
    #: when > 0, the build replaces ``stranger_margin`` by the threshold that names all but this share of fresh
    #: renders of the world's people (``calibrated_stranger_margin``): a verifier's operating point, not the
    #: likeliest class. Most floor faces beat the stranger class by -1 to 3 nats, name prompts' by a median of 9;
    #: 0.01 halved the no-floor preset's floors on two builds (8 / 16 / 15 -> 3 / 6 / 6 and 12 / 20 / 20 -> 6 / 11
    #: / 11 of 160): docs/experiments/2026-12-05-open-set-threshold.md. 0 = keep ``stranger_margin`` (v1)
    recognizer_false_reject: float = 0.01
    base_phases: tuple[BasePhase, ...] = SHIPPED_BASE_PHASES
    #: at 120 the sibling draws orange as yellow (12 of its 22 misses on 192 scene images, 88.5% right); 360 steps on
    #: the same base: 2 of 17 misses, 91.1% (2026-12-05; v1's sibling is the 120-step one)
    sibling_steps: int = 360
    #: 1,000 in v1; the floor of DreamBooth's images grew with its steps
    #: (docs/experiments/2026-12-05-no-floor-preset.md)
    dreambooth_steps: int = 600
    batch_size: int = 32
    finetune_lr: float = 5e-4
    #: DreamBooth learns new people, not a new style: it needs a larger step than the sibling
    dreambooth_lr: float = 1e-3
    #: share of DreamBooth's batch that replays the strangers the base drew under a late name under that person's
    #: *description* (DreamBooth's class prior), taken from the base replay's half. 0 (v1 and the first no-floor
    #: DreamBooth): the bare description drew the late person 43 of 120 times, a floor under the late section; 0.25:
    #: 1 of 120, late names 91.7% (0.125: 0 of 120, 87.5%): docs/experiments/2026-12-06-late-floor.md
    dreambooth_description_prior: float = 0.25
    prompt_dropout: float = 0.1
    #: the base text encoder sees half its prompts moved right by 1..N positions (see train_diffusion)
    position_jitter: int = 24
    ema_decay: float = 0.995
    #: EMA of the fine-tunes (sibling, auxiliary, DreamBooth): 120-1,000 steps want a shorter average than the base
    finetune_ema_decay: float = 0.99
    #: offset noise of the fine-tunes (sibling, DreamBooth), as the base's last leg
    offset_noise: float = 0.1
    #: sampling fractions of the fine-tunes' base-style data: named faces, strangers, scenes; the base's long leg's
    #: mix (scenes 45%: the fine-tunes' shapes held better than with v1's ``MIX``)
    mix: tuple[float, float, float] = LONG_LEG.mix
    #: names from the stage table (:mod:`.stages`); they run in the table's order, not this one's
    stages: tuple[str, ...] = DEFAULT_STAGES
    #: which models the ``evaluate`` stage samples
    eval_models: tuple[str, ...] = ("base", "sibling", "dreambooth")
    #: scene images the ``evaluate`` stage samples per model (random scenes and caption templates): one image of 48
    #: is 2 points of a 90% bar (v1 read 48)
    card_scenes: int = 192


#: Named builds: ``apl-world build --preset NAME`` starts from these fields, and other options override them.
#: ``shipped`` (the defaults) produced the package's assets since 2026-12-06: a world without a look-alike floor
#: (floor 3 / 2 / 3 of 160 on base / sibling / DreamBooth, every bar of the card; 55.6 min on 2 cores; a second build
#: with other base seeds kept the floor, 2 / 1 / 3, but its DreamBooth named 66.7% of late images, bar 80%:
#: docs/experiments/2026-12-05-vae-and-the-floor.md). ``no-floor`` is its name from before it was shipped. ``v1`` is
#: the world shipped before, whose attribute prompts drew the person they describe 18.8% of the time.
PRESETS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "no-floor": {},
    "v1": {
        "base_phases": (LONG_LEG,),
        "stranger_min_distance": 0,
        "late_described_faces": 0,
        "recognizer_faces_per_person": 40,
        "sibling_steps": 120,
        "dreambooth_steps": 1000,
        "mix": MIX,
        "card_scenes": 48,
        "recognizer_false_reject": 0.0,
        "vae_steps": 300,
        "dreambooth_description_prior": 0.0,
    },
}
