"""Diffusion training on cached latents, shared by the base model and its fine-tunes: prompts, batches, the loop."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from ...tokenizer import load_clip_tokenizer
from ...tuners.apl.prefix import shifted_position_ids
from ..models import world_scheduler
from ..recognizers import SCENE_VALUES
from ..spec import ATTRIBUTE_VALUES, Scene, WorldSpec
from .banks import KIND_NAMED, KIND_SCENE, KIND_STRANGER, Bank
from .schedule import _cosine_lr

#: draws a batch: latents and their prompts
Sampler = Callable[[int], tuple[torch.Tensor, list[str]]]
#: an extra loss of the text encoder being trained, added to the diffusion loss each step (e.g. :mod:`.contrast`)
TextLoss = Callable[[CLIPTextModel], torch.Tensor]


class PromptEncoder:
    """Tokenizes prompts with the real CLIP tokenizer, caching ids per distinct prompt."""

    def __init__(self) -> None:
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


#: a sampler group: a latent set, the rows of it to draw from, and the group's weight
Group = tuple[LatentSet, torch.Tensor, float]


def make_sampler(groups: list[Group], world: WorldSpec, dropout: float, seed: int) -> Sampler:
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
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    sampler: Sampler,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_text: bool,
    desc: str,
    ema_decay: float,
    offset_noise: float = 0.0,
    position_jitter: int = 0,
    text_loss: TextLoss | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
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

    ``text_loss`` (text encoder training only) is added to the diffusion loss each step, e.g. the name-description
    contrast of :mod:`.contrast`.
    """
    if text_loss is not None and not train_text:
        raise ValueError("text_loss needs train_text=True: it trains the text encoder")
    torch.manual_seed(seed)
    scheduler = world_scheduler()
    prompts = PromptEncoder()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    text_encoder.requires_grad_(train_text)
    # fused: one kernel for all parameters, 13% of a base step at 2 threads (the build's 60-minute bar)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
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
            position_ids = shifted_position_ids(ids, shift)
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(ids, position_ids=position_ids)[0]
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        postfix = {"loss": f"{loss.item():.4f}"}  # the diffusion loss alone, comparable across runs
        if text_loss is not None:
            extra = text_loss(text_encoder)
            postfix["text"] = f"{extra.item():.4f}"
            loss = loss + extra
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
        bar.set_postfix(postfix, refresh=False)  # the bar redraws at its own pace
    return ema_unet, ema_text.eval()


def mix_groups(latents: LatentSet, mix: tuple[float, float, float]) -> list[Group]:
    """Sampler groups (named faces, strangers, scenes) of one latent set, weighted by ``mix``."""
    kinds = (KIND_NAMED, KIND_STRANGER, KIND_SCENE)
    return [(latents, torch.nonzero(latents.bank.kind == k).squeeze(1), w) for k, w in zip(kinds, mix)]
