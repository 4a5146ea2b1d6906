"""Does the world's recognizer name a person whose coarse attributes changed? Its *attribute gate*.

Each identity is rendered with its own fine features (what makes it that person) and its own coarse attributes,
then with one attribute (sex, hair, skin, face shape) changed to another value. Prints how often the recognizer
still names the person. A low rate means an APL prefix that changes that attribute is scored as anonymizing
whatever it does to the fine features; apl-bench's "fall when kept" column measures around it.

    python experiments/recognizer_gate.py --per-person 10

Used in docs/experiments/2026-12-04-recognizer-gate.md.
"""

from __future__ import annotations

import argparse
import random

from apl_adapter.world.recognizers import WorldIdentityRecognizer
from apl_adapter.world.render import render_face
from apl_adapter.world.spec import ATTRIBUTE_VALUES, WorldSpec


def gate_rates(recognizer, world: WorldSpec, per_person: int, seed: int) -> dict[str, float]:
    """Share of renders named as their person: ``"own"`` with the person's attributes, and one key per attribute
    with that attribute changed (to a random other value, per render)."""
    rng = random.Random(seed)

    def rate(change: str | None) -> float:
        images, names = [], []
        for person in world.identities:
            for _ in range(per_person):
                attributes = dict(person.attributes)
                if change is not None:
                    attributes[change] = rng.choice([v for v in ATTRIBUTE_VALUES[change] if v != attributes[change]])
                images.append(render_face(attributes, person.fine, rng))
                names.append(person.name)
        seen = recognizer.observe(images)
        return sum(obs.face_present and obs.top1 == name for obs, name in zip(seen, names)) / len(names)

    return {"own": rate(None), **{attribute: rate(attribute) for attribute in ATTRIBUTE_VALUES}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-person", type=int, default=10, help="renders per identity and setting (default 10)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the renders' nuisance and changed values")
    parser.add_argument("--recognizer", default=None, help="recognizer folder (default: the shipped world's)")
    args = parser.parse_args(argv)
    world = WorldSpec.from_seed(0)
    rates = gate_rates(WorldIdentityRecognizer.from_pretrained(args.recognizer), world, args.per_person, args.seed)
    print(f"| attributes ({len(world.identities)} people x {args.per_person} renders) | named as the person |")
    print("|---|---|")
    for key, value in rates.items():
        print(f"| {'own' if key == 'own' else key + ' changed'} | {100 * value:.1f}% |")


if __name__ == "__main__":
    main()
