"""Generate every prompt with and without the APL prefix, with the same seeds.

Each image's seed has its own ``torch.Generator``, so an image depends only on (prompt, seed,
prefix or not), never on batching. The prefix reaches the positive prompt only (``apply_apl``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .specs import EvalInputError


@dataclass
class Job:
    """One prompt to generate.

    Attributes:
        key: file-name-safe unique id, e.g. ``"id003-t1"`` or ``"np002"``.
        prompt: the text given to the pipeline.
        identity: the person the prompt names (``None`` for prompts without a person).
        template: the identity template it was made from.
    """

    key: str
    prompt: str
    identity: str | None = None
    template: str | None = None


@dataclass
class GenerationSettings:
    """Sampling settings shared by base and APL runs (the authors': DDIM, 20 steps, CFG 7)."""

    seeds: Sequence[int] = (0, 1, 2, 3)
    steps: int = PAPER_STEPS
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


def slug(text: str, limit: int = 40) -> str:
    """A short file-name-safe form of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


def load_pipeline(base: str | os.PathLike, device: str = "cpu", dtype: str = "float32", scheduler: str = "ddim"):
    """A diffusers pipeline from a local folder only, its scheduler swapped for DDIM by default."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    folder = Path(base).expanduser()
    if not (folder / "model_index.json").is_file():
        raise EvalInputError(
            f"--base {folder} is not a diffusers pipeline folder (no model_index.json). Fix: pass a folder "
            "saved with pipe.save_pretrained(...) (e.g. a local Stable Diffusion 1.5 copy)."
        )
    kwargs = {"local_files_only": True}
    if dtype != "float32":  # the default; passing it would only trigger diffusers' torch_dtype deprecation note
        kwargs["torch_dtype"] = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **kwargs)
    except TypeError:  # pipelines without a safety checker argument
        pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    pipe,
    jobs: Sequence[Job],
    settings: GenerationSettings,
    out_dir: Path,
    desc: str,
    device: str = "cpu",
) -> dict[str, list[Path]]:
    """Generate ``len(settings.seeds)`` images per job into ``out_dir``; returns job key -> image paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {}
    generator_device = "cpu" if str(device).startswith("mps") else device
    for job in tqdm(jobs, desc=desc, unit="prompt"):
        generators = [torch.Generator(generator_device).manual_seed(int(s)) for s in settings.seeds]
        kwargs = {}
        if settings.negative_prompt:
            kwargs["negative_prompt"] = settings.negative_prompt
        result = pipe(
            job.prompt,
            num_images_per_prompt=len(generators),
            generator=generators,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            **kwargs,
        )
        paths[job.key] = []
        for seed, image in zip(settings.seeds, result.images):
            path = out_dir / f"{job.key}_s{seed}.png"
            image.save(path)
            paths[job.key].append(path)
    return paths
