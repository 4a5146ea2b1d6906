"""Speed of the shipped world against its budget: loading <= 2 s, sampling 64 images at 20 steps <= 30 s.

    python benchmarks/bench_world.py [--repeats 3] [--threads 2] [--model base]

Prints the median of repeats for each measure and its ratio to the budget (< 1 meets it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

BUDGET_LOAD_S = 2.0
BUDGET_SAMPLE64_S = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measure (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model", default="base", choices=("base", "sibling", "dreambooth"))
    parser.add_argument("--assets", default=None, help="folder an `apl-world build --out` wrote (default: shipped)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from apl_adapter.world import WorldSpec, load_world_pipeline
    from apl_adapter.world.evaluate import person_prompts, sample_images

    load_world_pipeline(
        args.model, args.assets
    )  # warm the file cache and imports; the first load is not the steady state
    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe = load_world_pipeline(args.model, args.assets)
        loads.append(time.perf_counter() - start)
    world = WorldSpec.from_seed(0)
    prompts, _ = person_prompts(world, world.seen[:16], per_person=4)
    samples = []
    for r in range(args.repeats):
        start = time.perf_counter()
        images = sample_images(pipe, prompts, seed=r, steps=20, guidance_scale=7.0, batch_size=64)
        samples.append(time.perf_counter() - start)
    assert len(images) == 64
    load, sample = statistics.median(loads), statistics.median(samples)
    print(f"threads={torch.get_num_threads()} model={args.model} repeats={args.repeats}")
    print(f"load                      median {load:6.2f} s  budget {BUDGET_LOAD_S:5.1f} s  ", end="")
    print(f"ratio {load / BUDGET_LOAD_S:.2f}")
    print(
        f"sample 64 @ 20 steps CFG7 median {sample:6.2f} s  budget {BUDGET_SAMPLE64_S:5.1f} s  "
        f"ratio {sample / BUDGET_SAMPLE64_S:.2f}"
    )


if __name__ == "__main__":
    main()
