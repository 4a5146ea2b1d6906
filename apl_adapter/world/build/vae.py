"""Stage ``vae``: the ``AutoencoderKL`` of every world model, and the latents the diffusion stages train on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ...atomic import atomic_folder
from ..models import world_vae
from .schedule import _cosine_lr

if TYPE_CHECKING:
    from .context import BuildContext


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int) -> AutoencoderKL:
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


def run_vae(ctx: BuildContext) -> None:
    """Train on every training render, both styles, into ``work/vae``."""
    banks, config = ctx.banks, ctx.config
    images = torch.cat([banks.base.images, banks.late.images, banks.sibling.images])
    vae = train_vae(images, config.vae_steps, config.batch_size, config.seed)
    with atomic_folder(ctx.work / "vae", replace=True) as staging:
        vae.save_pretrained(staging)
