"""The VAE's view of the training renders: latents for the diffusion stages, round trips for the recognizer."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (scaled), so training samples latents without the encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean * vae.config.scaling_factor)
        stds.append(post.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def roundtrip(vae: AutoencoderKL, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat(
        [vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample for i in range(0, len(images), batch)]
    ).clamp(-1, 1)
