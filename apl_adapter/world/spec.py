"""Who lives in the world: identities, their attributes, the splits, names and prompt templates.

Everything here is a pure function of a seed, so a benchmark can be run on a world nobody tuned
for (``WorldSpec.from_seed(7)``). The shipped models were trained on ``WorldSpec.from_seed(0)``.

An identity has *coarse attributes* that an attribute description names (sex, hair colour, skin
tone, face shape) and *fine features* that no description names (eye colour, eye spacing, brows,
mouth, a mark, glasses). An APL-anonymized face should keep the first and lose the second.

Example:

```python
>>> from apl_adapter.world import WorldSpec
>>> world = WorldSpec.from_seed(0)
>>> len(world.identities), len(world.seen), len(world.unseen), len(world.late)
(40, 20, 12, 8)
>>> world.identity_prompt(world.seen[0].name, 0).startswith("a photo of ")
True

```
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

# Coarse attributes: named in attribute descriptions, kept by anonymization.
SEXES = ("male", "female")
HAIR_COLORS = ("black", "brown", "blonde", "red", "grey")
SKIN_TONES = ("light", "tan", "dark")
FACE_SHAPES = ("round", "long")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "sex": SEXES,
    "hair": HAIR_COLORS,
    "skin": SKIN_TONES,
    "shape": FACE_SHAPES,
}

# Fine features: identity-specific, never named in a prompt, removed by anonymization.
FINE_FEATURE_VALUES: dict[str, int] = {
    "eye_color": 4,  # blue, green, brown, violet
    "eye_spacing": 2,  # narrow, wide
    "brows": 3,  # flat, raised outer ends, frowning
    "mouth": 3,  # small, wide smile, open
    "mark": 4,  # none, left cheek, right cheek, forehead
    "glasses": 3,  # none, round, square
}

# Scenes without people: one object on a background, all three named in the caption.
SCENE_SHAPES = ("circle", "square", "triangle", "star")
SCENE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SCENE_BACKGROUNDS = ("white", "black", "sky blue", "grass green")

# Person templates take a subject: a name ("Zorvan Keltimore") or an attribute description
# ("a male person, brown hair, light skin, round face"), as in the paper's c1 / c2 pair.
PERSON_TEMPLATES = (
    "a photo of {}",
    "a close-up portrait of {}",
    "a headshot of {}",
    "an image of {}",
    "{}, portrait photo",
)
SCENE_TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a picture of a {color} {shape}, {background} background",
    "{background} background with a {color} {shape}",
    "a simple drawing of a {color} {shape} over {background}",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "x", "th", "s", "m", "nd")


@dataclass(frozen=True)
class Identity:
    """One person of the world.

    Attributes:
        name: a made-up two-word name; the real CLIP tokenizer splits it into several sub-words.
        attributes: coarse attributes, ``{"sex", "hair", "skin", "shape"}`` -> value.
        fine: fine features, ``{"eye_color", ...}`` -> index (see ``FINE_FEATURE_VALUES``).
        split: ``"seen"`` (trains APL), ``"unseen"`` (base knows it, APL never trains on it) or
            ``"late"`` (unknown to the base model, added by the DreamBooth fine-tune).
    """

    name: str
    attributes: dict[str, str]
    fine: dict[str, int]
    split: str

    def description(self) -> str:
        """The anonymous attribute description of this person (the paper's c2 subject)."""
        return describe(self.attributes)


def describe(attributes: dict[str, str]) -> str:
    """``{"sex": "male", ...}`` -> ``"a male person, brown hair, light skin, round face"``."""
    a = attributes
    return f"a {a['sex']} person, {a['hair']} hair, {a['skin']} skin, {a['shape']} face"


@dataclass(frozen=True)
class Scene:
    """A scene without people: one coloured shape on a background."""

    shape: str
    color: str
    background: str

    def caption(self, template: int = 0) -> str:
        return SCENE_TEMPLATES[template % len(SCENE_TEMPLATES)].format(**asdict(self))


def all_scenes() -> list[Scene]:
    """Every scene the world knows (4 shapes x 6 colours x 4 backgrounds = 96)."""
    return [Scene(s, c, b) for s in SCENE_SHAPES for c in SCENE_COLORS for b in SCENE_BACKGROUNDS]


def _make_name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
        return "".join(parts).capitalize()

    return f"{word(rng.choice((2, 3)))} {word(rng.choice((2, 3)))}"


def random_fine_features(rng: random.Random) -> dict[str, int]:
    return {k: rng.randrange(n) for k, n in FINE_FEATURE_VALUES.items()}


def random_attributes(rng: random.Random) -> dict[str, str]:
    return {k: rng.choice(v) for k, v in ATTRIBUTE_VALUES.items()}


def fine_distance(a: dict[str, int], b: dict[str, int]) -> int:
    """How many fine features two faces differ in (identities of a world are >= 2 apart)."""
    return sum(a[k] != b[k] for k in a)


def stranger_fine_features(
    people: Sequence[Identity],
    attributes: dict[str, str],
    rng: random.Random,
    min_distance: int = 0,
) -> dict[str, int]:
    """Fine features of a stranger with ``attributes``: >= ``min_distance`` from every person in ``people`` who
    shares those attributes. 0 (the shipped world's strangers) takes the first draw, as :func:`random_fine_features`
    does, so a build with 0 draws exactly what it drew before the option existed."""
    if min_distance <= 0:
        return random_fine_features(rng)
    twins = [p.fine for p in people if p.attributes == attributes]
    for _ in range(10_000):
        fine = random_fine_features(rng)
        if all(fine_distance(fine, f) >= min_distance for f in twins):
            return fine
    raise ValueError(
        f"no stranger with {attributes} is >= {min_distance} fine features from every person with those attributes; "
        f"use at most {stranger_distance_limit(people)}"
    )


def stranger_distance_limit(people: Sequence[Identity]) -> int:
    """The largest ``min_distance`` :func:`stranger_fine_features` can meet for every attribute combination of
    ``people``, counted over all fine-feature vectors (2 people with one look already leave none at 6)."""
    keys = list(FINE_FEATURE_VALUES)
    vectors = [dict(zip(keys, v)) for v in itertools.product(*(range(FINE_FEATURE_VALUES[k]) for k in keys))]
    looks: dict[tuple, list[dict[str, int]]] = {}
    for p in people:
        looks.setdefault(tuple(sorted(p.attributes.items())), []).append(p.fine)
    return min(
        (max(min(fine_distance(v, f) for f in twins) for v in vectors) for twins in looks.values()),
        default=len(keys),
    )


@dataclass(frozen=True)
class WorldSpec:
    """The identities, splits and templates of one world; build it with :meth:`from_seed`."""

    seed: int
    identities: tuple[Identity, ...]
    person_templates: tuple[str, ...] = PERSON_TEMPLATES
    scene_templates: tuple[str, ...] = SCENE_TEMPLATES
    scenes: tuple[Scene, ...] = field(default_factory=lambda: tuple(all_scenes()))

    @staticmethod
    def from_seed(seed: int = 0, num_seen: int = 20, num_unseen: int = 12, num_late: int = 8) -> WorldSpec:
        return _world_from_seed(seed, num_seen, num_unseen, num_late)

    # --- splits -------------------------------------------------------------------------------
    def _split(self, split: str) -> list[Identity]:
        return [i for i in self.identities if i.split == split]

    @property
    def seen(self) -> list[Identity]:
        return self._split("seen")

    @property
    def unseen(self) -> list[Identity]:
        return self._split("unseen")

    @property
    def late(self) -> list[Identity]:
        return self._split("late")

    @property
    def names(self) -> list[str]:
        """All names, in recognizer class order."""
        return [i.name for i in self.identities]

    def identity(self, name: str) -> Identity:
        for ident in self.identities:
            if ident.name == name:
                return ident
        raise KeyError(f"{name!r} is not a person of this world; known names: {', '.join(self.names)}")

    # --- prompts ------------------------------------------------------------------------------
    def identity_prompt(self, name: str, template: int = 0) -> str:
        """The name prompt (the paper's c1 without the prefix)."""
        return self.person_templates[template % len(self.person_templates)].format(name)

    def attribute_prompt(self, name_or_attributes: str | dict[str, str], template: int = 0) -> str:
        """The anonymous attribute prompt of a person (the paper's c2), in the same template."""
        attrs = (
            self.identity(name_or_attributes).attributes if isinstance(name_or_attributes, str) else name_or_attributes
        )
        return self.person_templates[template % len(self.person_templates)].format(describe(attrs))

    def attribute_contrasts(self, attributes: dict[str, str], template: int = 0) -> dict[str, list[str]]:
        """The attribute prompt with one attribute changed at a time, to each of its other values (training data's
        ``c2_contrasts``: what ``apl-train --attribute-hold`` measures each attribute's pull from)."""
        return {
            key: [
                self.attribute_prompt({**attributes, key: value}, template)
                for value in values
                if value != attributes[key]
            ]
            for key, values in ATTRIBUTE_VALUES.items()
        }

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "identities": [asdict(i) for i in self.identities],
            "person_templates": list(self.person_templates),
            "scene_templates": list(self.scene_templates),
        }


@lru_cache(maxsize=8)
def _world_from_seed(seed: int, num_seen: int, num_unseen: int, num_late: int) -> WorldSpec:
    rng = random.Random(seed)
    total = num_seen + num_unseen + num_late
    names: list[str] = []
    while len(names) < total:
        name = _make_name(rng)
        if name not in names and name.split()[0] not in {n.split()[0] for n in names}:
            names.append(name)
    # Fine features at least 2 apart (of 6): two people who share coarse attributes still differ
    # visibly in unnamed features, so a recognizer can tell them apart.
    fines: list[dict[str, int]] = []
    for _ in range(100_000):
        if len(fines) == total:
            break
        cand = random_fine_features(rng)
        if all(fine_distance(cand, f) >= 2 for f in fines):
            fines.append(cand)
    else:
        raise ValueError(f"cannot place {total} identities with distinct fine features; ask for fewer")
    splits = ["seen"] * num_seen + ["unseen"] * num_unseen + ["late"] * num_late
    identities = tuple(
        Identity(name=n, attributes=random_attributes(rng), fine=f, split=s) for n, f, s in zip(names, fines, splits)
    )
    return WorldSpec(seed=seed, identities=identities)
