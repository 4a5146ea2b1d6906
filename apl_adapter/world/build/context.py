"""What the stages of one build share: its settings and folders, the training renders, and the VAE's latents."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from ..spec import WorldSpec
from .banks import Bank, TrainingBanks
from .config import BuildConfig
from .diffusion import LatentSet
from .latents import encode_latents


@dataclass
class BuildContext:
    """One build's shared state. The VAE and the base latents are made on first use, by the first stage that
    needs them: the ``vae`` stage runs first, so every later stage encodes with the VAE it trained."""

    config: BuildConfig
    world: WorldSpec
    out: Path  # the models, one diffusers folder each, and world_card.json
    work: Path  # caches: the VAE, the recognizer, the base legs
    log: Callable[[str], None]
    banks: TrainingBanks
    #: what the ``evaluate`` stage measured, for the world card
    metrics: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def vae(self) -> AutoencoderKL:
        """This build's VAE, or the built world's own for a stage run alone on it (e.g. ``--stages auxiliary``
        with a fresh ``--work``)."""
        vae_dir = self.work / "vae" if (self.work / "vae").is_dir() else self.out / "base" / "vae"
        return AutoencoderKL.from_pretrained(vae_dir).eval()

    def latents(self, bank: Bank) -> LatentSet:
        return LatentSet(*encode_latents(self.vae, bank.images), bank)

    @cached_property
    def base_latents(self) -> LatentSet:
        """The base bank's latents: the base model trains on them, and DreamBooth replays them."""
        return self.latents(self.banks.base)
