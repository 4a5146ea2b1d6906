"""The world's text-to-image models in real diffusers/transformers classes, and their loaders.

Architecture (chosen for a 2-core CPU budget): 32x32 RGB images, an ``AutoencoderKL`` that
downsamples 2x to 16x16x4 latents, a ~2.2 M-parameter ``UNet2DConditionModel`` on those latents,
a 3-layer width-128 ``CLIPTextModel`` over the real 49,408-token CLIP vocabulary (causal, 77
positions, so APL's prefix layout is exactly that of SD 1.5), and SD 1.5's DDIM scheduler.

Three models ship in ``assets/``:

- ``base``: trained from scratch on name, attribute and scene prompts (late names excluded);
- ``sibling``: the base UNet fine-tuned on a shifted style (warm grade + dark frame), text encoder
  unchanged - the world's "Realistic Vision", for the transfer test;
- ``dreambooth``: the base UNet fine-tuned on the late identities, text encoder unchanged;
- ``auxiliary`` (not shipped; ``apl-world build --stages auxiliary`` makes it in 80 s): the base UNet
  fine-tuned on a third style (cool grade + light frame) like the sibling, for prefixes to train through
  (``apl-train --also-through``); no bench measures it.

``sibling``, ``dreambooth`` and ``auxiliary`` store only their UNet; their other components are links to
``base`` so each folder still loads as a normal diffusers folder.

Example:

```python
>>> from apl_adapter.world import load_world_pipeline
>>> pipe = load_world_pipeline("base")
>>> images = pipe(["a photo of a red circle on a white background"], num_inference_steps=20,
...               guidance_scale=7.0, output_type="pil").images
>>> images[0].size
(32, 32)

```
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..testing import tiny_clip_text_config
from .render import IMAGE_SIZE

ASSETS = Path(__file__).parent / "assets"
#: the full-strength APL prefix trained on the shipped world (a PEFT adapter folder; its recipe in recipe.json)
SHIPPED_PREFIX = ASSETS / "apl-prefix"
MODEL_KINDS = ("base", "sibling", "dreambooth", "auxiliary")
#: 64 was the first shipped width: a 10 x 64 prefix could not move a name without moving scenes
#: (docs/experiments/2026-12-02-world.md)
TEXT_WIDTH = 128
TEXT_LAYERS = 3
LATENT_SIZE = IMAGE_SIZE // 2


def world_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A fresh 3-layer, width-128 causal CLIP text encoder with the real vocabulary and 77 positions."""
    torch.manual_seed(seed)
    return CLIPTextModel(
        tiny_clip_text_config(hidden_size=TEXT_WIDTH, layers=TEXT_LAYERS, heads=4, projection_dim=TEXT_WIDTH)
    )


def world_unet(seed: int = 0) -> UNet2DConditionModel:
    """A fresh ~2.2 M-parameter UNet on 16x16x4 latents: two levels (16 -> 8), attention at 8x8 only.

    As SDXL does at its highest resolution, the 16x16 level has no attention: on 2 CPU cores its
    self-attention (256 tokens, head dim 8) cost 60% of a training step. The time saved buys wider
    channels (48, 96) and more training steps.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def world_vae(seed: int = 0) -> AutoencoderKL:
    """A fresh ``AutoencoderKL``: 32x32x3 images <-> 16x16x4 latents (one 2x downsampling)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=IMAGE_SIZE,
    )


def world_scheduler() -> DDIMScheduler:
    """DDIM configured as Stable Diffusion 1.5 ships it (scaled-linear betas, steps_offset 1)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def assemble_pipeline(text_encoder, unet, vae, scheduler=None) -> StableDiffusionPipeline:
    """A real ``StableDiffusionPipeline`` from world components and the real CLIP tokenizer."""
    from ..tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler or world_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def model_path(kind: str = "base", assets: str | os.PathLike | None = None) -> Path:
    """The diffusers folder of a shipped world model (one of :data:`MODEL_KINDS`)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown world model {kind!r}; choose one of {MODEL_KINDS}")
    path = Path(assets or ASSETS) / kind
    if not (path / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"world model {kind!r} not found under {path}. Fix: run `apl-world build"
            + (" --stages auxiliary" if kind == "auxiliary" else "")
            + "` (or pass --assets to the folder a build wrote)."
        )
    return path


def load_world_pipeline(kind: str = "base", assets: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """Load a shipped world model as a ``StableDiffusionPipeline`` (offline, float32, CPU).

    The sibling and DreamBooth models share the base text encoder, tokenizer and VAE; only their
    UNet differs.
    """
    base = model_path("base", assets)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if kind != "base":
        pipe.unet = UNet2DConditionModel.from_pretrained(model_path(kind, assets) / "unet")
        pipe.register_modules(unet=pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def link_shared_components(kind: str, assets: str | os.PathLike | None = None) -> None:
    """Make ``assets/<kind>`` a full diffusers folder by linking the base components it shares."""
    root = Path(assets or ASSETS)
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "tokenizer", "vae", "scheduler", "model_index.json"):
        link = folder / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(Path("..") / "base" / name)
