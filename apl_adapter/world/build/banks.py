"""The renders every stage trains on: :class:`Bank` (images with their labels) and the render banks."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..recognizers import SCENE_VALUES
from ..render import render_face, render_scene, to_tensor
from ..spec import (
    ATTRIBUTE_VALUES,
    FINE_FEATURE_VALUES,
    Identity,
    Scene,
    WorldSpec,
    fine_distance,
    random_attributes,
    stranger_fine_features,
)
from .seeds import SEEDS

if TYPE_CHECKING:  # config imports the stage table, which imports this module
    from .config import BuildConfig

KIND_NAMED, KIND_STRANGER, KIND_SCENE, KIND_NOISE = 0, 1, 2, 3
#: the faces a described (late) person's name is drawn with are at least this far from every person of that look:
#: a random one is the person's own face 1 time in 864 and within 2 about 1 time in 10
DESCRIBED_MIN_DISTANCE = 3


@dataclass
class Bank:
    """Rendered images with their labels; ``-1`` marks a label that does not apply."""

    images: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    kind: torch.Tensor  # (N,) KIND_*
    identity: torch.Tensor  # (N,) index into world.names, -1 if not a named person
    attributes: torch.Tensor  # (N, 4) indices into ATTRIBUTE_VALUES, -1 for no face
    scene: torch.Tensor  # (N, 3) indices into SCENE_VALUES, -1 for no scene

    def __len__(self) -> int:
        return len(self.kind)

    def subset(self, mask: torch.Tensor) -> Bank:
        return Bank(*(getattr(self, f)[mask] for f in ("images", "kind", "identity", "attributes", "scene")))


def _attr_index(attributes: dict[str, str]) -> list[int]:
    return [ATTRIBUTE_VALUES[k].index(attributes[k]) for k in ATTRIBUTE_VALUES]


def _scene_index(scene: Scene) -> list[int]:
    return [SCENE_VALUES[k].index(getattr(scene, k)) for k in SCENE_VALUES]


def render_bank(
    world: WorldSpec,
    people: list[Identity],
    faces_per_person: int,
    strangers: int,
    scenes: int,
    seed: int,
    style: str = "base",
    noise: int = 0,
    described: Sequence[Identity] = (),
    described_per_person: int = 0,
    stranger_min_distance: int = 0,
    strangers_like: int = 0,
) -> Bank:
    """Render named faces, stranger faces (random people), scenes and no-content noise images.

    ``described`` people are known by how they look, not by their face: each gets ``described_per_person`` images
    of strangers with their coarse attributes (:data:`DESCRIBED_MIN_DISTANCE` or more away), labelled with their
    name (what a web-scale text encoder knows of a person an image model has never drawn). Strangers are
    ``stranger_min_distance`` or more fine features away from every person of the world who shares their coarse
    attributes (0: any fine features). ``strangers_like`` more strangers per person of ``people`` take that
    person's coarse attributes, so a description is drawn as many people, not mostly as the one person of the world
    who has that look (the build passes it to the base bank only: the base model is where descriptions are learned).
    """
    rng = random.Random(seed)
    images, kind, ident, attrs, scene_ix = [], [], [], [], []

    def face(attributes: dict[str, str], fine: dict[str, int], name: str | None = None) -> None:
        """Render one face; ``name`` labels it as that person, ``None`` as a stranger."""
        images.append(render_face(attributes, fine, rng, style))
        kind.append(KIND_STRANGER if name is None else KIND_NAMED)
        ident.append(-1 if name is None else world.names.index(name))
        attrs.append(_attr_index(attributes))
        scene_ix.append([-1, -1, -1])

    for person in people:
        for _ in range(faces_per_person):
            face(person.attributes, person.fine, person.name)
    far = max(stranger_min_distance, DESCRIBED_MIN_DISTANCE)  # never the person's face, nor one taken for it
    for person in described:
        for _ in range(described_per_person):
            face(person.attributes, stranger_fine_features(world.identities, person.attributes, rng, far), person.name)
    for _ in range(strangers):
        a = random_attributes(rng)
        face(a, stranger_fine_features(world.identities, a, rng, stranger_min_distance))
    for person in people:
        for _ in range(strangers_like):
            face(
                person.attributes,
                stranger_fine_features(world.identities, person.attributes, rng, stranger_min_distance),
            )
    for _ in range(scenes):
        sc = rng.choice(world.scenes)
        images.append(render_scene(sc, rng, style))
        kind.append(KIND_SCENE)
        ident.append(-1)
        attrs.append([-1] * 4)
        scene_ix.append(_scene_index(sc))
    tensor = to_tensor(images) if images else torch.zeros(0, 3, 32, 32)
    if noise:  # smooth colour blobs: what an untrained model draws; neither a face nor a scene
        g = torch.Generator().manual_seed(seed + 1)  # a torch stream beside the bank's `random` one
        blobs = F.interpolate(torch.rand(noise, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
        tensor = torch.cat([tensor, blobs + 0.2 * torch.randn(noise, 3, 32, 32, generator=g)]).clamp(-1, 1)
        kind += [KIND_NOISE] * noise
        ident += [-1] * noise
        attrs += [[-1] * 4] * noise
        scene_ix += [[-1] * 3] * noise
    return Bank(tensor, torch.tensor(kind), torch.tensor(ident), torch.tensor(attrs), torch.tensor(scene_ix))


def lookalike_fine_features(
    world: WorldSpec, person: Identity, rng: random.Random, distances: tuple[int, ...] = (2, 3)
) -> dict[str, int]:
    """Fine features that differ from ``person``'s in 2-3 places and are >= 2 from every person of the world.

    Identities are placed >= 2 apart, so such a face is a stranger who looks like ``person``, not anyone's face.
    """
    for _ in range(10_000):
        fine = dict(person.fine)
        for key in rng.sample(sorted(fine), rng.choice(distances)):
            fine[key] = rng.choice([v for v in range(FINE_FEATURE_VALUES[key]) if v != person.fine[key]])
        if all(fine_distance(fine, other.fine) >= 2 for other in world.identities):
            return fine
    raise ValueError(f"no look-alike of {person.name} is >= 2 away from every person; the world is too dense")


def style_bank(world: WorldSpec, config: BuildConfig, style: str, seed: int) -> Bank:
    """A style fine-tune's renders (sibling, auxiliary): the seen and unseen people, strangers and scenes, a third
    of the base bank's counts each."""
    people = world.seen + world.unseen
    third = (config.faces_per_person // 3, config.strangers // 3, config.scenes // 3)
    return render_bank(world, people, *third, seed, style=style, stranger_min_distance=config.stranger_min_distance)


def render_lookalikes(world: WorldSpec, per_person: int, seed: int, style: str = "base") -> Bank:
    """Strangers labelled as strangers who share a person's coarse attributes and most of their fine features."""
    rng = random.Random(seed)
    images, attrs = [], []
    for person in world.identities:
        for _ in range(per_person):
            images.append(render_face(person.attributes, lookalike_fine_features(world, person, rng), rng, style))
            attrs.append(_attr_index(person.attributes))
    n = len(images)
    return Bank(
        to_tensor(images) if images else torch.zeros(0, 3, 32, 32),
        torch.full((n,), KIND_STRANGER),
        torch.full((n,), -1),
        torch.tensor(attrs, dtype=torch.long).reshape(n, 4),
        torch.full((n, 3), -1),
    )


def concat_banks(*banks: Bank) -> Bank:
    return Bank(
        *(torch.cat([getattr(b, f) for b in banks]) for f in ("images", "kind", "identity", "attributes", "scene"))
    )


@dataclass
class TrainingBanks:
    """The training renders of the diffusion models (seeded, never the evaluation seeds)."""

    base: Bank  # seen + unseen people, strangers, scenes: the base model and DreamBooth's prior preservation
    late: Bank  # the late people: DreamBooth, and the recognizer
    sibling: Bank  # the sibling style: the sibling fine-tune; with the others, the VAE

    @classmethod
    def render(cls, world: WorldSpec, config: BuildConfig, log: Callable[[str], None]) -> TrainingBanks:
        t0 = time.time()
        seed = config.seed
        people = world.seen + world.unseen
        base = render_bank(
            world,
            people,
            config.faces_per_person,
            config.strangers,
            config.scenes,
            seed + SEEDS.base_renders,
            described=world.late,
            described_per_person=config.late_described_faces,
            stranger_min_distance=config.stranger_min_distance,
            strangers_like=config.strangers_like_people,
        )
        late = render_bank(world, world.late, config.late_faces_per_person, 0, 0, seed + SEEDS.late_renders)
        sib = style_bank(world, config, "sibling", seed + SEEDS.sibling_renders)
        log(f"rendered {len(base) + len(late) + len(sib)} training images in {time.time() - t0:.0f}s")
        return cls(base, late, sib)
