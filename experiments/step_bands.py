"""When during sampling does a prefix act? The prefix applied at some denoising steps only.

A prefix changes the positive context at every step of the sampler. This diagnostic keeps the
plain context at every step except those of a band (e.g. the first five of 20 DDIM steps, large
``t``) and measures what the prefix then does: seen-name top-1 (anonymization) and the scene images
it breaks and fixes (damage), each band against the same seeds without any prefix. It answers
whether a prefix's anonymization and its scene damage happen at the same steps - if they did not, a
loss weighted by timestep could keep one and drop the other.

The switch is diffusers' own ``callback_on_step_end``: the pipeline is the real one, only its
``prompt_embeds`` change between steps (the negative prompt stays plain, as in the paper).

    python experiments/step_bands.py --adapter runs/apl/adapter --seeds 500,501

Example:

```python
>>> from experiments.step_bands import run_step_bands
>>> # the demo's prefix (docs/experiments/2026-12-02-world.md, "Where the change lives");
>>> # the first row is the base model without it
>>> rows = run_step_bands("demo-out/run/adapter", seeds=[500, 501], bands=[(0, 20), (10, 20)])  # doctest: +SKIP
>>> [(row["band"], row["seen_top1"], row["scenes_lost"], row["scenes_gained"]) for row in rows]  # doctest: +SKIP
[('none', 0.95, 0, 0), ('0-20', 0.625, 42, 18), ('10-20', 0.855, 25, 5)]

```
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from apl_adapter.bench.protocol import BenchReaders, BenchSpec, image_seed, paired_change
from apl_adapter.console import seed_list
from apl_adapter.errors import APLAdapterError
from apl_adapter.metrics.base import identity_metrics
from apl_adapter.pipelines import apply_apl, remove_apl
from apl_adapter.progress import batches
from apl_adapter.sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS

#: Bands of a 20-step sampler: large t, middle, small t (the last half), and every step.
DEFAULT_BANDS = ((0, 20), (0, 5), (5, 10), (10, 20))


@torch.no_grad()
def encode_contexts(pipe, adapter, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(plain, prefixed, negative)`` prompt embeddings, each ``(B, 77, D)``; the negative (empty) prompt is plain."""
    device = pipe._execution_device
    plain, negative = pipe.encode_prompt(list(prompts), device, 1, True)
    apply_apl(pipe, adapter)
    try:
        prefixed, prefixed_negative = pipe.encode_prompt(list(prompts), device, 1, True)
    finally:
        remove_apl(pipe)
    if not torch.equal(prefixed_negative, negative):
        raise APLAdapterError("This adapter also prefixes the negative prompt; step bands assume the paper's use.")
    return plain, prefixed, negative


def generate_with_prefix_steps(
    pipe,
    plain: torch.Tensor,
    prefixed: torch.Tensor,
    negative: torch.Tensor,
    seeds: Sequence[int],
    prefix_steps: set[int],
    num_inference_steps: int = PAPER_STEPS,
    guidance_scale: float = PAPER_GUIDANCE_SCALE,
) -> list:
    """Images whose positive context is ``prefixed`` at the sampler steps in ``prefix_steps`` (0-based) and
    ``plain`` at the others; image ``i`` from ``torch.Generator().manual_seed(seeds[i])``.

    ``plain``, ``prefixed`` and ``negative`` are ``(B, 77, D)``; with ``prefix_steps`` empty this is the base
    pipeline, with every step it is the pipeline with the prefix applied.
    """

    def context(step: int) -> torch.Tensor:
        return prefixed if step in prefix_steps else plain

    def switch(pipeline, step: int, timestep, tensors: dict) -> dict:
        # called after step `step`; under CFG the pipeline's prompt_embeds are [negative; positive]
        return {"prompt_embeds": torch.cat([negative, context(step + 1)])}

    return pipe(
        prompt_embeds=context(0),
        negative_prompt_embeds=negative,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
        callback_on_step_end=switch,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images


def _generate(pipe, contexts, seeds, prefix_steps: set[int], spec: BenchSpec, desc: str) -> list:
    plain, prefixed, negative = contexts
    images: list = []
    for part in batches(len(seeds), spec.batch_size, desc, leave=False):
        images += generate_with_prefix_steps(
            pipe, plain[part], prefixed[part], negative[part], seeds[part], prefix_steps,
            spec.num_inference_steps, spec.guidance_scale,
        )  # fmt: skip
    return images


def measure_step_bands(
    pipe, adapter, spec: BenchSpec, readers: BenchReaders, bands: Sequence[tuple[int, int]] = DEFAULT_BANDS
) -> list[dict]:
    """One row per band (the first: no prefix at all) with seen-name top-1 and face presence, scene accuracy,
    and the scene images the band broke and fixed against no prefix (with McNemar p and the 95% interval).

    Bands are ``(first, end)`` step ranges, ``0 <= first < end <= spec.num_inference_steps``.
    """
    for first, end in bands:
        if not 0 <= first < end <= spec.num_inference_steps:
            raise APLAdapterError(
                f"Step band {first}-{end} is outside the sampler's {spec.num_inference_steps} steps; give bands "
                f"as FIRST:END with 0 <= FIRST < END <= {spec.num_inference_steps}."
            )
    persons = spec.person_prompts("seen")
    scenes = [(scene, seed) for scene in spec.scenes for seed in spec.seeds]
    if not persons or not scenes:
        raise APLAdapterError("Step bands need seen persons and scene prompts in the bench spec.")
    person_ctx = encode_contexts(pipe, adapter, [prompt for _, _, prompt, _ in persons])
    scene_ctx = encode_contexts(pipe, adapter, [scene.prompt for scene, _ in scenes])
    person_seeds = [image_seed(seed, prompt) for _, _, prompt, seed in persons]  # each prompt its own noise
    scene_seeds = [image_seed(seed, scene.prompt) for scene, seed in scenes]
    targets = [person.name for person, *_ in persons]
    labels = [scene.label for scene, _ in scenes]

    def measure(name: str, steps: set[int]) -> tuple[dict, list[bool]]:
        faces = _generate(pipe, person_ctx, person_seeds, steps, spec, f"{name}: seen")
        identity = identity_metrics(readers.identity.observe(faces), targets)
        drawn = _generate(pipe, scene_ctx, scene_seeds, steps, spec, f"{name}: scenes")
        correct = [read == label for read, label in zip(readers.scenes.read_scenes(drawn), labels)]
        row = {
            "band": name,
            "seen_top1": identity["top1_accuracy"],
            "seen_face_presence": identity["face_presence_rate"],
            "scene_accuracy": sum(correct) / len(correct),
        }
        return row, correct

    rows = []
    base_row, base_correct = measure("none", set())
    rows.append({**base_row, "scenes_lost": 0, "scenes_gained": 0, "mcnemar_p": 1.0, "change_ci95_points": [0, 0]})
    for first, end in bands:
        row, correct = measure(f"{first}-{end}", set(range(first, end)))
        change = paired_change(base_correct, correct)
        rows.append({**row, "scenes_lost": change["lost"], "scenes_gained": change["gained"],
                     "mcnemar_p": change["mcnemar_p"], "change_ci95_points": change["change_ci95_points"]})  # fmt: skip
    return rows


def to_markdown(rows: Sequence[dict], timesteps: Sequence[int] | None = None) -> str:
    """The rows as a Markdown table (with each band's timesteps when ``timesteps`` is given)."""

    def steps_of(band: str) -> str:
        if band == "none" or timesteps is None:
            return "-"
        first, end = (int(part) for part in band.split("-"))
        return f"{timesteps[first]}-{timesteps[end - 1]}"

    lines = [
        "| prefix at steps | t | seen top-1 | face presence | scene accuracy | scenes lost / gained | p | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['band']} | {steps_of(row['band'])} | {100 * row['seen_top1']:.1f}% | "
            f"{100 * row['seen_face_presence']:.1f}% | {100 * row['scene_accuracy']:.1f}% | "
            f"{row['scenes_lost']} / {row['scenes_gained']} | {row['mcnemar_p']:.2g} | "
            f"{row['change_ci95_points'][0]} to {row['change_ci95_points'][1]} |"
        )
    return "\n".join(lines)


def run_step_bands(
    adapter: str | Path,
    seeds: Sequence[int] = (500, 501),
    bands: Sequence[tuple[int, int]] = DEFAULT_BANDS,
    assets: str | Path | None = None,
    all_scene_templates: bool = True,
) -> list[dict]:
    """:func:`measure_step_bands` on the shipped world's base model: seen names in every person template,
    every scene in every caption template (``all_scene_templates``; else the bench's 96 scene prompts)."""
    from apl_adapter.bench.world import every_scene_case, world_bench_inputs
    from apl_adapter.world.spec import WorldSpec

    spec, models, readers = world_bench_inputs(seeds=list(seeds), assets=assets, transfer=False, late=False)
    if all_scene_templates:
        spec.scenes = every_scene_case(WorldSpec.from_seed(0))
    return measure_step_bands(models.base, adapter, spec, readers, bands)


def parse_bands(text: str) -> list[tuple[int, int]]:
    """``"0:5,5:10"`` -> ``[(0, 5), (5, 10)]``."""
    bands = []
    for band in text.split(","):
        parts = band.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise APLAdapterError(f"Cannot read --bands {text!r}: give FIRST:END step ranges, e.g. 0:5,5:10,10:20.")
        bands.append((int(parts[0]), int(parts[1])))
    return bands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python experiments/step_bands.py",
        description=__doc__.split("\n\n")[0] + " Prints one Markdown row per band (the first: no prefix).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python experiments/step_bands.py --adapter demo-out/run/adapter --seeds 500,501",
    )
    parser.add_argument("--adapter", required=True, help="Trained APL adapter folder (e.g. demo-out/run/adapter).")
    parser.add_argument(
        "--seeds", type=seed_list, default=[500, 501], help="Sampling seeds, a comma list (default 500,501)."
    )
    parser.add_argument(
        "--bands", default=",".join(f"{a}:{b}" for a, b in DEFAULT_BANDS),
        help="Sampler step ranges FIRST:END (0-based, END exclusive) with the prefix on (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--bench-scenes", action="store_true",
        help="Use the bench's 96 scene prompts instead of every scene in every caption template (384 per seed).",
    )  # fmt: skip
    parser.add_argument("--assets", default=None, help="World models folder (default: the shipped ones).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    try:
        bands = parse_bands(args.bands)  # cheap checks before loading any model
        seeds = args.seeds
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise APLAdapterError(
                f"No APL adapter at {args.adapter} (no adapter_config.json); pass the folder apl-train wrote, "
                "<out>/adapter."
            )
        rows = run_step_bands(args.adapter, seeds, bands, args.assets, not args.bench_scenes)
    except (APLAdapterError, FileNotFoundError, ValueError) as err:
        print(f"step bands: error: {err}", file=sys.stderr)
        return 2
    from apl_adapter.world.models import world_scheduler

    scheduler = world_scheduler()
    scheduler.set_timesteps(20)
    print(to_markdown(rows, [int(t) for t in scheduler.timesteps]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
