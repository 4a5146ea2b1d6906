"""SD3 / FLUX pipelines as the flow-matching APL loss sees them: prompts in, conditioning out; ``z_t`` in, velocity
out; images in, latents out - each the way the pipeline itself does it.

- Prompts go through the pipeline's own ``encode_prompt``, so a prefixed encoder (a ``PeftModel`` injected in place)
  takes exactly the path inference takes: SD3 joins CLIP-L / CLIP-G (penultimate layer, padded to T5's width) and T5,
  and concatenates the two projected pooled outputs; FLUX takes CLIP's pooled output and T5's states.
- FLUX's transformer reads packed 2x2 latent patches, image / text position ids, ``timestep / 1000`` and (FLUX.1-dev)
  the distilled ``guidance``; the pipeline's static helpers pack and unpack.
- Latents are ``(VAE posterior - shift_factor) * scaling_factor``, as the pipelines invert when decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import APLAdapterError
from ..families import FLUX, SD3, PipelineFamily

#: what FluxPipeline uses unless told otherwise (FLUX.1-dev's recommended guidance is 3.5 too)
FLUX_DEFAULT_GUIDANCE = 3.5
#: the T5 windows of the pipelines' ``__call__`` defaults
DEFAULT_MAX_SEQUENCE_LENGTH = {SD3.name: 256, FLUX.name: 512}


@dataclass
class FlowModel:
    """A loaded SD3 / FLUX pipeline (frozen) and the settings its training calls need.

    Attributes:
        pipe: the ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (or a sibling).
        family: :data:`~apl_adapter.families.SD3` or :data:`~apl_adapter.families.FLUX`.
        max_sequence_length: the T5 window (the pipeline's ``max_sequence_length``).
        guidance: FLUX.1-dev's distilled guidance value given to the transformer; ``None`` for SD3 and for FLUX
            models without guidance embeddings (schnell).
    """

    pipe: Any
    family: PipelineFamily
    max_sequence_length: int
    guidance: float | None = None

    @classmethod
    def of(cls, pipe: Any, family: PipelineFamily, max_sequence_length: int | None, guidance: float | None):
        """Check the family-specific settings and fill their defaults (clear errors for ones that do not apply)."""
        guidance_embeds = family is FLUX and bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        if guidance is not None and not guidance_embeds:
            what = "has no guidance embeddings (FLUX.1-schnell)" if family is FLUX else "is not guidance-distilled"
            raise APLAdapterError(
                f"--guidance {guidance}: this {family.title} transformer {what}; guidance is an input of "
                "guidance-distilled FLUX models (FLUX.1-dev) only. Leave --guidance out."
            )
        if guidance_embeds and guidance is None:
            guidance = FLUX_DEFAULT_GUIDANCE
        length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family.name]
        return cls(pipe, family, length, guidance)

    @property
    def device(self) -> torch.device:
        return next(self.pipe.transformer.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be a multiple of this: SD3's patch size, FLUX's 2x2 packing."""
        return int(self.pipe.transformer.config.patch_size) if self.family is SD3 else 2

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """The pipeline's conditioning for ``B`` prompts, through its own ``encode_prompt`` (prefixed where an
        encoder carries an enabled adapter).

        Returns:
            SD3: ``(prompt_embeds (B, 77 + L, D_t5), pooled (B, P_l + P_g))``; FLUX: ``(prompt_embeds (B, L, D_t5),
            pooled (B, P), text_ids (L, 3))``, with ``L`` = :attr:`max_sequence_length`.
        """
        pipe, device = self.pipe, self.device
        if self.family is SD3:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )  # fmt: skip
            return embeds, pooled
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompts, None, device=device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled, text_ids

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: tuple[torch.Tensor, ...]):
        """The transformer's velocity ``(B, C, h, w)`` at ``z_t`` ``(B, C, h, w)``, ``timesteps`` ``(B,)`` (the
        scheduler's, ``sigma * 1000``), given :meth:`encode`'s conditioning."""
        transformer = self.pipe.transformer
        if self.family is SD3:
            embeds, pooled = condition
            return transformer(
                hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled,
                return_dict=False,
            )[0]  # fmt: skip
        embeds, pooled, text_ids = condition
        batch, channels, height, width = noisy.shape
        pipeline_class = type(self.pipe)
        packed = pipeline_class._pack_latents(noisy, batch, channels, height, width)  # (B, h*w/4, 4C)
        image_ids = pipeline_class._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        guidance = None
        if self.guidance is not None:  # FLUX.1-dev: the distilled guidance scale is an input, as in FluxPipeline
            guidance = torch.full((batch,), self.guidance, device=noisy.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        scale = self.vae_scale_factor
        return pipeline_class._unpack_latents(velocity, height * scale, width * scale, scale)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(mean, std)`` of ``images`` ``(N, 3, H, W)`` in ``[-1, 1]``, each ``(N, C, H/f, W/f)``
        float32 on the CPU, already shifted and scaled (a latent is ``mean + std * n``)."""
        vae = self.pipe.vae
        shift = float(vae.config.shift_factor or 0.0)
        scale = float(vae.config.scaling_factor)
        device = next(vae.parameters()).device
        means, stds = [], []
        for start in range(0, len(images), chunk):
            posterior = vae.encode(images[start : start + chunk].to(device, vae.dtype)).latent_dist
            means.append((posterior.mean.float().cpu() - shift) * scale)
            stds.append(posterior.std.float().cpu() * scale)
        return torch.cat(means), torch.cat(stds)
