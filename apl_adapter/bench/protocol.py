"""The paper's experimental protocol, independent of where models and recognizers come from.

For each identity split (seen / unseen / late) x person template x seed, images are generated
with and without the APL prefix from the same noise (each prompt of a seed its own, :func:`image_seed`; DDIM, 20
steps, CFG 7, prefix on the
positive prompt only) and measured by an identity :class:`~apl_adapter.metrics.Recognizer`
(top-1 accuracy, mean identity score, face presence) and an attribute reader (does the
anonymous face keep the attributes of the named person?). Prompts without a person are generated
the same way and measured by a scene reader (scene accuracy with and without APL) and by the
same-seed pixel change. The base model covers seen and unseen names and scenes; the sibling
model (prefix trained on the base, applied unchanged) covers transfer; the DreamBooth model
covers the late names.

The world's CNN recognizers plug in through :mod:`apl_adapter.bench.world`; real recognizers
implement the same three small interfaces.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..metrics.base import Recognizer, identity_metrics
from ..pipelines import with_and_without_apl
from ..progress import batches
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .cache import BaseImageCache
from .templates import fill_template


class AttributeReader(Protocol):
    """Reads the coarse attributes (e.g. ``{"sex": "male", "hair": "brown"}``) of the face in each image."""

    def read_attributes(self, images: Sequence[Image.Image]) -> list[dict[str, str]]: ...


class SceneReader(Protocol):
    """Names the scene (a label such as ``"red star on white"``) shown in each image."""

    def read_scenes(self, images: Sequence[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class Person:
    """A named person to prompt for, the attributes an anonymous rendering should keep, and the split."""

    name: str
    attributes: dict[str, str]
    split: str


@dataclass(frozen=True)
class SceneCase:
    """A prompt without a person and the scene label a scene reader should return for it."""

    prompt: str
    label: str


@dataclass
class BenchSpec:
    """What to generate. ``train_templates`` marks which person templates the prefix was trained on."""

    persons: list[Person]
    person_templates: list[str]
    scenes: list[SceneCase]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    num_inference_steps: int = PAPER_STEPS
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    batch_size: int = 16
    train_templates: list[str] = field(default_factory=list)
    #: template -> family (robustness suites); the report gives the fall of top-1 per family
    template_families: dict[str, str] = field(default_factory=dict)
    #: images without the prefix are read from / written to this cache (prefixes compared on the same seeds)
    base_cache: BaseImageCache | None = None

    def other_name(self, person: Person) -> str:
        """The second name of a two-name prompt: the next person of the bench."""
        names = [p.name for p in self.persons]
        return names[(names.index(person.name) + 1) % len(names)]

    def person_prompts(self, split: str) -> list[tuple[Person, int, str, int]]:
        """``(person, template index, prompt, seed)`` for every person of ``split``.

        ``{other_name}`` (two names in one prompt) is the next person of the bench, whatever its split.
        """
        return [
            (person, index, fill_template(template, person.name, self.other_name(person)), seed)
            for person in self.persons
            if person.split == split
            for index, template in enumerate(self.person_templates)
            for seed in self.seeds
        ]  # fmt: skip


@dataclass
class BenchModels:
    """Pipelines to measure; ``sibling`` and ``dreambooth`` may be ``None`` (their sections are skipped)."""

    base: object
    sibling: object | None = None
    dreambooth: object | None = None


@dataclass
class BenchReaders:
    identity: Recognizer
    attributes: AttributeReader
    scenes: SceneReader


def image_seed(seed: int, prompt: str) -> int:
    """The noise seed of one bench image: the bench seed and the prompt mixed (BLAKE2b), so each prompt of a seed
    draws its own noise and its images with and without APL share it.

    The bench seed itself as every image's noise (the bench before 2026-12-05) started all 384 scene images of a seed
    from one noise: a seed's base scene accuracy swung 82-98% and its lost / gained pairs were not independent, so
    the McNemar p and the interval overstated what one seed shows (docs/experiments/2026-12-05-text-preservation.md).
    """
    digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63, what torch.Generator.manual_seed takes


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], spec: BenchSpec, desc: str) -> list[Image.Image]:
    """Images for ``prompts``, image ``i`` from ``torch.Generator().manual_seed(seeds[i])`` (same seed = same noise)."""
    images: list[Image.Image] = []
    for part in batches(len(prompts), spec.batch_size, desc, leave=False):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[part]]
        images += pipe(
            list(prompts[part]),
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            generator=generators,
        ).images
    return images


def generate_plain(pipe, prompts: Sequence[str], seeds: Sequence[int], spec: BenchSpec, desc: str) -> list:
    """Images without the prefix; with ``spec.base_cache`` only those not cached yet are generated.

    The cache is read again before each batch and written after it, so bench runs of several prefixes started
    side by side share their base images batch by batch instead of each generating them all.
    """
    cache = spec.base_cache
    if cache is None:
        return generate(pipe, prompts, seeds, spec, desc)
    model = cache.fingerprint(pipe)
    keys = [cache.key(model, p, s, spec.num_inference_steps, spec.guidance_scale) for p, s in zip(prompts, seeds)]
    images: list = [None] * len(prompts)
    for part in batches(len(prompts), spec.batch_size, desc, leave=False):
        indices = range(len(prompts))[part]
        for i in indices:
            images[i] = cache.get(keys[i])
        missing = [i for i in indices if images[i] is None]
        if not missing:
            continue
        generators = [torch.Generator().manual_seed(int(seeds[i])) for i in missing]
        fresh = pipe(
            [prompts[i] for i in missing],
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            generator=generators,
        ).images
        for i, image in zip(missing, fresh):
            cache.put(keys[i], image)
            images[i] = image
    return images


def generate_pair(pipe, adapter, prompts, seeds, spec: BenchSpec, desc: str) -> tuple[list, list]:
    """``(without APL, with APL)`` images of the same prompts and seeds (the images without it may come from the
    cache)."""

    def draw(prefixed: bool) -> list[Image.Image]:
        if prefixed:
            return generate(pipe, prompts, seeds, spec, f"{desc} APL")
        return generate_plain(pipe, prompts, seeds, spec, f"{desc} base")

    return with_and_without_apl(pipe, adapter, draw)


def pixel_change(first: Sequence[Image.Image], second: Sequence[Image.Image]) -> float:
    """Mean absolute pixel difference in [0, 1] between same-seed images (0 = identical)."""
    diffs = [
        np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() / 255.0
        for a, b in zip(first, second)
    ]
    return float(np.mean(diffs))


def attribute_agreement(read: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict:
    """Agreement of read attributes with the named person's: per attribute, averaged, and all-at-once.

    An image where nothing could be read (no face: an empty dict) disagrees on every attribute.
    """
    keys = sorted({key for attrs in expected for key in attrs})
    per_key = {key: float(np.mean([r.get(key) == e.get(key) for r, e in zip(read, expected)])) for key in keys}
    all_match = float(np.mean([all(r.get(k) == e.get(k) for k in e) for r, e in zip(read, expected)]))
    return {
        "mean_agreement": float(np.mean(list(per_key.values()))),
        "all_match_rate": all_match,
        "per_attribute": per_key,
    }


def named_by_attributes_kept(
    observations: Sequence, read: Sequence[dict[str, str]], targets: Sequence[str], expected: Sequence[dict[str, str]]
) -> dict:
    """Identity split by whether the face kept all the named person's attributes.

    The world's recognizer almost never names a face whose coarse attributes differ from the person's (one attribute
    changed, fine features kept: 7-47% still named, `experiments/recognizer_gate.py`), so a prefix that changes an
    attribute scores as anonymizing whatever it does to the identity. ``named_when_kept / kept`` is the top-1 rate
    among faces that keep all of them: the anonymization a change of attributes cannot buy.

    >>> from apl_adapter.metrics.base import FaceObservation
    >>> seen = [FaceObservation(True, 1.0, "Ann"), FaceObservation(True, 1.0, None), FaceObservation(True, 1.0, None)]
    >>> read = [{"hair": "red"}, {"hair": "red"}, {"hair": "black"}]
    >>> named_by_attributes_kept(seen, read, ["Ann"] * 3, [{"hair": "red"}] * 3)
    {'kept': 2, 'named_when_kept': 1, 'changed': 1, 'named_when_changed': 0}
    """
    kept = [
        obs.face_present and all(r.get(k) == v for k, v in e.items()) for obs, r, e in zip(observations, read, expected)
    ]
    named = [obs.face_present and obs.top1 == target for obs, target in zip(observations, targets)]
    return {
        "kept": sum(kept),
        "named_when_kept": sum(n and k for n, k in zip(named, kept)),
        "changed": len(kept) - sum(kept),
        "named_when_changed": sum(n and not k for n, k in zip(named, kept)),
    }


def paired_change(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """What a change did to same-seed pairs: images it broke, images it fixed, the exact McNemar p-value, and a
    95% interval of the accuracy change.

    Only discordant pairs carry information about the change; under "no effect" each one is a fair
    coin, so ``p`` is the exact two-sided binomial test of ``lost`` in ``lost + gained`` tosses (scipy).
    A few points of accuracy over ~100 prompts are often within that noise; ``p`` says when they are not.
    ``change_ci95_points`` is Newcombe's interval for the difference of paired proportions (his method 10,
    from the two Wilson score intervals: :func:`paired_difference_interval`), ``after - before`` in points: how
    far the measured change could be from the true one (so whether a goal such as "at most 2 points lost" is
    met, not only whether anything changed). Unlike the normal approximation it stays inside [-100, 100] and
    keeps its coverage with few discordant pairs.

    >>> paired_change([True, True, True, False], [False, True, True, True])
    {'lost': 1, 'gained': 1, 'mcnemar_p': 1.0, 'change_ci95_points': [-55.2, 55.2]}
    """
    from scipy.stats import binomtest

    if len(before) != len(after):
        raise ValueError(f"paired_change needs one 'after' per 'before': got {len(before)} and {len(after)}")
    lost = sum(b and not a for b, a in zip(before, after))
    gained = sum(a and not b for b, a in zip(before, after))
    both = sum(b and a for b, a in zip(before, after))
    tosses = lost + gained
    p_value = binomtest(lost, tosses, 0.5).pvalue if tosses else 1.0
    low, high = paired_difference_interval(both, lost, gained, len(before) - both - lost - gained)
    interval = [round(100 * low, 1), round(100 * high, 1)]
    return {"lost": lost, "gained": gained, "mcnemar_p": float(p_value), "change_ci95_points": interval}


def paired_difference_interval(both: int, lost: int, gained: int, neither: int) -> tuple[float, float]:
    """Newcombe's 95% interval (Statistics in Medicine 17:2635, 1998, method 10) for ``p_after - p_before`` of
    paired binary outcomes: ``both`` right before and after, ``lost`` right only before, ``gained`` right only
    after, ``neither``. It joins the Wilson score intervals of the two proportions, corrected by their correlation.
    """
    from scipy.stats import binomtest

    n = both + lost + gained + neither
    if n == 0:
        return (-1.0, 1.0)
    p1, p2 = (both + lost) / n, (both + gained) / n

    def wilson(successes: int) -> tuple[float, float]:
        bounds = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        return bounds.low, bounds.high

    l1, u1 = wilson(both + lost)
    l2, u2 = wilson(both + gained)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = (both * neither - lost * gained) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    above = math.sqrt(max((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2, 0.0))
    return (p2 - p1 - below, p2 - p1 + above)


def fall_ratio(before: float, after: float) -> float:
    """How many times a rate fell (``inf`` when it fell to 0 from a positive rate, 1 when both are 0)."""
    if after == 0:
        return float("inf") if before > 0 else 1.0
    return before / after


def _named_rate(spec: BenchSpec, pairs: list) -> float:
    """How often the face is a person the prompt names: with ``{other_name}`` either of the two names counts (a
    prompt naming two people that draws the second one still leaks a name)."""
    hits = 0
    for obs, (person, index, _, _) in pairs:
        named = {person.name}
        if "{other_name}" in spec.person_templates[index]:
            named.add(spec.other_name(person))
        hits += bool(obs.face_present and obs.top1 in named)
    return hits / max(len(pairs), 1)


def measure_persons(pipe, adapter, cases, spec: BenchSpec, readers: BenchReaders, desc: str) -> dict:
    """Generate the cases with and without APL and measure identity, face presence and attributes."""

    def in_family(index: int, family: str) -> bool:
        return spec.template_families.get(spec.person_templates[index]) == family

    prompts = [prompt for _, _, prompt, _ in cases]
    seeds = [image_seed(seed, prompt) for _, _, prompt, seed in cases]
    targets = [person.name for person, *_ in cases]
    expected = [person.attributes for person, *_ in cases]
    plain, anonymized = generate_pair(pipe, adapter, prompts, seeds, spec, desc)
    result: dict = {"num_images": len(cases)}
    verdicts = []
    for label, images in (("base", plain), ("apl", anonymized)):
        observations = readers.identity.observe(images)
        verdicts.append([(obs.top1 or "a stranger") if obs.face_present else "no face" for obs in observations])
        metrics = identity_metrics(observations, targets)
        # attributes are only read off a face: an image without one disagrees on every attribute
        read = [
            attrs if obs.face_present else {}
            for attrs, obs in zip(readers.attributes.read_attributes(images), observations)
        ]
        metrics["attributes"] = attribute_agreement(read, expected)
        metrics["by_attributes_kept"] = named_by_attributes_kept(observations, read, targets, expected)
        metrics["per_template"] = {
            spec.person_templates[index]: identity_metrics(
                [obs for obs, case in zip(observations, cases) if case[1] == index],
                [case[0].name for case in cases if case[1] == index],
            )["top1_accuracy"]
            for index in sorted({case[1] for case in cases})
        }
        if spec.template_families:
            metrics["per_family"] = {
                family: _named_rate(spec, [pair for pair in zip(observations, cases) if in_family(pair[1][1], family)])
                for family in dict.fromkeys(spec.template_families.values())
            }
        result[label] = metrics
    result["accuracy_fall"] = fall_ratio(result["base"]["top1_accuracy"], result["apl"]["top1_accuracy"])
    kept = result["apl"]["by_attributes_kept"]
    if kept["kept"]:  # the fall among APL faces that keep the person's attributes (see named_by_attributes_kept)
        rate = kept["named_when_kept"] / kept["kept"]
        result["fall_when_attributes_kept"] = fall_ratio(result["base"]["top1_accuracy"], rate)
    if spec.template_families:
        result["fall_per_family"] = {
            family: fall_ratio(result["base"]["per_family"][family], result["apl"]["per_family"][family])
            for family in result["base"]["per_family"]
        }
    result["same_seed_pixel_change"] = pixel_change(plain, anonymized)
    result["_images"] = (plain, anonymized, cases)
    result["_verdicts"] = tuple(verdicts)  # what the recognizer read in each image, for the report's grid
    return result


def measure_scenes(pipe, adapter, spec: BenchSpec, readers: BenchReaders, desc: str) -> dict:
    """Scene accuracy with and without APL on prompts without a person, and the same-seed image change."""
    cases = [(scene, seed) for scene in spec.scenes for seed in spec.seeds]
    prompts = [scene.prompt for scene, _ in cases]
    seeds = [image_seed(seed, scene.prompt) for scene, seed in cases]
    plain, anonymized = generate_pair(pipe, adapter, prompts, seeds, spec, desc)
    labels = [scene.label for scene, _ in cases]

    base_read, apl_read = readers.scenes.read_scenes(plain), readers.scenes.read_scenes(anonymized)
    base_ok = [read == label for read, label in zip(base_read, labels)]
    apl_ok = [read == label for read, label in zip(apl_read, labels)]
    base_acc, apl_acc = float(np.mean(base_ok)), float(np.mean(apl_ok))
    return {
        "num_images": len(cases),
        "base": {"scene_accuracy": base_acc},
        "apl": {"scene_accuracy": apl_acc},
        "accuracy_drop_points": 100 * (base_acc - apl_acc),
        "paired": paired_change(base_ok, apl_ok),
        "same_seed_pixel_change": pixel_change(plain, anonymized),
        "_images": (plain, anonymized, cases),
        "_verdicts": (list(base_read), list(apl_read)),
    }


def run_protocol(
    spec: BenchSpec, models: BenchModels, readers: BenchReaders, adapter: str | os.PathLike
) -> dict[str, dict]:
    """All sections of the protocol: ``{"seen", "unseen", "late", "transfer", "scenes", "scenes_sibling"}``.

    Sections whose model or persons are missing are left out. Each section keeps its images under
    ``"_images"`` and what the recognizers read in them under ``"_verdicts"``, for the report's grid (the report
    drops both keys from the JSON).
    """
    sections: dict[str, dict] = {}
    for split in ("seen", "unseen"):
        cases = spec.person_prompts(split)
        if cases:
            sections[split] = measure_persons(models.base, adapter, cases, spec, readers, split)
    if spec.scenes:
        sections["scenes"] = measure_scenes(models.base, adapter, spec, readers, "scenes")
    late = spec.person_prompts("late")
    if models.dreambooth is not None and late:
        sections["late"] = measure_persons(models.dreambooth, adapter, late, spec, readers, "late (DreamBooth)")
    if models.sibling is not None:
        cases = spec.person_prompts("seen") + spec.person_prompts("unseen")
        if cases:
            sections["transfer"] = measure_persons(models.sibling, adapter, cases, spec, readers, "transfer (sibling)")
        if spec.scenes:
            sections["scenes_sibling"] = measure_scenes(models.sibling, adapter, spec, readers, "scenes (sibling)")
    return sections
