"""What a prefix does to the late names on the DreamBooth model: who the faces become, and what they keep.

The late people were added by a DreamBooth fine-tune of the base *UNet* (text encoder frozen), so the text encoder
holds nothing about them: their attributes live only in how that UNet reads the name's token states. For each
adapter given, and for two prefixes nobody trained (random vectors, deep; the words "a photo", shallow), this renders
every late name in every person template on the DreamBooth model (bench seed 0) and prints how many faces are
still the person, how many keep all four of the person's attributes, and who the others are (another person of the
world, or a stranger the recognizer does not know).

    python experiments/late_names.py apl_adapter/world/assets/apl-prefix

Used in docs/experiments/2026-12-05-where-attributes-go.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from peft import get_peft_model

from apl_adapter import APLConfig
from apl_adapter.bench.protocol import generate_pair, image_seed
from apl_adapter.bench.world import world_bench_inputs
from apl_adapter.world.models import load_world_pipeline, model_path
from apl_adapter.world.spec import WorldSpec


def untrained_prefixes(folder: Path) -> dict[str, str]:
    """Two prefixes nobody trained, saved under ``folder``: random vectors (deep) and the words "a photo"."""
    made = {}
    for label, config in {
        "untrained, random (deep)": APLConfig(prefix_depth="deep", init_seed=0),
        'untrained, "a photo" (shallow)': APLConfig(
            prefix_init="text", prefix_init_text="a photo", tokenizer_name_or_path=str(model_path("base") / "tokenizer")
        ),
    }.items():
        path = folder / f"untrained-{len(made)}"
        get_peft_model(load_world_pipeline("base").text_encoder, config).save_pretrained(path)
        made[label] = str(path)
    return made


def late_faces(adapter: str, num_seeds: int = 1) -> dict[str, int]:
    """Counts over the late names' faces with ``adapter`` on the DreamBooth model: ``faces``, ``named`` (the person),
    ``kept`` (all four attributes), ``other_person`` (named as someone else of the world), ``stranger``; and the
    same ``plain_named`` / ``plain_kept`` without the prefix."""
    spec, models, readers = world_bench_inputs(seeds=list(range(num_seeds)), num_scenes=0, transfer=False)
    world = WorldSpec.from_seed(0)
    cases = [
        (person, template, seed)
        for seed in range(num_seeds)
        for person in world.late
        for template in spec.person_templates
    ]
    prompts = [template.format(person.name) for person, template, _ in cases]
    seeds = [image_seed(seed, prompt) for (*_, seed), prompt in zip(cases, prompts)]  # each prompt its own noise
    plain, prefixed = generate_pair(models.dreambooth, adapter, prompts, seeds, spec, "late names")
    counts = {"faces": len(cases)}
    for label, images in (("plain_", plain), ("", prefixed)):
        seen, attributes = readers.identity.observe(images), readers.attributes.read_attributes(images)
        people = [person for person, *_ in cases]
        counts[label + "named"] = sum(o.face_present and o.top1 == p.name for o, p in zip(seen, people))
        counts[label + "kept"] = sum(a == p.attributes for a, p in zip(attributes, people))
        if not label:
            counts["other_person"] = sum(o.face_present and o.top1 not in (None, p.name) for o, p in zip(seen, people))
            counts["stranger"] = sum(o.face_present and o.top1 is None for o in seen)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="*", help="APL adapter folders (CLIP prefixes of the shipped world)")
    parser.add_argument("--seeds", type=int, default=1, help="bench seeds 0..N-1 (default 1: 40 faces)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        prefixes = {adapter: adapter for adapter in args.adapters} | untrained_prefixes(Path(tmp))
        print(
            "| prefix | faces | named plain -> prefixed | all four attributes plain -> prefixed | prefixed: "
            "another person | prefixed: a stranger |"
        )
        print("|---|---|---|---|---|---|")
        for label, adapter in prefixes.items():
            c = late_faces(adapter, args.seeds)
            print(
                f"| {label} | {c['faces']} | {c['plain_named']} -> {c['named']} | {c['plain_kept']} -> {c['kept']} "
                f"| {c['other_person']} | {c['stranger']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
