"""``generate-identity-data``: sample APL training data from the base model itself, as the authors do.

For each name, ``per_name`` images are sampled with the name prompt (DDIM 20 steps, CFG 7 by
default) and written as identity triplets; optional captions give preservation pairs the same
way. ``images_from="description"`` samples the identity images with the anonymous description
``c2`` instead (the faces the prefix should produce; not the paper's data, see
docs/experiments/2026-12-02-world.md). The output is a data folder in the format of
:mod:`apl_adapter.training.data`, written to a temporary folder first and renamed when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..atomic import atomic_folder
from ..errors import APLAdapterError, check_output_folder
from ..progress import batches
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .base_model import check_base_folder
from .data import METADATA_NAME


@dataclass(frozen=True)
class IdentitySpec:
    """A name to anonymize and its anonymous target prompt ``c2`` (``""`` = the authors' empty prompt)."""

    name: str
    c2: str = ""


def read_identity_file(path: str | os.PathLike) -> list[IdentitySpec]:
    """Read ``Name<TAB>anonymous description prompt`` lines (the description is optional; ``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise APLAdapterError(f"Identity file {path} does not exist; write one 'Name<TAB>description' per line.")
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, c2 = line.partition("\t")
            specs.append(IdentitySpec(name.strip(), c2.strip()))
    if not specs:
        raise APLAdapterError(f"Identity file {path} lists no names; write one 'Name<TAB>description' per line.")
    return specs


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty, non-comment lines of a text file (templates, captions)."""
    path = Path(path)
    if not path.is_file():
        raise APLAdapterError(f"{what} file {path} does not exist; write one per line.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise APLAdapterError(f"{what} file {path} is empty; write one per line.")
    return lines


def generate_identity_data(
    base: str | os.PathLike,
    identities: list[IdentitySpec],
    out: str | os.PathLike,
    per_name: int = 100,
    templates: tuple[str, ...] = ("a photo of {name}",),
    captions: list[str] | None = None,
    per_caption: int = 10,
    num_inference_steps: int = PAPER_STEPS,
    guidance_scale: float = PAPER_GUIDANCE_SCALE,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = True,
    images_from: Literal["name", "description"] = "name",
    overwrite: bool = False,
) -> Path:
    """Sample identity triplets (and optional preservation pairs) from the base model into ``out`` (new or empty,
    or ``overwrite``: replaced when the new folder is complete).

    Image ``k`` of name ``i`` uses template ``k % len(templates)`` and the seed ``seed + running index``,
    so a run is reproducible. ``images_from`` says which prompt draws the identity images: the name
    prompt ``c1`` (the authors: images of the person) or the description ``c2`` (images of the
    anonymous face the prefix should produce; every name then needs a description). Returns ``out``.

    Example:

    ```python
    >>> from apl_adapter.training.generate import IdentitySpec, generate_identity_data
    >>> people = [IdentitySpec("Ann Lee", "a photo of a woman, brown hair")]
    >>> generate_identity_data("world-base", people, "apl-data", per_name=100,  # doctest: +SKIP
    ...                        captions=["a red cube on a table"])
    PosixPath('apl-data')

    ```
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = Path(out)
    check_output_folder(out, overwrite)
    if images_from not in ("name", "description"):
        raise APLAdapterError(f"images_from must be 'name' or 'description', got {images_from!r}.")
    if images_from == "description":
        missing = [spec.name for spec in identities if not spec.c2]
        if missing:
            raise APLAdapterError(
                f"Identity images from the description need one for every name; {', '.join(missing)} has none. "
                "Write 'Name<TAB>description' lines, or sample the images from the name prompt."
            )
    for template in templates:
        if "{name}" not in template:
            raise APLAdapterError(f"Template {template!r} has no '{{name}}' placeholder, e.g. 'a photo of {{name}}'.")
    pipe = StableDiffusionPipeline.from_pretrained(
        check_base_folder(base, "apl-train generate-identity-data"), safety_checker=None
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    jobs: list[tuple[str, dict]] = []  # (the prompt that draws the image, its metadata row)
    for spec in identities:
        for k in range(per_name):
            c1 = templates[k % len(templates)].format(name=spec.name)
            row = {"kind": "identity", "c1": c1, "c2": spec.c2, "identity": spec.name}
            jobs.append((c1 if images_from == "name" else spec.c2, row))
    for caption in captions or []:
        jobs.extend((caption, {"kind": "preservation", "c1": caption, "c2": caption}) for _ in range(per_caption))
    with atomic_folder(out, replace=True) as staging:
        (staging / "images").mkdir()
        with (staging / METADATA_NAME).open("w", encoding="utf-8") as metadata:
            for part in batches(len(jobs), batch_size, "generate data", disable=not show_progress):
                start, chunk = part.start, jobs[part]
                generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
                images = pipe(
                    [prompt for prompt, _ in chunk],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                ).images
                for j, ((_, row), image) in enumerate(zip(chunk, images)):
                    file_name = f"images/{start + j:06d}.png"
                    image.save(staging / file_name)
                    metadata.write(json.dumps({"file_name": file_name, **row}) + "\n")
    return out
