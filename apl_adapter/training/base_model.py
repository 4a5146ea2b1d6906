"""Load the frozen parts of a local diffusers Stable Diffusion folder for APL training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import APLAdapterError
from ..families import PipelineFamily, family_of_class_name


@dataclass
class FrozenParts:
    """The base model's components; every weight here is frozen (``requires_grad=False``)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object

    @property
    def image_size(self) -> int:
        """The native image side in pixels (UNet sample size x VAE downsampling)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def read_model_index(base: str | Path) -> tuple[Path, dict]:
    """``(folder, model_index.json)`` of a local diffusers folder; a clear error for anything else."""
    base = Path(base)
    if not base.is_dir():
        raise APLAdapterError(
            f"Base model folder {base} does not exist. Pass a local diffusers folder (e.g. one written by "
            "StableDiffusionPipeline.save_pretrained, or the shipped world: `apl-world info` prints its path)."
        )
    index = base / "model_index.json"
    if not index.is_file():
        raise APLAdapterError(
            f"{base} is not a diffusers pipeline folder: model_index.json is missing. Convert a single-file "
            "checkpoint with diffusers' convert scripts, or pass the folder that holds model_index.json."
        )
    return base, json.loads(index.read_text())


def base_family(base: str | Path) -> PipelineFamily | None:
    """The flow-matching family (SD3 / FLUX) of a base folder, ``None`` for Stable Diffusion 1.x / 2.x; checks that
    an SD3 / FLUX folder has what training loads (a transformer, a VAE, a scheduler, its text encoders)."""
    base, components = read_model_index(base)
    family = family_of_class_name(str(components.get("_class_name", "")))
    if family is not None:
        needed = ("transformer", "vae", "scheduler", *family.encoders)
        missing = [name for name in needed if not components.get(name) or None in components[name]]
        if missing:
            raise APLAdapterError(
                f"{base} ({components['_class_name']}) lacks the component(s) {missing}; APL training on "
                f"{family.title} needs the transformer, the VAE, the scheduler and every text encoder."
            )
    return family


def check_base_folder(base: str | Path, tool: str = "apl-train") -> Path:
    """Raise a clear error unless ``base`` is a local diffusers Stable Diffusion 1.x / 2.x folder (SD3 / FLUX
    folders are trained by :mod:`apl_adapter.training.flow_loop`; ``tool`` names what refuses them)."""
    base, components = read_model_index(base)
    family = family_of_class_name(str(components.get("_class_name", "")))
    if family is not None:
        raise APLAdapterError(
            f"{base} is a {components['_class_name']} ({family.title}); {tool} handles Stable Diffusion 1.x / 2.x "
            f"folders only: {family.title} is not implemented there yet. Sample the images with the pipeline "
            "yourself and write metadata.jsonl (format: apl-train --help); apl-train then trains on it."
        )
    missing = [name for name in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if name not in components]
    if missing:
        raise APLAdapterError(f"{base} lacks the component(s) {missing}; APL needs a Stable Diffusion 1.x/2.x folder.")
    return base


def load_frozen_parts(base: str | Path) -> FrozenParts:
    """Load tokenizer, text encoder, UNet, VAE and a DDPM noise scheduler from ``base``, all frozen, eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = check_base_folder(base)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False)
        module.eval()
    return FrozenParts(tokenizer, text_encoder, unet, vae, noise_scheduler)


def unet_subfolder(folder: str | Path) -> str | None:
    """``"unet"`` for a diffusers model folder, ``None`` for a UNet folder; a clear error for anything else."""
    folder = Path(folder)
    if (folder / "unet" / "config.json").is_file():
        return "unet"
    if (folder / "config.json").is_file():
        return None
    raise APLAdapterError(
        f"--also-through {folder}: no UNet there (neither unet/config.json nor config.json). Pass a diffusers model "
        "folder that shares the base text encoder, or its unet/ folder."
    )


def load_frozen_unet(folder: str | Path, like: torch.nn.Module) -> torch.nn.Module:
    """Load another UNet to train through (``folder/unet`` of a diffusers folder, or a UNet folder), frozen and in
    eval mode; refuse one that cannot read the base text encoder's states or the base latents."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder=unet_subfolder(folder))
    keys = ("cross_attention_dim", "in_channels", "sample_size")
    differ = [f"{k} {unet.config[k]} != {like.config[k]}" for k in keys if unet.config[k] != like.config[k]]
    if differ:
        raise APLAdapterError(
            f"--also-through {folder}: its UNet does not fit the base model ({', '.join(differ)}); a prefix can "
            "train only through UNets of the same family (fine-tunes of the same base)."
        )
    unet.requires_grad_(False)
    return unet.eval()
