"""Stage ``base``: the base text encoder + UNet from scratch, leg by leg, each leg kept and stamped under ``--work``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import AutoencoderKL, StableDiffusionPipeline

from ...atomic import atomic_folder
from ..models import assemble_pipeline, world_text_encoder, world_unet
from ..spec import WorldSpec
from .contrast import name_description_contrast
from .diffusion import LatentSet, PromptEncoder, make_sampler, mix_groups, train_diffusion
from .storage import LEG_STAMP, save_world_pipeline

if TYPE_CHECKING:  # config imports the stage table, which imports this module
    from .config import BasePhase, BuildConfig
    from .context import BuildContext


def leg_stamp(config: BuildConfig, k: int) -> dict[str, object]:
    """What produced base leg ``k``: its settings and those of every leg before it (JSON-normalised)."""
    stamp = {
        "seed": config.seed,
        "vae_steps": config.vae_steps,
        "data": [config.faces_per_person, config.strangers, config.scenes],
        "batch_size": config.batch_size,
        "prompt_dropout": config.prompt_dropout,
        "position_jitter": config.position_jitter,
        "ema_decay": config.ema_decay,
        "legs": [_leg_settings(p) for p in config.base_phases[: k + 1]],
    }
    # the data options, only when on: a shipped-world build still reuses legs stamped before they existed
    for option in ("late_described_faces", "stranger_min_distance", "strangers_like_people"):
        if getattr(config, option):
            stamp[option] = getattr(config, option)
    return json.loads(json.dumps(stamp))


def _leg_settings(phase: BasePhase) -> dict[str, object]:
    """A leg's fields, the name contrast's only when it is on (legs stamped before it existed are reused)."""
    settings = asdict(phase)
    if not phase.name_contrast:
        for key in ("name_contrast", "name_contrast_margin", "name_contrast_people"):
            settings.pop(key)
    return settings


def train_base(
    config: BuildConfig,
    world: WorldSpec,
    latents: LatentSet,
    vae: AutoencoderKL,
    work: Path,
    log: Callable[[str], None],
) -> Path:
    """Train the base text encoder + UNet leg by leg (``config.base_phases``); returns the last leg's folder.

    Every leg is saved under ``work/base-leg<k>`` with a stamp of what produced it, so an interrupted
    build resumes at the first leg whose stamp is missing or different.
    """
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
            text_loss = None
            if phase.name_contrast:
                text_loss = name_description_contrast(
                    world,
                    PromptEncoder().ids,
                    phase.name_contrast,
                    phase.name_contrast_margin,
                    phase.name_contrast_people,
                    seed=config.seed + phase.sampler_seed + 1,
                )
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
                text_loss=text_loss,
            )
            save_world_pipeline(assemble_pipeline(text, unet, vae), folder, stamp)
        # The next leg starts from the weights as stored (float16), exactly as a reload would.
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        unet, text = pipe.unet, pipe.text_encoder
    return folder


def run_base(ctx: BuildContext) -> None:
    """Train the base model's legs into ``work/base-leg<k>`` and ship the last one, without its stamp, as
    ``out/base``."""
    final = train_base(ctx.config, ctx.world, ctx.base_latents, ctx.vae, ctx.work, ctx.log)
    with atomic_folder(ctx.out / "base", replace=True) as staging:
        shutil.copytree(final, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LEG_STAMP))
