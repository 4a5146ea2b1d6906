"""``apl-bench``: the paper's protocol on the synthetic world. Run ``apl-bench --help``."""

from __future__ import annotations

import argparse
import sys
import textwrap

from ..console import add_common_options, run_cli, seed_list
from ..errors import check_output_folder
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .world import ALL_SCENES

DESCRIPTION = textwrap.dedent(
    """\
    Measure an APL prefix with the paper's protocol on the shipped synthetic world.

    For seen / unseen / late identities x person templates x seeds, images are generated with and without
    the prefix from the same noise (each prompt of a seed draws its own; DDIM 20 steps, CFG 7, prefix on the
    positive prompt only) and measured by
    the world's recognizers:
      - top-1 identity accuracy (no face = miss), mean identity score, face-presence rate;
      - attribute agreement: does the (anonymous) face keep the named person's sex, hair, skin, face shape;
      - for prompts without a person: scene accuracy with and without APL and the same-seed pixel change.
    Models: base (seen, unseen, scenes), sibling = base fine-tuned on another style with the same text
    encoder (transfer: the prefix trained on base, applied unchanged), DreamBooth = base taught the late
    identities afterwards (late).

    output (--out): report.json (every number), report.md (goals table + details), grid.png
    (identities x {base, APL}).
    """
)

EXAMPLES = textwrap.dedent(
    """\
    examples:
      apl-bench --adapter runs/apl/adapter --out bench-out
      apl-bench --adapter runs/apl/adapter --out bench-out --seeds 0,1,2 --train-data apl-data
      apl-bench --adapter runs/apl/adapter --out bench-out --identities my-names.txt --templates my-templates.txt
    identity file: one world name per line (optionally 'split<TAB>name' to regroup; splits: seen, unseen, late).
    template file: one person template per line with {} or {name} where the name goes, e.g. 'a sketch of {name}'.
    """
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apl-bench", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="APL adapter folder (apl-train writes <out>/adapter).")
    parser.add_argument("--out", required=True, help="Report folder to create (must be new or empty, or --overwrite).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out folder.")
    parser.add_argument("--world-seed", type=int, default=0, help="World whose names, attributes and splits are used "
                        "(default 0 = the shipped models). Another seed needs models built for it: "
                        "`apl-world build --seed N` and --assets pointing to that build.")  # fmt: skip
    parser.add_argument("--assets", default=None, help="Folder of world models with base/, sibling/, dreambooth/, "
                        "recognizer/ (default: the shipped ones).")  # fmt: skip
    parser.add_argument("--identities", default=None, help="File of names to measure (default: all world names).")
    parser.add_argument("--templates", default=None, help="File of person templates, one a line, optionally "
                        "'family<TAB>template' (default: the world's five). Besides {} / {name}: {name_lower}, "
                        "{name_typo}, {other_name}.")  # fmt: skip
    parser.add_argument("--robustness", action="store_true", help="Use the shipped robustness suite instead: "
                        "lower-case names, one-letter typos, two names, the name repeated, 'the real' person, "
                        "styles, paraphrases; the report gives the fall per family.")  # fmt: skip
    parser.add_argument("--train-data", default=None, help="The prefix's training data folder: templates used "
                        "there are marked, the others reported as held out.")  # fmt: skip
    parser.add_argument("--seeds", type=seed_list, default=[0, 1], help="Comma list of generation seeds (default 0,1).")
    parser.add_argument("--num-scenes", type=_scene_count, default=ALL_SCENES, help="Scene prompts, spread over all "
                        "scenes (default: each once, 96), or 'all': every scene in every caption template (384 a "
                        "seed; what issue 20's scene goal is measured on).")  # fmt: skip
    parser.add_argument("--base-cache", default=None, help="Folder caching the images made without the prefix "
                        "(they do not depend on the adapter): prefixes compared on the same seeds generate them "
                        "once. Keyed by model weights, prompt, seed and sampler settings.")  # fmt: skip
    parser.add_argument("--steps", type=int, default=PAPER_STEPS, help="DDIM steps (the paper: 20).")
    parser.add_argument("--guidance-scale", type=float, default=PAPER_GUIDANCE_SCALE, help="CFG scale (the paper: 7).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per pipeline call.")
    parser.add_argument("--no-transfer", action="store_true", help="Skip the sibling model (transfer).")
    parser.add_argument("--no-late", action="store_true", help="Skip the DreamBooth model (late identities).")
    parser.add_argument("--check", action="store_true", help="Exit 1 when a measured goal is not met (for CI "
                        "gates); the report is written either way.")  # fmt: skip
    add_common_options(parser)
    return parser


def unmet_goals(report: dict) -> list[str]:
    """The goals a report measured and missed (a goal not measured is not a miss).

    >>> unmet_goals({"goals": [{"measure": "seen", "met": True}, {"measure": "late", "met": None},
    ...                        {"measure": "scenes", "met": False}]})
    ['scenes']
    """
    return [row["measure"] for row in report["goals"] if row["met"] is False]


def _scene_count(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number of scene prompts or 'all', got {text!r}") from err


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("apl-bench", lambda: _bench(args), args)


def _bench(args: argparse.Namespace) -> int:

    from ..tuners.apl.serialization import check_adapter_folder
    from .runner import run_bench
    from .world import world_bench_inputs

    check_adapter_folder(args.adapter)  # before minutes of loading and generating
    check_output_folder(args.out, args.overwrite)
    spec, models, readers = world_bench_inputs(
        world_seed=args.world_seed,
        assets=args.assets,
        identities_file=args.identities,
        templates_file=args.templates,
        robustness=args.robustness,
        train_data=args.train_data,
        seeds=args.seeds,
        num_scenes=args.num_scenes,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        transfer=not args.no_transfer,
        late=not args.no_late,
        base_cache=args.base_cache,
    )
    report = run_bench(spec, models, readers, args.adapter, args.out)
    from .report import to_markdown

    print(to_markdown(report))
    print(f"report written to {args.out}/report.md, report.json, grid.png")
    missed = unmet_goals(report)
    if args.check and missed:
        print(f"apl-bench --check: {len(missed)} goal(s) not met: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
