"""Stages ``sibling``, ``auxiliary`` and ``dreambooth``: the base UNet fine-tuned, text encoder frozen.

Each writes only ``out/<kind>/unet``; the other components are the base's, linked.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models import link_shared_components, load_world_pipeline
from ..spec import WorldSpec
from .banks import KIND_NAMED, KIND_STRANGER, Bank, style_bank
from .diffusion import Group, LatentSet, make_sampler, mix_groups, train_diffusion
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


def late_described_mask(bank: Bank, world: WorldSpec) -> torch.Tensor:
    """(N,) bool: the base rows that are strangers drawn under a late person's name (``late_described_faces``)."""
    late = torch.tensor([world.names.index(p.name) for p in world.late], dtype=bank.identity.dtype)
    return (bank.kind == KIND_NAMED) & torch.isin(bank.identity, late)


def replay_mask(bank: Bank, world: WorldSpec) -> torch.Tensor:
    """(N,) bool: the base rows DreamBooth replays - all but the strangers drawn under a late person's name."""
    return ~late_described_mask(bank, world)


def description_prior(latents: LatentSet, world: WorldSpec) -> tuple[LatentSet, torch.Tensor]:
    """The strangers drawn under a late person's name, relabelled as strangers: their prompt becomes the late
    person's *description* (the class prompt of DreamBooth's prior preservation), so DreamBooth keeps drawing that
    description as many people while it binds the name to one face. Returns the relabelled set and its rows."""
    rows = torch.nonzero(late_described_mask(latents.bank, world)).squeeze(1)
    kind = latents.bank.kind.clone()
    kind[rows] = KIND_STRANGER
    return LatentSet(latents.mean, latents.std, replace(latents.bank, kind=kind)), rows


def run_dreambooth(ctx: BuildContext) -> None:
    """The late people learned by name: half the batch teaches them, half replays the base data (prior
    preservation) without the base's strangers drawn under late names, which would teach the opposite.

    With ``config.dreambooth_description_prior`` > 0 that share of the batch (taken from the replay half) replays
    those strangers under the late people's descriptions instead: a late name is encoded close to its description
    (the base model learned it from strangers of that look), so teaching the name a face also teaches the
    description that face unless the description's own images are replayed - DreamBooth's language drift, which
    made the description alone draw the late person (a look-alike floor under the late section).
    """
    config, late = ctx.config, ctx.banks.late
    keep = replay_mask(ctx.base_latents.bank, ctx.world)
    prior = config.dreambooth_description_prior
    groups: list[Group] = [(ctx.latents(late), torch.arange(len(late)), 0.5)]
    groups += [
        (lset, rows[keep[rows]], w * (0.5 - prior)) for lset, rows, w in mix_groups(ctx.base_latents, config.mix)
    ]
    if prior > 0:
        described, rows = description_prior(ctx.base_latents, ctx.world)
        if not len(rows):
            raise ValueError(
                "dreambooth_description_prior replays the strangers the base model drew under late names, and this "
                "build has none (late_described_faces = 0): set late_described_faces > 0 or the prior to 0."
            )
        groups.append((described, rows, prior))
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
