"""``apl-world build``: train the whole world from scratch, stage by stage, seeded.

Stages (each writes its result under ``--work`` so a later stage can be re-run alone):

1. ``vae``: the ``AutoencoderKL`` on renders of faces and scenes (both styles);
2. ``recognizer``: the CNN of :mod:`.recognizers` on renders, half of them VAE round-tripped;
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
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_folder
from ..tokenizer import load_clip_tokenizer
from .models import (
    assemble_pipeline,
    link_shared_components,
    world_scheduler,
    world_text_encoder,
    world_unet,
    world_vae,
)
from .recognizers import SCENE_VALUES, WorldRecognizerNet, save_recognizer
from .render import render_face, render_scene, to_tensor
from .spec import (
    ATTRIBUTE_VALUES,
    FINE_FEATURE_VALUES,
    Identity,
    Scene,
    WorldSpec,
    fine_distance,
    random_attributes,
    random_fine_features,
)

STAGES = ("vae", "recognizer", "base", "sibling", "auxiliary", "dreambooth", "evaluate")
#: what a build runs unless told: the shipped world has no auxiliary model (training through it measured no gain,
#: docs/experiments/2026-12-03-training-variance.md); ``--stages auxiliary`` makes it
DEFAULT_STAGES = tuple(stage for stage in STAGES if stage != "auxiliary")
KIND_NAMED, KIND_STRANGER, KIND_SCENE, KIND_NOISE = 0, 1, 2, 3


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
    #: strength of "offset noise" (see :func:`train_diffusion`); 0 = plain Gaussian noise
    offset_noise: float = 0.0


#: The leg that produced the shipped base model: one cosine schedule with 45% of the batch on
#: scene captions and offset noise from the start (the first world needed five warm-restarted legs
#: and 7,000 steps to get there). `apl-world build` replays the legs in this order.
SHIPPED_BASE_PHASES = (BasePhase(4500, 1.5e-3, mix=(0.45, 0.10, 0.45), offset_noise=0.1),)


@dataclass(frozen=True)
class SeedOffsets:
    """What each random stream of a build adds to ``BuildConfig.seed``: distinct, so no two stages draw the same
    numbers, and fixed, so a stage re-run alone draws what it drew in the full build."""

    base_renders: int = 11
    late_renders: int = 12
    sibling_renders: int = 13
    auxiliary_renders: int = 14
    recognizer_renders: int = 21
    recognizer_sibling_renders: int = 22
    lookalikes: int = 23
    lookalikes_sibling: int = 24
    sibling_training: int = 1
    sibling_sampler: int = 41
    dreambooth_training: int = 2
    dreambooth_sampler: int = 51
    auxiliary_training: int = 3
    auxiliary_sampler: int = 61


SEEDS = SeedOffsets()


@dataclass
class BuildConfig:
    """Knobs of ``apl-world build``; the defaults produced the shipped assets."""

    seed: int = 0
    faces_per_person: int = 160
    strangers: int = 3000
    scenes: int = 3000
    late_faces_per_person: int = 40
    vae_steps: int = 300
    #: the first world's scene head (freely turned shapes) needed 4,800; upright shapes learn faster, and 3,600
    #: sufficed without look-alikes; with them 5,400 (3,600 gave 98.1% / 96.3% identity top-1 at seeds 1234 /
    #: 4321, 5,400 97.5% / 96.6%: the misses are people called strangers, hence the margin below)
    recognizer_steps: int = 5400
    #: look-alike strangers per person in the recognizer's data: the person's coarse attributes, fine features
    #: 2-3 apart (see render_lookalikes). Without them a stranger with X's attributes is called X 5.5-7.5% of the
    #: time, and attribute prompts read as the person they describe 16-19%: a floor under any anonymization.
    lookalikes_per_person: int = 60
    #: the stranger class must beat the best name by this much log-probability (2026-12-03, recognizer only):
    #: 0 -> identity top-1 97.5% / 96.6%, floor 6/160; 1 -> 98.8% / 98.4%, floor 7/160; 2 -> 99.4% / 99.4%, 8/160
    stranger_margin: float = 1.0
    base_phases: tuple[BasePhase, ...] = SHIPPED_BASE_PHASES
    sibling_steps: int = 120
    dreambooth_steps: int = 1000
    batch_size: int = 32
    finetune_lr: float = 5e-4
    #: DreamBooth learns new people, not a new style: it needs a larger step than the sibling
    dreambooth_lr: float = 1e-3
    prompt_dropout: float = 0.1
    #: the base text encoder sees half its prompts moved right by 1..N positions (see train_diffusion)
    position_jitter: int = 24
    ema_decay: float = 0.995
    #: EMA of the fine-tunes (sibling, auxiliary, DreamBooth): 120-1,000 steps want a shorter average than the base
    finetune_ema_decay: float = 0.99
    #: offset noise of the fine-tunes (sibling, DreamBooth), as the base's last leg
    offset_noise: float = 0.1
    #: sampling fractions of the fine-tunes' base-style data: named faces, strangers, scenes
    mix: tuple[float, float, float] = MIX
    stages: tuple[str, ...] = field(default=DEFAULT_STAGES)
    #: which models the ``evaluate`` stage samples
    eval_models: tuple[str, ...] = ("base", "sibling", "dreambooth")


# --------------------------------------------------------------------------------------------
# Render banks
# --------------------------------------------------------------------------------------------
@dataclass
class Bank:
    """Rendered images with their labels; ``-1`` marks a label that does not apply."""

    images: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    kind: torch.Tensor  # (N,) KIND_*
    identity: torch.Tensor  # (N,) index into world.names, -1 if not a named person
    attributes: torch.Tensor  # (N, 4) indices into ATTRIBUTE_VALUES, -1 for no face
    scene: torch.Tensor  # (N, 3) indices into SCENE_VALUES, -1 for no scene

    def __len__(self) -> int:
        return len(self.kind)

    def subset(self, mask: torch.Tensor) -> Bank:
        return Bank(*(getattr(self, f)[mask] for f in ("images", "kind", "identity", "attributes", "scene")))


def _attr_index(attributes: dict[str, str]) -> list[int]:
    return [ATTRIBUTE_VALUES[k].index(attributes[k]) for k in ATTRIBUTE_VALUES]


def _scene_index(scene: Scene) -> list[int]:
    return [SCENE_VALUES[k].index(getattr(scene, k)) for k in SCENE_VALUES]


def render_bank(
    world: WorldSpec,
    people: list[Identity],
    faces_per_person: int,
    strangers: int,
    scenes: int,
    seed: int,
    style: str = "base",
    noise: int = 0,
) -> Bank:
    """Render named faces, stranger faces (random people), scenes and no-content noise images."""
    rng = random.Random(seed)
    images, kind, ident, attrs, scene_ix = [], [], [], [], []
    for person in people:
        for _ in range(faces_per_person):
            images.append(render_face(person.attributes, person.fine, rng, style))
            kind.append(KIND_NAMED)
            ident.append(world.names.index(person.name))
            attrs.append(_attr_index(person.attributes))
            scene_ix.append([-1, -1, -1])
    for _ in range(strangers):
        a = random_attributes(rng)
        images.append(render_face(a, random_fine_features(rng), rng, style))
        kind.append(KIND_STRANGER)
        ident.append(-1)
        attrs.append(_attr_index(a))
        scene_ix.append([-1, -1, -1])
    for _ in range(scenes):
        sc = rng.choice(world.scenes)
        images.append(render_scene(sc, rng, style))
        kind.append(KIND_SCENE)
        ident.append(-1)
        attrs.append([-1] * 4)
        scene_ix.append(_scene_index(sc))
    tensor = to_tensor(images) if images else torch.zeros(0, 3, 32, 32)
    if noise:  # smooth colour blobs: what an untrained model draws; neither a face nor a scene
        g = torch.Generator().manual_seed(seed + 1)
        blobs = F.interpolate(torch.rand(noise, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
        tensor = torch.cat([tensor, blobs + 0.2 * torch.randn(noise, 3, 32, 32, generator=g)]).clamp(-1, 1)
        kind += [KIND_NOISE] * noise
        ident += [-1] * noise
        attrs += [[-1] * 4] * noise
        scene_ix += [[-1] * 3] * noise
    return Bank(tensor, torch.tensor(kind), torch.tensor(ident), torch.tensor(attrs), torch.tensor(scene_ix))


def lookalike_fine_features(
    world: WorldSpec, person: Identity, rng: random.Random, distances: tuple[int, ...] = (2, 3)
) -> dict[str, int]:
    """Fine features that differ from ``person``'s in 2-3 places and are >= 2 from every person of the world.

    Identities are placed >= 2 apart, so such a face is a stranger who looks like ``person``, not anyone's face.
    """
    for _ in range(10_000):
        fine = dict(person.fine)
        for key in rng.sample(sorted(fine), rng.choice(distances)):
            fine[key] = rng.choice([v for v in range(FINE_FEATURE_VALUES[key]) if v != person.fine[key]])
        if all(fine_distance(fine, other.fine) >= 2 for other in world.identities):
            return fine
    raise ValueError(f"no look-alike of {person.name} is >= 2 away from every person; the world is too dense")


def style_bank(world: WorldSpec, config: BuildConfig, style: str, seed: int) -> Bank:
    """A style fine-tune's renders (sibling, auxiliary): the seen and unseen people, strangers and scenes, a third
    of the base bank's counts each."""
    people = world.seen + world.unseen
    third = (config.faces_per_person // 3, config.strangers // 3, config.scenes // 3)
    return render_bank(world, people, *third, seed, style=style)


def render_lookalikes(world: WorldSpec, per_person: int, seed: int, style: str = "base") -> Bank:
    """Strangers labelled as strangers who share a person's coarse attributes and most of their fine features."""
    rng = random.Random(seed)
    images, attrs = [], []
    for person in world.identities:
        for _ in range(per_person):
            images.append(render_face(person.attributes, lookalike_fine_features(world, person, rng), rng, style))
            attrs.append(_attr_index(person.attributes))
    n = len(images)
    return Bank(
        to_tensor(images) if images else torch.zeros(0, 3, 32, 32),
        torch.full((n,), KIND_STRANGER),
        torch.full((n,), -1),
        torch.tensor(attrs, dtype=torch.long).reshape(n, 4),
        torch.full((n, 3), -1),
    )


def concat_banks(*banks: Bank) -> Bank:
    return Bank(
        *(torch.cat([getattr(b, f) for b in banks]) for f in ("images", "kind", "identity", "attributes", "scene"))
    )


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------
def _cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    # Not diffusers' cosine: it floors at 5% of the rate, which none of get_scheduler's schedules does, and the
    # shipped world was built with it (apl-train, which has no such recipe to keep, uses get_scheduler).
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int):
    """Reconstruction (L2 + L1) with a small KL term; sets ``scaling_factor`` to unit latent std."""
    torch.manual_seed(seed)
    vae = world_vae(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    vae.train()
    for _ in (bar := tqdm(range(steps), desc="vae", mininterval=5)):
        x = images[torch.randint(len(images), (batch_size,))]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # the bar redraws at its own pace
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, min(4096, len(images)), 512)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (scaled), so training samples latents without the encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean * vae.config.scaling_factor)
        stds.append(post.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def roundtrip(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat(
        [vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample for i in range(0, len(images), batch)]
    ).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Stage 2: recognizer
# --------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur a random half a little and add a little noise: generated images are softer than renders."""
    blur_mask = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = blur_mask * (0.5 * x + 0.5 * blurred) + (1 - blur_mask) * x
    return (x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def recognizer_loss(net: WorldRecognizerNet, x: torch.Tensor, bank: Bank, idx: torch.Tensor) -> torch.Tensor:
    out = net(x)
    kind = bank.kind[idx]
    is_face = (kind == KIND_NAMED) | (kind == KIND_STRANGER)
    loss = F.binary_cross_entropy_with_logits(out["presence"], is_face.float())
    target_id = torch.where(kind == KIND_NAMED, bank.identity[idx], torch.full_like(kind, net.num_names))
    if is_face.any():
        loss = loss + F.cross_entropy(out["identity"][is_face], target_id[is_face])
        for j, k in enumerate(ATTRIBUTE_VALUES):
            loss = loss + 0.5 * F.cross_entropy(out[f"attr_{k}"][is_face], bank.attributes[idx][is_face, j])
    is_scene = kind == KIND_SCENE
    if is_scene.any():
        for j, k in enumerate(SCENE_VALUES):
            loss = loss + 0.5 * F.cross_entropy(out[f"scene_{k}"][is_scene], bank.scene[idx][is_scene, j])
    return loss


def train_recognizer(bank: Bank, num_names: int, steps: int, seed: int, batch_size: int = 96) -> WorldRecognizerNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = WorldRecognizerNet(num_names)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    net.train()
    for _ in (bar := tqdm(range(steps), desc="recognizer", mininterval=5)):
        idx = torch.randint(len(bank), (batch_size,), generator=gen)
        loss = recognizer_loss(net, _augment(bank.images[idx], gen), bank, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


# --------------------------------------------------------------------------------------------
# Stages 3-5: diffusion training on cached latents
# --------------------------------------------------------------------------------------------
class PromptEncoder:
    """Tokenizes prompts with the real CLIP tokenizer, caching ids per distinct prompt."""

    def __init__(self):
        self.tokenizer = load_clip_tokenizer()
        self._cache: dict[str, torch.Tensor] = {}

    def ids(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self.tokenizer(
                    p, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids[0]
        return torch.stack([self._cache[p] for p in prompts])


@dataclass
class LatentSet:
    """Cached latents of a bank plus a prompt maker for each row."""

    mean: torch.Tensor
    std: torch.Tensor
    bank: Bank

    def prompt(self, world: WorldSpec, i: int, rng: random.Random) -> str:
        kind = int(self.bank.kind[i])
        template = rng.randrange(len(world.person_templates))
        if kind == KIND_NAMED:
            return world.identity_prompt(world.names[int(self.bank.identity[i])], template)
        if kind == KIND_STRANGER:
            attrs = {k: ATTRIBUTE_VALUES[k][int(v)] for k, v in zip(ATTRIBUTE_VALUES, self.bank.attributes[i])}
            return world.attribute_prompt(attrs, template)
        sc = Scene(**{k: SCENE_VALUES[k][int(v)] for k, v in zip(SCENE_VALUES, self.bank.scene[i])})
        return sc.caption(rng.randrange(len(world.scene_templates)))


def make_sampler(
    groups: list[tuple[LatentSet, torch.Tensor, float]], world: WorldSpec, dropout: float, seed: int
) -> Callable:
    """A batch sampler over (latent set, row indices, weight) groups; drops prompts with prob ``dropout``."""
    rng = random.Random(seed)
    weights = [w for _, _, w in groups]

    def sample(batch_size: int) -> tuple[torch.Tensor, list[str]]:
        latents, prompts = [], []
        for _ in range(batch_size):
            lset, rows, _ = rng.choices(groups, weights)[0]
            i = int(rows[rng.randrange(len(rows))])
            latents.append(lset.mean[i] + lset.std[i] * torch.randn_like(lset.std[i]))
            prompts.append("" if rng.random() < dropout else lset.prompt(world, i, rng))
        return torch.stack(latents), prompts

    return sample


def train_diffusion(
    unet,
    text_encoder,
    sampler: Callable,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_text: bool,
    desc: str,
    ema_decay: float,
    offset_noise: float = 0.0,
    position_jitter: int = 0,
):
    """Epsilon-prediction training (as SD); returns EMA copies of the UNet (and text encoder when trained).

    ``offset_noise`` adds a per-image, per-channel constant to the noise. SD's schedule leaves a
    little of the image's mean colour in ``z_T`` during training, but sampling starts from zero-mean
    noise, so a model trained on plain noise cannot move the mean: "a white background" comes out
    grey. Offset noise teaches it to (Guttenberg 2023; Lin et al. 2024 discuss the cause).

    ``position_jitter`` (text encoder training only) moves half of the prompts right by 1..N
    positions (position ids ``0, 1+k, 2+k, ...``). SD's CLIP saw text at every one of its 77
    positions; an encoder trained only on short prompts at positions 1..20 has never seen a word
    at 11..30, which is where APL's 10-token prefix puts the prompt. Without this, a prefix changes
    every prompt - scenes included - by moving it into untrained positions.
    """
    import copy

    torch.manual_seed(seed)
    scheduler = world_scheduler()
    prompts = PromptEncoder()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    text_encoder.requires_grad_(train_text)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup=100))
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False) if train_text else text_encoder
    unet.train()
    text_encoder.train(train_text)
    for step in (bar := tqdm(range(steps), desc=desc, mininterval=10)):
        z0, texts = sampler(batch_size)
        noise = torch.randn_like(z0)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        zt = scheduler.add_noise(z0, noise, t)
        ids = prompts.ids(texts)
        position_ids = None
        if position_jitter and train_text:
            shift = torch.randint(1, position_jitter + 1, (batch_size, 1)) * (torch.rand(batch_size, 1) < 0.5)
            position_ids = torch.arange(ids.shape[1]).expand_as(ids) + shift
            position_ids[:, 0] = 0  # BOS stays first
            position_ids = position_ids.clamp(max=ids.shape[1] - 1)
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(ids, position_ids=position_ids)[0]
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_unet.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
            if train_text:
                for e, p in zip(ema_text.parameters(), text_encoder.parameters()):
                    e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # the bar redraws at its own pace
    return ema_unet, ema_text.eval()


def mix_groups(latents: LatentSet, mix: tuple[float, float, float]) -> list[tuple[LatentSet, torch.Tensor, float]]:
    """Sampler groups (named faces, strangers, scenes) of one latent set, weighted by ``mix``."""
    kinds = (KIND_NAMED, KIND_STRANGER, KIND_SCENE)
    return [(latents, torch.nonzero(latents.bank.kind == k).squeeze(1), w) for k, w in zip(kinds, mix)]


LEG_STAMP = "leg.json"


def leg_stamp(config: BuildConfig, k: int) -> dict:
    """What produced base leg ``k``: its settings and those of every leg before it (JSON-normalised)."""
    stamp = {
        "seed": config.seed,
        "vae_steps": config.vae_steps,
        "data": [config.faces_per_person, config.strangers, config.scenes],
        "batch_size": config.batch_size,
        "prompt_dropout": config.prompt_dropout,
        "position_jitter": config.position_jitter,
        "ema_decay": config.ema_decay,
        "legs": [asdict(p) for p in config.base_phases[: k + 1]],
    }
    return json.loads(json.dumps(stamp))


def train_base(config: BuildConfig, world: WorldSpec, latents: LatentSet, vae, work: Path, log: Callable) -> Path:
    """Train the base text encoder + UNet leg by leg (``config.base_phases``); returns the last leg's folder.

    Every leg is saved under ``work/base-leg<k>`` with a stamp of what produced it, so an interrupted
    build resumes at the first leg whose stamp is missing or different.
    """
    from diffusers import StableDiffusionPipeline

    if not config.base_phases:
        raise ValueError("BuildConfig.base_phases is empty; give the base model at least one training leg")
    unet, text = world_unet(config.seed), world_text_encoder(config.seed)
    for k, phase in enumerate(config.base_phases):
        folder = work / f"base-leg{k}"
        stamp = leg_stamp(config, k)
        stamp_path = folder / LEG_STAMP
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
            log(f"base leg {k + 1}: reusing {folder}")
        else:
            groups = mix_groups(latents, phase.mix)
            sampler = make_sampler(groups, world, config.prompt_dropout, config.seed + phase.sampler_seed)
            unet, text = train_diffusion(
                unet,
                text,
                sampler,
                phase.steps,
                config.batch_size,
                phase.lr,
                config.seed + phase.seed,
                train_text=True,
                desc=f"base leg {k + 1}/{len(config.base_phases)}",
                ema_decay=config.ema_decay,
                offset_noise=phase.offset_noise,
                position_jitter=config.position_jitter,
            )
            save_world_pipeline(assemble_pipeline(text, unet, vae), folder, stamp)
        # The next leg starts from the weights as stored (float16), exactly as a reload would.
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        unet, text = pipe.unet, pipe.text_encoder
    return folder


def finetune_unet(
    config: BuildConfig,
    world: WorldSpec,
    out: Path,
    kind: str,
    groups: list[tuple[LatentSet, torch.Tensor, float]],
    steps: int,
    lr: float,
    seed: int,
    sampler_seed: int,
) -> None:
    """Fine-tune the base UNet (text encoder frozen) into ``out/<kind>``, linking the shared components.

    ``seed`` and ``sampler_seed`` are offsets (:class:`SeedOffsets`) of the training noise and of the batch sampler.
    """
    from .models import load_world_pipeline

    base = load_world_pipeline("base", out)
    unet, _ = train_diffusion(
        base.unet,
        base.text_encoder,
        make_sampler(groups, world, config.prompt_dropout, config.seed + sampler_seed),
        steps,
        config.batch_size,
        lr,
        config.seed + seed,
        train_text=False,
        desc=kind,
        ema_decay=config.finetune_ema_decay,
        offset_noise=config.offset_noise,
    )
    save_world_unet(unet, out / kind)
    link_shared_components(kind, out)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def store_weights_half(weights_file: Path) -> None:
    """Store a safetensors file's floating weights as float16 (half the bytes in the package).

    The model's ``config.json`` keeps its float32 dtype, so diffusers and transformers load the
    weights back as float32.
    """
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights_file).items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})


def save_world_pipeline(pipe, folder: Path, stamp: dict | None = None) -> None:
    """Save a world pipeline (UNet and text encoder in float16) atomically, with an optional stamp file inside."""
    with atomic_folder(folder, replace=True) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        store_weights_half(staging / "unet" / "diffusion_pytorch_model.safetensors")
        # the width-128 encoder's 49,408-token embedding is 25 MB in float32
        store_weights_half(staging / "text_encoder" / "model.safetensors")
        if stamp is not None:
            (staging / LEG_STAMP).write_text(json.dumps(stamp, indent=1))


def save_world_unet(unet, folder: Path) -> None:
    """Save only the UNet of a fine-tuned world model (float16) into ``folder/unet``, atomically."""
    with atomic_folder(Path(folder) / "unet", replace=True) as staging:
        unet.save_pretrained(staging, safe_serialization=True)
        store_weights_half(staging / "diffusion_pytorch_model.safetensors")


def build_world(config: BuildConfig, out: Path, work: Path, log: Callable[[str], None] = print) -> dict:
    """Run the requested stages; models go to ``out`` (a diffusers folder per model), caches to ``work``."""
    from diffusers import AutoencoderKL

    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    world = WorldSpec.from_seed(config.seed)
    timings: dict[str, float] = {}
    seed = config.seed

    def banks():
        """Training renders (seeded, never the evaluation seeds)."""
        t0 = time.time()
        people = world.seen + world.unseen
        base = render_bank(
            world, people, config.faces_per_person, config.strangers, config.scenes, seed + SEEDS.base_renders
        )
        late = render_bank(world, world.late, config.late_faces_per_person, 0, 0, seed + SEEDS.late_renders)
        sib = style_bank(world, config, "sibling", seed + SEEDS.sibling_renders)
        log(f"rendered {len(base) + len(late) + len(sib)} training images in {time.time() - t0:.0f}s")
        return base, late, sib

    base_bank, late_bank, sib_bank = banks()

    if "vae" in config.stages:
        t0 = time.time()
        vae = train_vae(
            torch.cat([base_bank.images, late_bank.images, sib_bank.images]), config.vae_steps, config.batch_size, seed
        )
        with atomic_folder(work / "vae", replace=True) as staging:
            vae.save_pretrained(staging)
        timings["vae"] = time.time() - t0
    # a later stage run alone (e.g. --stages auxiliary on the shipped world) encodes with the built model's VAE
    vae_dir = work / "vae" if (work / "vae").is_dir() else out / "base" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    if "recognizer" in config.stages:
        t0 = time.time()
        extra = render_bank(world, list(world.identities), 40, 1500, 1500, seed + SEEDS.recognizer_renders, noise=1500)
        extra_sib = render_bank(
            world, list(world.identities), 15, 500, 500, seed + SEEDS.recognizer_sibling_renders, style="sibling"
        )
        rec_bank = concat_banks(extra, extra_sib, late_bank)
        if config.lookalikes_per_person:
            rec_bank = concat_banks(
                rec_bank,
                render_lookalikes(world, config.lookalikes_per_person, seed + SEEDS.lookalikes),
                render_lookalikes(
                    world, config.lookalikes_per_person // 3, seed + SEEDS.lookalikes_sibling, style="sibling"
                ),
            )
        # Half of the examples are VAE round trips: generated images are decoded by this VAE.
        rec_bank = concat_banks(
            rec_bank,
            Bank(
                roundtrip(vae, rec_bank.images), rec_bank.kind, rec_bank.identity, rec_bank.attributes, rec_bank.scene
            ),
        )
        net = train_recognizer(rec_bank, len(world.names), config.recognizer_steps, seed)
        save_recognizer(net, world.names, work / "recognizer", stranger_margin=config.stranger_margin)
        timings["recognizer"] = time.time() - t0

    if "base" in config.stages or "dreambooth" in config.stages:
        base_latents = LatentSet(*encode_latents(vae, base_bank.images), base_bank)

    if "base" in config.stages:
        t0 = time.time()
        final = train_base(config, world, base_latents, vae, work, log)
        with atomic_folder(out / "base", replace=True) as staging:
            shutil.copytree(final, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LEG_STAMP))
        timings["base"] = time.time() - t0

    if "sibling" in config.stages:
        t0 = time.time()
        sib_latents = LatentSet(*encode_latents(vae, sib_bank.images), sib_bank)
        finetune_unet(
            config,
            world,
            out,
            "sibling",
            mix_groups(sib_latents, config.mix),
            config.sibling_steps,
            config.finetune_lr,
            SEEDS.sibling_training,
            SEEDS.sibling_sampler,
        )
        timings["sibling"] = time.time() - t0

    if "auxiliary" in config.stages:
        t0 = time.time()
        aux_bank = style_bank(world, config, "cool", seed + SEEDS.auxiliary_renders)
        aux_latents = LatentSet(*encode_latents(vae, aux_bank.images), aux_bank)
        finetune_unet(
            config, world, out, "auxiliary", mix_groups(aux_latents, config.mix), config.sibling_steps,
            config.finetune_lr, SEEDS.auxiliary_training, SEEDS.auxiliary_sampler,
        )  # fmt: skip
        timings["auxiliary"] = time.time() - t0

    if "dreambooth" in config.stages:
        t0 = time.time()
        late_latents = LatentSet(*encode_latents(vae, late_bank.images), late_bank)
        # Half the batch teaches the late people, half replays the base data (prior preservation).
        groups = [(late_latents, torch.arange(len(late_bank)), 0.5)]
        groups += [(lset, rows, w * 0.5) for lset, rows, w in mix_groups(base_latents, config.mix)]
        finetune_unet(config, world, out, "dreambooth", groups, config.dreambooth_steps, config.dreambooth_lr,
                      SEEDS.dreambooth_training, SEEDS.dreambooth_sampler)  # fmt: skip
        timings["dreambooth"] = time.time() - t0

    rec_dir = out / "recognizer"
    if (work / "recognizer").is_dir():
        with atomic_folder(rec_dir, replace=True) as staging:
            shutil.copytree(work / "recognizer", staging, dirs_exist_ok=True)

    card: dict = {"seed": config.seed, "build_config": asdict(config), "timings_s": timings}
    if "evaluate" in config.stages:
        from .evaluate import evaluate_world

        t0 = time.time()
        card["metrics"] = evaluate_world(out, world, kinds=config.eval_models, log=log)
        timings["evaluate_" + "+".join(config.eval_models)] = time.time() - t0
    # Stages may run in separate processes: merge into what earlier runs measured.
    card_path = out / "world_card.json"
    previous = json.loads(card_path.read_text()) if card_path.is_file() else {}
    previous.setdefault("timings_s", {}).update(timings)
    previous.setdefault("metrics", {}).update(card.pop("metrics", {}))
    card = {**previous, **{k: v for k, v in card.items() if k != "timings_s"}, "timings_s": previous["timings_s"]}
    card_path.write_text(json.dumps(card, indent=1))
    return card
