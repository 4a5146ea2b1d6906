"""The synthetic world as benchmark inputs: persons, templates, scene prompts, models and recognizers."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

from ..errors import APLAdapterError, check_at_least
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .cache import BaseImageCache
from .protocol import BenchModels, BenchReaders, BenchSpec, Person, SceneCase
from .templates import fill_template, read_templates, robustness_templates

SPLITS = ("seen", "unseen", "late")


def scene_label(scene) -> str:
    """The label scene readers return for a world scene, e.g. ``"red star on white"``."""
    return f"{scene.color} {scene.shape} on {scene.background}"


#: The world has 96 scenes (4 shapes x 6 colours x 4 backgrounds); the bench asks for each once by default:
#: a 24-scene sample moved the scene-accuracy difference by whole scenes (4.2 points each) and hid the damage.
ALL_SCENES = 96


def every_scene_case(world) -> list[SceneCase]:
    """Every scene of the world in every caption template (96 x 4 = 384 prompts per seed)."""
    return [
        SceneCase(scene.caption(template), scene_label(scene))
        for scene in world.scenes
        for template in range(len(world.scene_templates))
    ]


def pick_scenes(world, count: int | Literal["all"]) -> list[SceneCase]:
    """``count`` scenes spread evenly over all of the world's scenes, each background in every caption template;
    ``"all"``: every scene in every caption template (384 prompts on the shipped world).

    Every (background, caption template) pair gets the same number of prompts, give or take one, so
    the bench's per-template scene numbers are not per-background numbers in disguise.
    """
    scenes = list(world.scenes)
    if count == "all":
        return every_scene_case(world)
    if count <= 0:
        return []
    # a stride coprime with the number of scenes visits every background/colour/shape pattern, where a
    # plain scenes[::k] would keep hitting the same position in the shape x colour x background order
    stride = max(len(scenes) // count, 1)
    while math.gcd(stride, len(scenes)) != 1:
        stride += 1
    picked = [scenes[(k * stride) % len(scenes)] for k in range(min(count, len(scenes)))]
    num_templates = len(world.scene_templates)
    used: Counter[tuple[str, int]] = Counter()
    cases = []
    for index, scene in enumerate(picked):
        # the template this background has had least often; ties rotate with the index, so colours and shapes
        # meet every template too (template = index % 4 alone tied it to the background, which the world's
        # scene order cycles fastest)
        template = min(range(num_templates), key=lambda t: (used[scene.background, t], (t - index) % num_templates))
        used[scene.background, template] += 1
        cases.append(SceneCase(scene.caption(template), scene_label(scene)))
    return cases


def read_identity_list(path: str | os.PathLike, world) -> list[Person]:
    """Names (one a line, or ``split<TAB>name``) -> persons of ``world``; unknown names are an error."""
    path = Path(path)
    if not path.is_file():
        raise APLAdapterError(f"Identity file {path} does not exist; write one world name per line.")
    persons = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        split, _, name = line.partition("\t") if "\t" in line else ("", "", line)
        name = name.strip()
        try:
            identity = world.identity(name)
        except KeyError as err:
            raise APLAdapterError(f"{path}: {err.args[0]}") from err
        split = split.strip() or identity.split
        if split not in SPLITS:
            raise APLAdapterError(f"{path}: split {split!r} for {name!r} is unknown; use one of {SPLITS}.")
        persons.append(Person(identity.name, dict(identity.attributes), split))
    if not persons:
        raise APLAdapterError(f"Identity file {path} lists no names.")
    return persons


def templates_in_training_data(folder: str | os.PathLike, templates: list[str], persons: list[Person]) -> list[str]:
    """The templates whose name prompt appears as a ``c1`` in a training data folder's ``metadata.jsonl``."""
    metadata = Path(folder) / "metadata.jsonl"
    if not metadata.is_file():
        raise APLAdapterError(f"--train-data {folder}: metadata.jsonl is missing.")
    prompts = {json.loads(line)["c1"] for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()}
    return [t for t in templates if any(fill_template(t, p.name, p.name) in prompts for p in persons)]


def world_bench_inputs(
    world_seed: int = 0,
    assets: str | os.PathLike | None = None,
    identities_file: str | os.PathLike | None = None,
    templates_file: str | os.PathLike | None = None,
    robustness: bool = False,
    train_data: str | os.PathLike | None = None,
    seeds: list[int] | None = None,
    num_scenes: int | Literal["all"] = ALL_SCENES,
    num_inference_steps: int = PAPER_STEPS,
    guidance_scale: float = PAPER_GUIDANCE_SCALE,
    batch_size: int = 64,
    transfer: bool = True,
    late: bool = True,
    base_cache: str | os.PathLike | None = None,
) -> tuple[BenchSpec, BenchModels, BenchReaders]:
    """Everything :func:`~apl_adapter.bench.runner.run_bench` needs, from the shipped world."""
    from ..world.models import load_world_pipeline
    from ..world.spec import WorldSpec

    check_at_least(("--steps", num_inference_steps, 1), ("--batch-size", batch_size, 1))
    if num_scenes != "all":
        check_at_least(("--num-scenes", num_scenes, 0))
    check_models_match_world(world_seed, assets)
    world = WorldSpec.from_seed(world_seed)
    if identities_file:
        persons = read_identity_list(identities_file, world)
    else:
        persons = [Person(i.name, dict(i.attributes), i.split) for i in world.identities]
    if robustness and templates_file:
        raise APLAdapterError("--robustness and --templates both choose the templates; pass one of them.")
    families: dict[str, str] = {}
    if robustness:
        templates, families = robustness_templates()
    elif templates_file:
        templates, families = read_templates(templates_file)
    else:
        templates = list(world.person_templates)
    spec = BenchSpec(
        persons=persons,
        person_templates=templates,
        scenes=pick_scenes(world, num_scenes),
        seeds=seeds or [0, 1],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        train_templates=templates_in_training_data(train_data, templates, persons) if train_data else [],
        template_families=families,
        base_cache=BaseImageCache(base_cache) if base_cache else None,
    )
    models = BenchModels(
        base=load_world_pipeline("base", assets),
        sibling=_optional_model("sibling", assets) if transfer else None,
        dreambooth=_optional_model("dreambooth", assets) if late else None,
    )
    recognizer_dir = Path(assets) / "recognizer" if assets else None
    return spec, models, world_readers(recognizer_dir)


def check_models_match_world(world_seed: int, assets: str | os.PathLike | None) -> None:
    """The models must be the ones built for ``world_seed``: another world's names mean nothing to them."""
    from ..world.models import ASSETS

    card = Path(assets or ASSETS) / "world_card.json"
    try:
        built = json.loads(card.read_text()).get("seed", 0)
    except (OSError, ValueError, AttributeError):
        built = 0 if assets is None else None  # the shipped card says 0; an unknown folder is checked by loading
    if built is not None and built != world_seed:
        where = f"--assets {assets}" if assets else "the shipped models"
        raise APLAdapterError(
            f"--world-seed {world_seed}, but {where} were built for world seed {built}: their names and faces are "
            f"another world's, so nothing would be measured. Build that world (apl-world build --seed {world_seed} "
            "--out DIR) and pass --assets DIR."
        )


def _optional_model(kind: str, assets):
    """A world model, or ``None`` (its section is then reported as not measured) when it was not built."""
    from ..world.models import load_world_pipeline

    try:
        return load_world_pipeline(kind, assets)
    except FileNotFoundError as err:
        warnings.warn(f"apl-bench: skipping the {kind} model: {err}", stacklevel=2)
        return None


class _AttributeReader:
    def __init__(self, recognizer) -> None:
        self.recognizer = recognizer

    def read_attributes(self, images):
        return self.recognizer.attributes(images)


class _SceneReader:
    def __init__(self, recognizer) -> None:
        self.recognizer = recognizer

    def read_scenes(self, images):
        return [scene_label(scene) for scene in self.recognizer.scenes(images)]


def world_readers(recognizer_dir: str | os.PathLike | None = None) -> BenchReaders:
    """The world's shipped recognizers (one CNN, three heads) behind the bench's three interfaces."""
    from ..world.recognizers import WorldAttributeRecognizer, WorldIdentityRecognizer, WorldSceneRecognizer

    return BenchReaders(
        identity=WorldIdentityRecognizer.from_pretrained(recognizer_dir),
        attributes=_AttributeReader(WorldAttributeRecognizer.from_pretrained(recognizer_dir)),
        scenes=_SceneReader(WorldSceneRecognizer.from_pretrained(recognizer_dir)),
    )
