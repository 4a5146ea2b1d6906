"""Write APL training data from the world in the on-disk format ``apl-train`` reads for real models too.

A folder with ``metadata.jsonl`` and ``images/``; one JSON object per line:

- identity triplet: ``{"file_name": "images/000123.png", "kind": "identity", "c1": "a photo of <Name>",
  "c2": "a photo of a male person, brown hair, ...", "identity": "<Name>"}`` - the image is sampled
  from the base model with the name prompt, as the APL authors do;
- preservation pair: ``{"file_name": ..., "kind": "preservation", "c1": caption, "c2": caption}``
  - a scene rendered without people, with its caption.

Example:

```python
>>> from apl_adapter.world.data import write_apl_dataset
>>> import tempfile
>>> rows = write_apl_dataset(tempfile.mkdtemp() + "/apl-data", images_per_person=2, num_scenes=4)
>>> rows
44

```
"""

from __future__ import annotations

import json
import os
import random
from typing import Literal

from tqdm.auto import tqdm

from ..atomic import atomic_folder
from ..errors import check_output_folder
from ..progress import batches
from .evaluate import sample_images
from .render import render_scene
from .spec import WorldSpec


def write_apl_dataset(
    out: str | os.PathLike,
    images_per_person: int = 100,
    num_scenes: int = 1000,
    split: str = "seen",
    seed: int = 0,
    world_seed: int = 0,
    templates: list[int] | None = None,
    assets: str | os.PathLike | None = None,
    batch_size: int = 64,
    scene_templates: list[int] | None = None,
    images_from: Literal["name", "description"] = "name",
    overwrite: bool = False,
) -> int:
    """Sample identity triplets for the people of ``split`` and render preservation pairs; returns the row count.

    ``templates`` restricts the person templates of the identity triplets (indices), so a benchmark
    can hold some out of APL training; ``scene_templates`` restricts the captions of the
    preservation pairs (default: all of them - the prefix must leave every person-free prompt
    alone, and a prefix trained on one caption template changes the others). ``out`` must be new or empty, or
    ``overwrite``; the folder is staged next to it and swapped in at the end, so a failure leaves no half dataset
    behind (and keeps what ``out`` held).
    ``images_from="description"`` draws each identity image with the person's attribute prompt
    (``c2``) instead of the name prompt (``c1``, the authors' data), from the same seed.
    """
    from .models import load_world_pipeline

    world = WorldSpec.from_seed(world_seed)
    people = getattr(world, split)
    person_templates = templates or list(range(len(world.person_templates)))
    scene_templates = scene_templates or list(range(len(world.scene_templates)))
    if images_from not in ("name", "description"):
        raise ValueError(f"images_from must be 'name' or 'description', got {images_from!r}")
    check_output_folder(out, overwrite)
    rng = random.Random(seed)
    rows: list[dict] = []
    with atomic_folder(out, replace=True, kind="data") as tmp:
        (tmp / "images").mkdir()
        pipe = load_world_pipeline("base", assets)
        jobs = [(p, person_templates[k % len(person_templates)]) for p in people for k in range(images_per_person)]
        for part in batches(len(jobs), batch_size, "identity images"):
            start, chunk = part.start, jobs[part]
            c1s = [world.identity_prompt(p.name, t) for p, t in chunk]
            c2s = [world.attribute_prompt(p.attributes, t) for p, t in chunk]
            drawn = c1s if images_from == "name" else c2s
            for (person, template), c1, c2, image in zip(chunk, c1s, c2s, sample_images(pipe, drawn, seed + start)):
                name = f"images/{len(rows):06d}.png"
                image.save(tmp / name)
                rows.append({"file_name": name, "kind": "identity", "c1": c1, "c2": c2, "identity": person.name,
                             "c2_contrasts": world.attribute_contrasts(person.attributes, template)})  # fmt: skip
        for _ in tqdm(range(num_scenes), desc="scene images", unit="image"):
            scene = rng.choice(world.scenes)
            caption = scene.caption(rng.choice(scene_templates))
            name = f"images/{len(rows):06d}.png"
            render_scene(scene, rng).save(tmp / name)
            rows.append({"file_name": name, "kind": "preservation", "c1": caption, "c2": caption})
        with open(tmp / "metadata.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)
