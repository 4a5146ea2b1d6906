"""Sample the world with an APL *target* itself, no prefix: what would a perfect prefix draw?

For each person of a split, DDIM 20 / CFG 7 with the conditional prediction replaced by the push target

    eps_target = eps(c2) - eta (eps(source) - eps(c2))

where ``c2`` is the person's description and ``source`` the plain name prompt (``name``, what ``--identity-push``
moves away from) or the name followed by its description (``named_description``, ``--push-from
name_and_description``); ``plain`` samples the name prompt as it is. Prints, per setting, top-1 of the name, face
presence and the share of faces keeping all four attributes (and each one).

    python experiments/probe_push_target.py --seeds 0,1,2,3 plain:0 name:0 name:0.3 named_description:0.3

Used in docs/experiments/2026-12-03-attributes-mechanism.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from apl_adapter.bench.world import world_readers
from apl_adapter.console import seed_list
from apl_adapter.training.loop import tokenize
from apl_adapter.world.models import load_world_pipeline
from apl_adapter.world.spec import WorldSpec, describe

ATTRIBUTES = ("sex", "hair", "skin", "shape")


def encode(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.text_encoder(tokenize(pipe.tokenizer, prompts))[0]


@torch.no_grad()
def sample_target(pipe, person, seeds: list[int], source: str, eta: float, steps: int = 20, cfg: float = 7.0):
    name, description = f"a photo of {person.name}", f"a photo of {describe(person.attributes)}"
    pushed_from = {"plain": name, "name": name, "named_description": f"{name}, {describe(person.attributes)}"}
    states = encode(pipe, ["", description, pushed_from[source]]).repeat_interleave(len(seeds), 0)
    unet, scheduler = pipe.unet, pipe.scheduler
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        predictions = unet(torch.cat([latents] * 3), t, encoder_hidden_states=states).sample
        unconditional, described, pushed = predictions.chunk(3)
        conditional = pushed if source == "plain" else described - eta * (pushed - described)
        latents = scheduler.step(unconditional + cfg * (conditional - unconditional), t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="SOURCE:ETA, SOURCE one of plain, name, named_description")
    parser.add_argument("--model", default="base", choices=("base", "sibling", "dreambooth"))
    parser.add_argument("--split", default="seen", choices=("seen", "unseen", "late"))
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    pipe, readers = load_world_pipeline(args.model), world_readers()
    persons = [p for p in WorldSpec.from_seed(0).identities if p.split == args.split]
    for setting in args.settings:
        source, eta = setting.split(":")
        images = [im for p in persons for im in sample_target(pipe, p, args.seeds, source, float(eta))]
        people = [p for p in persons for _ in args.seeds]
        seen = readers.identity.observe(images)
        read = readers.attributes.read_attributes(images)
        faces = [(o, a, p) for o, a, p in zip(seen, read, people) if o.face_present]
        row = {
            "setting": setting,
            "images": len(images),
            "top1": sum(o.top1 == p.name for o, _, p in faces) / len(images),
            "faces": len(faces) / len(images),
            "attributes": sum(all(a[k] == p.attributes[k] for k in ATTRIBUTES) for _, a, p in faces) / len(images),
            **{k: sum(a[k] == p.attributes[k] for _, a, p in faces) / len(images) for k in ATTRIBUTES},
        }
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
