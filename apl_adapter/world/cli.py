"""``apl-world``: build, inspect and sample the synthetic-identity world.

Examples:

    apl-world info                                   # people, splits, templates, shipped metrics
    apl-world sample --prompt "a photo of Ralthythmyx Thilfend" --num 8 --out grid.png
    apl-world data --out /tmp/apl-data               # APL training data (identity triplets + scenes)
    apl-world build --out /tmp/world                 # retrain everything (see docs/world.md for the time)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from ..console import add_common_options, add_version_option, run_cli
from ..errors import APLAdapterError, check_at_least
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .spec import WorldSpec, stranger_distance_limit


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import ASSETS

    world = WorldSpec.from_seed(args.world_seed)
    for split in ("seen", "unseen", "late"):
        people = getattr(world, split)
        print(f"{split} ({len(people)}):")
        for p in people:
            print(f"  {p.name:32s} {p.description()}")
    print("person templates:", *world.person_templates, sep="\n  ")
    print("scene templates:", *world.scene_templates, sep="\n  ")
    card = Path(args.assets or ASSETS) / "world_card.json"
    if card.is_file():
        print(f"measured ({card}):")
        print(json.dumps(json.loads(card.read_text()).get("metrics", {}), indent=1))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .evaluate import sample_images
    from .models import load_world_pipeline

    check_at_least(("--num", args.num, 1))
    t0 = time.time()
    pipe = load_world_pipeline(args.model, args.assets)
    images = sample_images(
        pipe, [args.prompt] * args.num, args.seed, args.steps, args.guidance_scale, progress="sample"
    )
    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    blanks = [Image.new("RGB", images[0].size)] * (rows * cols - len(images))  # make_image_grid fills every cell
    grid = make_image_grid(images + blanks, rows, cols)
    grid = grid.resize((grid.width * args.zoom, grid.height * args.zoom), Image.Resampling.NEAREST)
    out = Path(args.out)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    grid.save(tmp)
    tmp.rename(out)
    print(f"wrote {out} ({len(images)} images, {time.time() - t0:.1f}s)")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import write_apl_dataset

    def indices(text: str | None) -> list[int] | None:
        return [int(t) for t in text.split(",")] if text else None

    n = write_apl_dataset(
        args.out, args.images_per_person, args.scenes, args.split, args.seed, args.world_seed,
        indices(args.templates), args.assets, scene_templates=indices(args.scene_templates),
        images_from=args.images_from, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {n} rows to {args.out}/metadata.jsonl")
    return 0


#: ``BuildConfig`` integers ``apl-world build`` takes as options, each with the least value a build can use (checked,
#: with any preset's value, before anything is written): zero steps or faces would train nothing, minutes in.
BUILD_INT_OPTIONS: dict[str, int] = {
    "vae_steps": 1,
    "recognizer_steps": 1,
    "sibling_steps": 1,
    "dreambooth_steps": 1,
    "batch_size": 1,
    "faces_per_person": 1,
    "late_described_faces": 0,
    "stranger_min_distance": 0,
    "strangers_like_people": 0,
    "recognizer_faces_per_person": 1,
    "card_scenes": 1,
}


def _cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .build import LONG_LEG, PRESETS, SHIPPED_BASE_PHASES, STAGES, BuildConfig, build_world

    stages = tuple(s.strip() for s in args.stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise APLAdapterError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}.")
    given = {f.name: getattr(args, f.name) for f in fields(BuildConfig) if getattr(args, f.name, None) is not None}
    overrides = {**PRESETS[args.preset], **given}
    check_at_least(
        *(("--" + k.replace("_", "-"), overrides[k], least) for k, least in BUILD_INT_OPTIONS.items() if k in overrides)
    )
    min_distance = overrides.get("stranger_min_distance", 0)
    if min_distance:
        world = WorldSpec.from_seed(args.seed or 0)
        limit = stranger_distance_limit(world.identities)
        if min_distance > limit:
            raise APLAdapterError(
                f"--stranger-min-distance {min_distance} leaves no stranger for some look of world "
                f"seed {world.seed} (people who share their attributes cover the fine features); use 0-{limit}."
            )
    false_reject = overrides.get("recognizer_false_reject", 0.0)
    if not (math.isfinite(false_reject) and (false_reject == 0 or 0 < false_reject < 0.5)):
        raise APLAdapterError(
            "--recognizer-false-reject is a rate in (0, 0.5), or 0 to keep the fixed stranger margin; "
            f"got {false_reject}."
        )
    prior = overrides.get("dreambooth_description_prior", 0.0)
    if not (math.isfinite(prior) and 0 <= prior < 0.5):
        raise APLAdapterError(
            "--dreambooth-description-prior is a share of DreamBooth's batch taken from its replay half, in [0, 0.5); "
            f"got {prior}."
        )
    if prior and not overrides.get("late_described_faces", BuildConfig.late_described_faces):
        raise APLAdapterError(
            "--dreambooth-description-prior replays the strangers the base model drew under late names, and this "
            "build draws none (late_described_faces = 0, as --preset v1): give --late-described-faces N or prior 0."
        )
    if args.base_steps is not None:
        check_at_least(("--base-steps", args.base_steps, 1))
        overrides["base_phases"] = (replace(LONG_LEG, steps=args.base_steps, lr=args.base_lr or LONG_LEG.lr),)
    if args.name_contrast is not None:
        if not (math.isfinite(args.name_contrast) and args.name_contrast >= 0):
            raise APLAdapterError(f"--name-contrast must be >= 0 (0 = off); got {args.name_contrast}.")
        legs = overrides.get("base_phases", SHIPPED_BASE_PHASES)
        overrides["base_phases"] = tuple(replace(leg, name_contrast=args.name_contrast) for leg in legs)
    config = BuildConfig(**{**overrides, "stages": stages, "eval_models": tuple(args.eval_models.split(","))})
    t0 = time.time()
    card = build_world(config, Path(args.out), Path(args.work))
    print(json.dumps(card.get("metrics", {}), indent=1))
    print(f"build done in {time.time() - t0:.0f}s; models in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .build import DEFAULT_STAGES, PRESETS, STAGES, BuildConfig
    from .models import ASSETS, MODEL_KINDS

    parser = argparse.ArgumentParser(
        prog="apl-world", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world-seed", type=int, default=0, help="which world (names, people, splits); the shipped models use 0"
    )
    parser.add_argument(
        "--assets", default=None, help=f"folder holding base/, sibling/, dreambooth/, recognizer/ (default: {ASSETS})"
    )
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list people, splits, templates and the shipped world's measured bars")
    add_common_options(info, threads=False, version=False)

    s = sub.add_parser("sample", help="sample a prompt from a world model into a PNG grid")
    s.add_argument(
        "--prompt", required=True, help='e.g. "a photo of Ralthythmyx Thilfend" (see `apl-world info` for names)'
    )
    s.add_argument("--model", choices=MODEL_KINDS, default="base", help="which world model")
    s.add_argument("--num", type=int, default=8, help="images to sample")
    s.add_argument("--steps", type=int, default=PAPER_STEPS, help="DDIM steps (the APL authors use 20)")
    s.add_argument("--guidance-scale", type=float, default=PAPER_GUIDANCE_SCALE, help="CFG scale (the authors: 7)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--zoom", type=int, default=4, help="nearest-neighbour upscaling of the 32x32 images in the grid")
    s.add_argument("--out", default="world_samples.png", help="output PNG")
    add_common_options(s, version=False)

    d = sub.add_parser("data", help="write APL training data (metadata.jsonl + images/) from the base model")
    d.add_argument("--out", required=True, help="data folder to create (must be new or empty, or --overwrite)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    d.add_argument(
        "--split", choices=("seen", "unseen", "late"), default="seen", help="whose identity images to sample"
    )
    d.add_argument(
        "--images-per-person", type=int, default=100, help="identity images per person (the authors use 100)"
    )
    d.add_argument("--scenes", type=int, default=1000, help="preservation pairs (scene renders + captions)")
    d.add_argument(
        "--templates",
        default=None,
        help="comma-separated person template indices for the identity triplets, e.g. 0,1,2 (default: all; "
        "the rest stay held out for apl-bench)",
    )
    d.add_argument(
        "--scene-templates", default=None, help="comma-separated caption template indices of the scenes (default: all)"
    )
    d.add_argument(
        "--images-from",
        choices=("name", "description"),
        default="name",
        help="prompt that draws the identity images: the name prompt (the authors: images of the person) or the "
        "person's attribute description (the anonymous face the prefix should give)",
    )
    d.add_argument("--seed", type=int, default=0)
    add_common_options(d, version=False)

    b = sub.add_parser("build", help="train the world from scratch (VAE, recognizers, base, sibling, DreamBooth)")
    b.add_argument("--out", default=str(ASSETS), help="where the models go (default: the package's assets)")
    b.add_argument("--work", default="/tmp/apl-world-work", help="cache of intermediate stages")
    b.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all but auxiliary, a model only for training "
        "through)",
    )
    b.add_argument(
        "--eval-models", default="base,sibling,dreambooth", help="models the evaluate stage samples (comma-separated)"
    )
    b.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="shipped",
        help="named build to start from; the options below override its fields. shipped (also called no-floor): "
        "the package's assets, a world without a look-alike floor (a VAE trained 3,000 steps, a contrast leg after "
        "the long base leg, far strangers, late people known by description, a recognizer with more renders and a "
        "threshold calibrated on renders; about 56 min on 2 cores; floor under the bar on two builds: see "
        "docs/world.md); v1: the world shipped before 2026-12-06, with a look-alike floor",
    )
    b.add_argument("--seed", type=int, default=None, help="world and training seed (default 0)")
    b.add_argument(
        "--base-steps",
        type=int,
        default=None,
        help="train the base model in one leg of this many steps (the long leg's data mix and offset noise) "
        "instead of the shipped legs (see BuildConfig.base_phases)",
    )
    b.add_argument(
        "--base-lr", type=float, default=None, help="learning rate of that one leg (default: the long leg's)"
    )
    for name in BUILD_INT_OPTIONS:
        b.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=int,
            default=None,
            help=f"override BuildConfig.{name} (shipped: {getattr(BuildConfig, name)}; v1: "
            f"{PRESETS['v1'].get(name, 'the same')})",
        )
    b.add_argument(
        "--recognizer-false-reject",
        type=float,
        default=None,
        help="set the recognizer's open-set threshold so it names all but this share of fresh renders of the world's "
        "people (a face verifier's operating point; 0 = keep the fixed stranger margin, as v1; shipped: "
        f"{BuildConfig.recognizer_false_reject})",
    )
    b.add_argument(
        "--name-contrast",
        type=float,
        default=None,
        help="weight of the text-side loss that keeps each person's description apart from their name in every "
        "base leg (BasePhase.name_contrast; 0 = none; the shipped world: 1 on its second leg only); it lowers the "
        "look-alike floor on an encoder that already knows names, but from the first step of a fresh base, weight 1 "
        "broke it "
        "(docs/experiments/2026-12-05-name-contrast.md)",
    )
    b.add_argument(
        "--dreambooth-description-prior",
        type=float,
        default=None,
        help="share of DreamBooth's batch (from its replay half) that replays the strangers the base model drew under "
        "a late name under that person's description - DreamBooth's class prior, so the bare description does not "
        f"draw the late person (shipped: {BuildConfig.dreambooth_description_prior}; 0 = none)",
    )
    add_common_options(b, version=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"info": _cmd_info, "sample": _cmd_sample, "data": _cmd_data, "build": _cmd_build}
    try:
        return run_cli(f"apl-world {args.command}", lambda: handlers[args.command](args), args)
    except (KeyError, ValueError) as err:  # the world's own checks (unknown seed, bad sizes) raise these
        print(f"apl-world {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
