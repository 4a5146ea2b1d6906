"""Validation images while a prefix trains: each prompt without and with the prefix, from the same seed.

What a person checks by eye (a name should turn into somebody else, a scene should not change), drawn with the
paper's sampler (DDIM 20, CFG 7, the prefix on the positive prompt only) from the frozen parts already in memory.

Example:

```python
>>> from apl_adapter.training.validation import validation_grid
>>> grid = validation_grid(parts, text_encoder, ["a photo of Ann Lee", "a red cube"], seed=0)  # doctest: +SKIP
>>> grid.size  # doctest: +SKIP
(256, 256)

```
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from ..atomic import atomic_file
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS

VALIDATION_DIR = "validation"
#: small models draw small images; each cell is scaled up (nearest) to at least this many pixels
MIN_CELL = 128


@torch.no_grad()
def validation_grid(
    parts,
    text_encoder,
    prompts: list[str],
    seed: int,
    num_inference_steps: int = PAPER_STEPS,
    guidance_scale: float = PAPER_GUIDANCE_SCALE,
) -> Image.Image:
    """A ``(len(prompts) rows, 2 columns)`` grid: without | with the prefix, image ``k`` from seed ``seed + k``.

    Args:
        parts: the run's :class:`~apl_adapter.training.base_model.FrozenParts`.
        text_encoder: the ``PeftModel`` being trained (its prefix as it is now).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import make_image_grid

    from ..pipelines import apply_apl

    device = next(parts.unet.parameters()).device
    components = {
        "vae": parts.vae.to(device),
        "text_encoder": text_encoder.get_base_model(),
        "tokenizer": parts.tokenizer,
        "unet": parts.unet,
        "scheduler": DDIMScheduler.from_config(parts.noise_scheduler.config),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    plain = StableDiffusionPipeline(**components)
    # a throwaway pipeline: apply_apl changes only its encode_prompt; the live prefix, no cache to go stale
    prefixed = apply_apl(StableDiffusionPipeline(**components), text_encoder, use_prefix_cache=False)
    settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    for pipe in (plain, prefixed):
        pipe.set_progress_bar_config(disable=True)
    cells = []
    for k, prompt in enumerate(prompts):
        # the plain pipeline shares the encoder that carries the prefix: switch the prefix off for it
        for pipe, switch in ((plain, text_encoder.disable_adapter), (prefixed, contextlib.nullcontext)):
            with switch():
                generator = torch.Generator(device="cpu").manual_seed(seed + k)
                cells.append(pipe(prompt, generator=generator, **settings).images[0])
    scale = max(1, -(-MIN_CELL // cells[0].width))
    cells = [cell.resize((cell.width * scale, cell.height * scale), Image.Resampling.NEAREST) for cell in cells]
    return make_image_grid(cells, rows=len(prompts), cols=2)


def save_validation(grid: Image.Image, out: str | Path, step: int) -> Path:
    """Write ``<out>/validation/step-<step>.png`` (atomically) and return its path."""
    folder = Path(out) / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.png"
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
