"""``apl-demo`` (what ``make demo`` runs): APL end to end on the embedded world, with a report.

Stages, each printed as it runs:

1. ``apl-bench`` of the full-strength prefix shipped in the package: the paper's protocol (seen / unseen /
   late identities, transfer to the sibling model, scenes) with and without the prefix;
2. training data from the shipped world's base model (identity images drawn from the person's description,
   scene renders with captions);
3. ``apl-train``: a short 10-vector prefix, only the prefix trained, then ``apl-bench`` of it beside the
   shipped one (the images without a prefix are generated once, for both);
4. ``apl-export``: validated ONNX of the prefixed pipeline (the prefix baked into the text
   encoder), then ONNX Runtime generation compared with PyTorch on the same seeds;
5. ``report.md`` + ``report.json`` in ``--out`` (the bench's own report and grid in ``bench/``).

The recipe (stages 2-3, the options below) is the paper's at world scale: identity triplets for the seen names
only (c1 = "a photo of <Name>", c2 = the same template with the person's attribute description), scene renders
with captions as preservation pairs; the other person templates stay held out for the bench. One change from the
paper's data: the identity images are drawn from c2, the anonymous face the prefix should give (--images-from
name: the paper's). From Python: apl_adapter.demo.run_demo("demo-out") runs stages 1-3 and their bench.

When the world's weights are not installed (a source tree without them), the demo falls back
to a tiny random pipeline and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..console import add_common_options, run_cli, seed_list
from ..errors import APLAdapterError
from .recipe import (
    DEMO_BATCH_SIZE,
    DEMO_IDENTITY_FRACTION,
    DEMO_IMAGES_FROM,
    DEMO_LR,
    DEMO_PER_NAME,
    DEMO_PREFIX_LEN,
    DEMO_STEPS,
)
from .report import write_report
from .run import run_tiny_demo, run_world_demo, world_available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apl-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out", help="report folder (created; earlier demo files are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the export comparison images")
    recipe = parser.add_argument_group("the recipe (defaults: the demo's, in apl_adapter/demo/recipe.py)")
    recipe.add_argument("--steps", type=int, default=DEMO_STEPS, help="apl-train steps on the world (%(default)s)")
    recipe.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE, help="training batch size (%(default)s)")
    recipe.add_argument(
        "--lr", type=float, default=DEMO_LR, help="Adam learning rate (%(default)s: 10x the paper's 1e-3, for 400 "
        "instead of ~20k steps)"
    )  # fmt: skip
    recipe.add_argument("--prefix-len", type=int, default=DEMO_PREFIX_LEN, help="prefix length m (%(default)s)")
    recipe.add_argument(
        "--identity-fraction", type=float, default=DEMO_IDENTITY_FRACTION,
        help="share of identity triplets per batch, the rest scene preservation pairs (%(default)s)",
    )  # fmt: skip
    recipe.add_argument(
        "--per-name", type=int, default=DEMO_PER_NAME, help="training images per seen name (%(default)s)"
    )
    recipe.add_argument(
        "--images-from", choices=("name", "description"), default=DEMO_IMAGES_FROM,
        help="prompt that draws the identity images: the person's description (default) or the name (the paper)",
    )  # fmt: skip
    recipe.add_argument(
        "--bench-seeds", type=seed_list, default=[0], help="apl-bench seeds, a comma list (0: one keeps the demo short)"
    )
    recipe.add_argument("--assets", default=None, help="world models folder (default: the shipped ones)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    return run_cli("apl-demo", lambda: _demo(args), args)


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise APLAdapterError(f"--out {out} is a file; choose a folder")
    if args.steps < 1:
        raise APLAdapterError(f"--steps must be >= 1, got {args.steps}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.assets is not None or world_available():  # an --assets folder without a world fails with its path
        summary = run_world_demo(
            out, args.seed, args.assets, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            prefix_len=args.prefix_len, identity_fraction=args.identity_fraction, per_name=args.per_name,
            images_from=args.images_from, seeds=tuple(args.bench_seeds),
        )  # fmt: skip
    else:
        print("apl-demo: the world's weights are not installed; running the tiny fallback", file=sys.stderr)
        summary = run_tiny_demo(out, args.seed)
    summary["seconds"] = time.time() - started
    report = write_report(out, summary)
    print("\n" + report.read_text())
    print(f"Done in {summary['seconds']:.0f} s. Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
