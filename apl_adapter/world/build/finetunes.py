"""Stages ``sibling``, ``auxiliary`` and ``dreambooth``: the base UNet fine-tuned, text encoder frozen.

Each writes only ``out/<kind>/unet``; the other components are the base's, linked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models import link_shared_components, load_world_pipeline
from ..spec import WorldSpec
from .banks import Bank, style_bank
from .diffusion import Group, make_sampler, mix_groups, train_diffusion
from .seeds import SEEDS
from .storage import save_world_unet

if TYPE_CHECKING:  # config imports the stage table, which imports this module
    from .config import BuildConfig
    from .context import BuildContext


def finetune_unet(
    config: BuildConfig,
    world: WorldSpec,
    out: Path,
    kind: str,
    groups: list[Group],
    steps: int,
    lr: float,
    seed: int,
    sampler_seed: int,
) -> None:
    """Fine-tune the base UNet (text encoder frozen) into ``out/<kind>``, linking the shared components.

    ``seed`` and ``sampler_seed`` are offsets (:class:`.SeedOffsets`) of the training noise and of the batch sampler.
    The EMA decays at ``config.finetune_ema_decay``, not the base's ``ema_decay``.
    """
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


def run_sibling(ctx: BuildContext) -> None:
    """The sibling style: a model the prefix never trains through, so the bench measures transfer on it."""
    config = ctx.config
    groups = mix_groups(ctx.latents(ctx.banks.sibling), config.mix)
    finetune_unet(
        config,
        ctx.world,
        ctx.out,
        "sibling",
        groups,
        config.sibling_steps,
        config.finetune_lr,
        SEEDS.sibling_training,
        SEEDS.sibling_sampler,
    )


def run_auxiliary(ctx: BuildContext) -> None:
    """A third style (cool grade, light frame), trained as the sibling: a model prefixes may *train* through
    (``apl-train --also-through``) and that no bench measures."""
    config = ctx.config
    bank = style_bank(ctx.world, config, "cool", config.seed + SEEDS.auxiliary_renders)
    groups = mix_groups(ctx.latents(bank), config.mix)
    finetune_unet(
        config,
        ctx.world,
        ctx.out,
        "auxiliary",
        groups,
        config.sibling_steps,
        config.finetune_lr,
        SEEDS.auxiliary_training,
        SEEDS.auxiliary_sampler,
    )


def replay_mask(bank: Bank, world: WorldSpec) -> torch.Tensor:
    """(N,) bool: the base rows DreamBooth replays - all but the strangers drawn under a late person's name."""
    late = torch.tensor([world.names.index(p.name) for p in world.late], dtype=bank.identity.dtype)
    return ~torch.isin(bank.identity, late)


def run_dreambooth(ctx: BuildContext) -> None:
    """The late people learned by name: half the batch teaches them, half replays the base data (prior
    preservation) without the base's strangers drawn under late names, which would teach the opposite."""
    config, late = ctx.config, ctx.banks.late
    keep = replay_mask(ctx.base_latents.bank, ctx.world)
    groups: list[Group] = [(ctx.latents(late), torch.arange(len(late)), 0.5)]
    groups += [(lset, rows[keep[rows]], w * 0.5) for lset, rows, w in mix_groups(ctx.base_latents, config.mix)]
    finetune_unet(
        config,
        ctx.world,
        ctx.out,
        "dreambooth",
        groups,
        config.dreambooth_steps,
        config.dreambooth_lr,
        SEEDS.dreambooth_training,
        SEEDS.dreambooth_sampler,
    )
