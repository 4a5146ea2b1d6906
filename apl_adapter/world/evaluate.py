"""Measure the world's bars: does each model draw who and what its prompts name?

Example:

```python
>>> from apl_adapter.world import WorldSpec, load_world_pipeline, WorldIdentityRecognizer
>>> from apl_adapter.world.evaluate import person_prompts, sample_images
>>> from apl_adapter.metrics import identity_metrics
>>> world = WorldSpec.from_seed(0)
>>> prompts, targets = person_prompts(world, world.seen[:4], per_person=2)
>>> images = sample_images(load_world_pipeline("base"), prompts, seed=0)
>>> identity_metrics(WorldIdentityRecognizer.from_pretrained().observe(images), targets)["num_images"]
8

```
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..metrics.base import identity_metrics
from ..progress import batches
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .recognizers import WorldAttributeRecognizer, WorldIdentityRecognizer, WorldSceneRecognizer
from .render import render_face, render_scene
from .spec import Identity, Scene, WorldSpec, random_fine_features

EVAL_SEED = 1234  # never used by training renders (those use seed + 11 .. seed + 51)


def sample_images(
    pipe,
    prompts: Sequence[str],
    seed: int,
    steps: int = PAPER_STEPS,
    guidance_scale: float = PAPER_GUIDANCE_SCALE,
    batch_size: int = 64,
    progress: str | None = None,
) -> list[Image.Image]:
    """DDIM sampling as the APL authors evaluate (20 steps, CFG 7), deterministic per seed and batch.

    ``progress``: the label of a bar counting images (none by default: callers inside loops have their own).
    """
    images: list[Image.Image] = []
    for part in batches(len(prompts), batch_size, progress or "", disable=progress is None):
        gen = torch.Generator().manual_seed(seed + part.start)
        out = pipe(
            list(prompts[part]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pil",
        )
        images.extend(out.images)
    return images


def person_prompts(world: WorldSpec, people: Sequence[Identity], per_person: int) -> tuple[list[str], list[str]]:
    """Name prompts cycling over every person template; returns (prompts, target names)."""
    prompts, targets = [], []
    for person in people:
        for k in range(per_person):
            prompts.append(world.identity_prompt(person.name, k))
            targets.append(person.name)
    return prompts, targets


def scene_prompts(world: WorldSpec, count: int, seed: int) -> tuple[list[str], list[Scene]]:
    rng = random.Random(seed)
    scenes = [rng.choice(world.scenes) for _ in range(count)]
    return [sc.caption(k) for k, sc in enumerate(scenes)], scenes


def fresh_renders(world: WorldSpec, per_person: int, rng: random.Random) -> tuple[list[Image.Image], list[Identity]]:
    """``per_person`` renders of every person of the world in each style (base first), drawn from ``rng``, and whom
    each shows: the recognizers' held-out check and the build's open-set calibration read them."""
    faces: list[Image.Image] = []
    people: list[Identity] = []
    for style in ("base", "sibling"):
        for person in world.identities:
            faces += [render_face(person.attributes, person.fine, rng, style) for _ in range(per_person)]
            people += [person] * per_person
    return faces, people


def heldout_recognizer_accuracy(
    folder: Path, world: WorldSpec, per_person: int = 10, seed: int = EVAL_SEED
) -> dict[str, float]:
    """Accuracy of each recognizer view on a fresh render set (both styles), never seen in training."""
    rng = random.Random(seed)
    faces, people = fresh_renders(world, per_person, rng)
    names, attrs = [p.name for p in people], [p.attributes for p in people]
    scenes = [rng.choice(world.scenes) for _ in range(len(world.identities) * per_person)]
    scene_images = [render_scene(sc, rng, rng.choice(("base", "sibling"))) for sc in scenes]
    # Strangers who share a person's coarse attributes (random fine features): how often are they taken for
    # that person? Anonymization is measured by this recognizer, so this rate is a floor under any result.
    strangers, described = [], []
    for person in world.seen + world.unseen:
        for _ in range(per_person):
            strangers.append(render_face(person.attributes, random_fine_features(rng), rng))
            described.append(person.name)
    ident = WorldIdentityRecognizer.from_pretrained(folder)
    stranger_obs = ident.observe(strangers)
    face_obs = ident.observe(faces)
    scene_obs = ident.observe(scene_images)
    return {
        "identity_top1": identity_metrics(face_obs, names)["top1_accuracy"],
        "presence": (sum(o.face_present for o in face_obs) + sum(not o.face_present for o in scene_obs))
        / (len(faces) + len(scenes)),
        "attributes": WorldAttributeRecognizer(ident.net, ident.names).agreement(faces, attrs),
        "scene": WorldSceneRecognizer(ident.net, ident.names).accuracy(scene_images, scenes),
        "stranger_as_described_person": identity_metrics(stranger_obs, described)["top1_accuracy"],
        "num_images": len(faces) + len(scenes) + len(strangers),
    }


def late_floor(pipe, world: WorldSpec, ident, sampling_seeds: int = 3) -> dict[str, float | int]:
    """How often a late person's *description* alone draws that person: every late person's attribute prompt in
    every person template, ``sampling_seeds`` times (120 images for the shipped world).

    The late section's own floor. A late name is encoded close to its description (the base model learned it from
    strangers of that look), so a DreamBooth that binds the name to a face can bind the description to it too
    (language drift); APL's faces follow the description, so this rate is a floor under the late section's fall.
    """
    cases = [(p, k) for p in world.late for k in range(len(world.person_templates))]
    prompts = [world.attribute_prompt(p.name, k) for p, k in cases]
    targets = [p.name for p, _ in cases]
    observed = [
        obs for s in range(sampling_seeds) for obs in ident.observe(sample_images(pipe, prompts, EVAL_SEED + 3 + s))
    ]
    metrics = identity_metrics(observed, targets * sampling_seeds)
    return {**as_described_person(metrics, len(observed)), "num_images": len(observed)}


def as_described_person(metrics: dict, num_images: int) -> dict[str, float | int]:
    """The floor from :func:`identity_metrics` of faces drawn from attribute prompts, scored against the person each
    prompt describes: how often, and how many, the recognizer takes for that person."""
    rate = metrics["top1_accuracy"]
    return {"top1_as_described_person": rate, "as_described_person_count": round(rate * num_images)}


def evaluate_world(
    out: Path,
    world: WorldSpec,
    per_person: int = 3,
    num_scenes: int = 48,
    kinds: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Sample the models ``kinds`` (default: all) in ``out`` and measure the bars of the world issue."""
    from .models import load_world_pipeline

    out = Path(out)
    rec_dir = out / "recognizer"
    ident = WorldIdentityRecognizer.from_pretrained(rec_dir)
    attr = WorldAttributeRecognizer(ident.net, ident.names)
    scene_rec = WorldSceneRecognizer(ident.net, ident.names)
    metrics: dict = {"recognizers_heldout": heldout_recognizer_accuracy(rec_dir, world)}
    log(f"recognizers on held-out renders: {metrics['recognizers_heldout']}")
    groups = {"base": ("seen", "unseen", "late"), "sibling": ("seen", "unseen"), "dreambooth": ("late",)}
    for kind in kinds or tuple(groups):  # the auxiliary model is for training, never measured
        if not (out / kind / "unet").is_dir():
            continue
        t0 = time.time()
        pipe = load_world_pipeline(kind, out)
        row: dict = {"load_s": time.time() - t0}
        for split in groups[kind]:
            prompts, targets = person_prompts(world, getattr(world, split), per_person)
            m = identity_metrics(ident.observe(sample_images(pipe, prompts, EVAL_SEED)), targets)
            row[split] = {k: m[k] for k in ("top1_accuracy", "face_presence_rate", "mean_identity_score", "num_images")}
        # every person's attribute prompt in every person template (160 images for the shipped world)
        cases = [(p, k) for k in range(len(world.person_templates)) for p in world.seen + world.unseen]
        people = [p for p, _ in cases]
        prompts = [world.attribute_prompt(p.name, k) for p, k in cases]
        images = sample_images(pipe, prompts, EVAL_SEED + 1)
        observed = ident.observe(images)
        # How often a face drawn from someone's *attribute* prompt is recognized as that person: the floor APL can
        # reach with c2 = attribute prompt (people sharing attributes are confused by any recognizer).
        as_described = identity_metrics(observed, [p.name for p in people])
        row["attribute_prompts"] = {
            "attribute_agreement": attr.agreement(images, [p.attributes for p in people]),
            **as_described_person(as_described, len(images)),
            "face_presence_rate": as_described["face_presence_rate"],
            "num_images": len(images),
        }
        if "late" in groups[kind]:
            row["late_attribute_prompts"] = late_floor(pipe, world, ident)
        prompts, scenes = scene_prompts(world, num_scenes, EVAL_SEED + 2)
        t0 = time.time()
        images = sample_images(pipe, prompts, EVAL_SEED + 2)
        row["scene_sampling_s_per_64"] = (time.time() - t0) * 64 / len(prompts)
        row["scenes"] = {"scene_accuracy": scene_rec.accuracy(images, scenes), "num_images": len(images)}
        metrics[kind] = row
        log(f"{kind}: {row}")
    return metrics
