"""``apl-train``: train an APL prefix, or sample its training data from the base model.

Run ``apl-train --help`` and ``apl-train generate-identity-data --help``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from ..console import add_common_options, command_settings_of, run_cli
from ..dataclass_args import add_dataclass_arguments
from ..errors import check_at_least
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .config import TrainConfig

DESCRIPTION = textwrap.dedent(
    """\
    Train an Anonymization Prompt Learning (APL) prefix: m learnable vectors after BOS in the frozen
    text encoder, so that prompts naming a person give an anonymous face and other prompts are unchanged.

    The loss (Shi et al., IJCV 2026):  || eps(z_t, t, [AP]+c1) - stopgrad(eps(z_t, t, c2)) ||^2
    on identity triplets (image of a person, c1 = "a photo of <Name>", c2 = an anonymous attribute
    description) and preservation pairs (image without a person, c1 = c2 = its caption), mixed 50/50.

    data format (--data): a folder with images and metadata.jsonl, one JSON object per line:
      {"file_name": "images/0.png", "kind": "identity", "c1": "a photo of Ann Lee",
       "c2": "a photo of a woman, short brown hair", "identity": "Ann Lee"}
      {"file_name": "images/1.png", "kind": "preservation", "c1": "a red cube on a table",
       "c2": "a red cube on a table"}
    Make one with `apl-world data --out DIR` (the shipped world) or `apl-train generate-identity-data`
    (any base model, as the authors do: N images per name sampled from the base model).

    output (--out): adapter/ (the final PEFT adapter, for apply_apl or apl-bench), checkpoint-N/ (adapter +
    optimizer state, for --resume), loss.csv, train_config.json, trackers/ (--report-to), validation/ (step-N.png,
    with --validation-prompts).

    SD3 / 3.5 and FLUX.1 folders (model_index.json says which): the same data, one prefix per text encoder
    (--encoders, default all of them: SD3 CLIP-L, CLIP-G, T5; FLUX CLIP, T5), trained jointly. The transformer
    predicts the velocity v = noise - z0, so the loss compares velocities at the same z_t: --loss-space eps (the
    default) is the paper's loss under the change of variable, (1 - sigma)^2 ||v([AP]+c1) - v(c2)||^2; v is the
    pipeline's own flow-matching weighting. Noise levels: --timestep-density; FLUX.1-dev: --guidance; T5 window:
    --max-sequence-length. adapter/ then holds text_encoder/, text_encoder_2/ ... (load_apl(pipe, "<out>/adapter")).
    Options of SD 1.x training that are not ported (deep prefix, push and the other extra terms, resume,
    checkpoints, validation images, hub upload) fail naming themselves. docs/sd3_flux.md.

    several GPUs or nodes: accelerate launch --num_processes 2 -m apl_adapter.training.cli --base ... (no code change).
    """
)

EXAMPLES = textwrap.dedent(
    """\
    examples:
      apl-train --base world/base --data apl-data --out runs/apl --steps 600 --batch-size 8
      apl-train --base /models/sd15 --data apl-data --out runs/sd15 --steps 20000 --mixed-precision bf16
      apl-train --base /models/sd15 --data apl-data --out runs/sd15 --steps 20000 --resume latest
      apl-train --base /models/sd15 --data apl-data --out runs/sd15 --steps 20000 --report-to tensorboard \\
          --checkpoint-every 1000 --checkpoints-total-limit 3 \\
          --validation-prompts "a photo of Ann Lee" "a red cube on a table" --validation-every 1000
      apl-train --base /models/sd3-medium --data apl-data --out runs/sd3 --steps 2000 --mixed-precision bf16
      apl-train --base /models/flux-dev --data apl-data --out runs/flux --encoders text_encoder_2 --loss-space v
      apl-train generate-identity-data --base /models/sd15 --identities names.tsv --captions captions.txt --out apl-data
    """
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apl-train", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(parser, TrainConfig)  # every default, type and help text lives in TrainConfig
    add_common_options(parser)
    return parser


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apl-train generate-identity-data",
        description="Sample APL training data from the base model, as the authors do: --per-name images per name "
        "with the name prompt (DDIM, CFG 7) as identity triplets, and --per-caption images per caption as "
        "preservation pairs. Writes the data folder apl-train --data reads (temporary folder, then renamed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", required=True, help="Local diffusers folder of the base model.")
    parser.add_argument(
        "--identities",
        required=True,
        help="Text file: one 'Name<TAB>anonymous description prompt' per line, e.g. "
        "'Ann Lee<TAB>a photo of a woman, short brown hair' (no description = empty c2).",
    )
    parser.add_argument("--out", required=True, help="Data folder to create (must be new or empty, or --overwrite).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out folder.")
    parser.add_argument("--per-name", type=int, default=100, help="Images per name (the authors: 100).")
    parser.add_argument("--templates", default=None, help="Text file of prompt templates with {name}, one a line.")
    parser.add_argument("--captions", default=None, help="Text file of captions without a person, one a line.")
    parser.add_argument("--per-caption", type=int, default=10, help="Images per caption.")
    parser.add_argument("--steps", type=int, default=PAPER_STEPS, help="DDIM steps (the paper: 20).")
    parser.add_argument("--guidance-scale", type=float, default=PAPER_GUIDANCE_SCALE, help="CFG scale (the paper: 7).")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per pipeline call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image (image k uses seed + k).")
    parser.add_argument(
        "--images-from",
        choices=("name", "description"),
        default="name",
        help="Prompt that draws the identity images: the name prompt (the authors: images of the person) or "
        "the name's description (the anonymous face the prefix should give; every name needs one).",
    )
    add_common_options(parser)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate_identity_data, read_identity_file, read_lines

    check_at_least(("--per-name", args.per_name, 1), ("--per-caption", args.per_caption, 0),
                   ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1))  # fmt: skip
    templates = tuple(read_lines(args.templates, "Template")) if args.templates else ("a photo of {name}",)
    out = generate_identity_data(
        args.base,
        read_identity_file(args.identities),
        args.out,
        per_name=args.per_name,
        templates=templates,
        captions=read_lines(args.captions, "Caption") if args.captions else None,
        per_caption=args.per_caption,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        seed=args.seed,
        images_from=args.images_from,
        overwrite=args.overwrite,
    )
    print(f"training data written to {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .loop import train

    result = train(TrainConfig(**command_settings_of(args)))
    print(
        f"adapter saved to {result.adapter_dir} ({result.steps} steps, final loss {result.final_loss:.4g}, "
        f"{result.seconds:.0f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate-identity-data":
        args = build_generate_parser().parse_args(argv[1:])
        return run_cli("apl-train generate-identity-data", lambda: run_generate(args), args)
    args = build_parser().parse_args(argv)
    return run_cli("apl-train", lambda: run_train(args), args)


if __name__ == "__main__":
    sys.exit(main())
