"""The end-to-end APL demo on the shipped world: write training data, train a prefix, run apl-bench.

The paper's recipe at world scale (``apl_adapter.world.data``): identity images sampled from the
base model with "a photo of <Name>" for the seen names only (c2 = the same template with the
person's attribute description), preservation pairs = scene renders with captions in all of the
world's caption templates; the other person templates stay held out.

    python -m apl_adapter.bench.demo --out demo-out         # or, from Python: run_demo("demo-out")
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from ..errors import APLAdapterError

# World-scale training settings (README, "Measuring it": the sweep that chose them). 400 steps at
# lr 1e-2 (10x the paper's rate for ~50x fewer steps) fit the demo's 10-minute budget; batch 16 and
# m = 20 anonymize more than the paper's batch 1 and m = 10 in this small world, and 40% identity
# triplets (the paper: 50%) lose fewer scene prompts (within 2 points on bench seeds 0 and 7-8, not on all).
DEMO_STEPS = 400
DEMO_LR = 1e-2
DEMO_PREFIX_LEN = 20
DEMO_BATCH_SIZE = 16
DEMO_IDENTITY_FRACTION = 0.4
DEMO_PER_NAME = 16  # base-model images per seen name
DEMO_NUM_SCENES = 320  # scene renders (preservation pairs)


def write_demo_data(
    folder: str | Path, per_name: int = DEMO_PER_NAME, num_scenes: int = DEMO_NUM_SCENES, assets=None
) -> int:
    """Write the demo's training data (also the acceptance test's) as an ``apl-train`` folder; returns its rows.

    Identity images are sampled from the base model with "a photo of <Name>" only (template 0: the
    other person templates stay held out for the bench); scenes are rendered with captions in every
    caption template (the prefix must leave every person-free prompt alone).
    """
    from ..world.data import write_apl_dataset

    return write_apl_dataset(folder, images_per_person=per_name, num_scenes=num_scenes, templates=[0], assets=assets)


def demo_train_config(
    data: str | Path,
    out: str | Path,
    assets: str | Path | None = None,
    steps: int = DEMO_STEPS,
    batch_size: int = DEMO_BATCH_SIZE,
    lr: float = DEMO_LR,
    prefix_len: int = DEMO_PREFIX_LEN,
    identity_fraction: float = DEMO_IDENTITY_FRACTION,
):
    """The demo's :class:`~apl_adapter.training.TrainConfig` on the world base model (also the acceptance test's)."""
    from ..training import TrainConfig
    from ..world.models import model_path

    return TrainConfig(
        base=str(model_path("base", assets)), data=str(data), out=str(out), steps=steps, batch_size=batch_size,
        lr=lr, prefix_len=prefix_len, identity_fraction=identity_fraction, log_every=10,
    )  # fmt: skip


def run_demo(
    out_dir: str | Path = "demo-out",
    steps: int = DEMO_STEPS,
    batch_size: int = DEMO_BATCH_SIZE,
    per_name: int = DEMO_PER_NAME,
    num_scenes: int = DEMO_NUM_SCENES,
    seeds: tuple[int, ...] = (0,),
    lr: float = DEMO_LR,
    assets: str | Path | None = None,
    prefix_len: int = DEMO_PREFIX_LEN,
    identity_fraction: float = DEMO_IDENTITY_FRACTION,
) -> dict:
    """Data -> training -> bench; returns the bench report and prints its Markdown.

    Writes ``<out_dir>/data`` (reused if present), ``<out_dir>/run`` (the training run, adapter in
    ``run/adapter``) and ``<out_dir>/bench`` (report.md, report.json, grid.png).
    """
    from ..training import train
    from .report import to_markdown
    from .runner import run_bench
    from .world import world_bench_inputs

    out = Path(out_dir)
    started = time.perf_counter()
    data = out / "data"
    if not (data / "metadata.jsonl").is_file():
        print(f"[1/3] sampling training data from the world base model into {data}")
        write_demo_data(data, per_name, num_scenes, assets)
    data_seconds = time.perf_counter() - started
    config = demo_train_config(
        data, out / "run", assets, steps=steps, batch_size=batch_size, lr=lr, prefix_len=prefix_len,
        identity_fraction=identity_fraction,
    )  # fmt: skip
    keys = ("steps", "batch_size", "lr", "lr_schedule", "prefix_len", "identity_fraction")
    recipe = {key: getattr(config, key) for key in keys}
    print(f"[2/3] training the APL prefix ({', '.join(f'{key} {value}' for key, value in recipe.items())})")
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always trains afresh
    result = train(config)
    print("[3/3] apl-bench")
    spec, models, readers = world_bench_inputs(seeds=list(seeds), train_data=data, assets=assets)
    # the report records the settings the run used, read off its config
    extra = {"training": {**recipe, "seconds": result.seconds, "final_loss": result.final_loss,
                          "data_seconds": data_seconds}}  # fmt: skip
    report = run_bench(spec, models, readers, result.adapter_dir, out / "bench", extra=extra)
    print(to_markdown(report))
    print(
        f"training {result.seconds:.0f} s, bench {report['seconds']:.0f} s, total {time.perf_counter() - started:.0f} s"
    )
    print(f"report: {out / 'bench' / 'report.md'}  grid: {out / 'bench' / 'grid.png'}  adapter: {result.adapter_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="Output folder.")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="Training steps.")
    parser.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE, help="Training batch size.")
    parser.add_argument(
        "--prefix-len", type=int, default=DEMO_PREFIX_LEN, help="Prefix length m (see DEMO_PREFIX_LEN)."
    )
    parser.add_argument(
        "--identity-fraction", type=float, default=DEMO_IDENTITY_FRACTION,
        help="Share of identity triplets per batch (the rest: scene preservation pairs).",
    )  # fmt: skip
    parser.add_argument("--per-name", type=int, default=DEMO_PER_NAME, help="Training images per seen name.")
    parser.add_argument("--seeds", default="0", help="Bench seeds (one seed keeps the demo short).")
    parser.add_argument("--lr", type=float, default=DEMO_LR, help="Adam learning rate (10x the paper's 1e-3, for "
                        "400 instead of ~20k steps).")  # fmt: skip
    parser.add_argument("--assets", default=None, help="World models folder (default: the shipped ones).")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (1 on a busy CPU).")
    args = parser.parse_args(argv)
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        run_demo(
            args.out, steps=args.steps, batch_size=args.batch_size, per_name=args.per_name, seeds=seeds, lr=args.lr,
            assets=args.assets, prefix_len=args.prefix_len, identity_fraction=args.identity_fraction,
        )  # fmt: skip
    except (APLAdapterError, FileNotFoundError, ValueError) as err:
        print(f"apl demo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
