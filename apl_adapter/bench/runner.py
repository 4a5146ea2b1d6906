"""Run the protocol and write the report folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import APLAdapterError
from ..tuners.apl.serialization import check_adapter_folder
from .protocol import BenchModels, BenchReaders, BenchSpec, run_protocol
from .report import goals, strip_images, write_report


def run_bench(
    spec: BenchSpec,
    models: BenchModels,
    readers: BenchReaders,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    extra: dict | None = None,
) -> dict:
    """Measure ``adapter`` with the paper's protocol and write ``out/report.{json,md}`` and ``out/grid.png``.

    Returns the report (the dict written to ``report.json``).

    Example:

    ```python
    >>> from apl_adapter.bench.world import world_bench_inputs
    >>> from apl_adapter.bench.runner import run_bench
    >>> spec, models, readers = world_bench_inputs(seeds=[0, 1])  # doctest: +SKIP
    >>> report = run_bench(spec, models, readers, "runs/apl/adapter", "bench-out")  # doctest: +SKIP
    >>> [row["met"] for row in report["goals"]]   # one entry per goal of the bench's table  # doctest: +SKIP
    ```
    """
    check_adapter_folder(adapter)  # a clear error before minutes of generation
    if Path(out).exists() and not Path(out).is_dir():
        raise APLAdapterError(f"--out {out} is a file; choose a folder for the report.")
    started = time.perf_counter()
    sections = run_protocol(spec, models, readers, adapter)
    clean = strip_images(sections)
    report = {
        "adapter": str(adapter),
        "recognizers": getattr(readers.identity, "name", type(readers.identity).__name__),
        "settings": {
            "seeds": spec.seeds,
            # how an image's noise follows from its seed: "per-prompt" = image_seed(seed, prompt); reports without
            # the field are from the bench before 2026-12-05, where every image of a seed shared the seed's noise
            "noise": "per-prompt",
            "num_inference_steps": spec.num_inference_steps,
            "guidance_scale": spec.guidance_scale,
            "person_templates": spec.person_templates,
            "train_templates": spec.train_templates,
            "persons": {
                split: [p.name for p in spec.persons if p.split == split] for split in ("seen", "unseen", "late")
            },
            "scene_prompts": [scene.prompt for scene in spec.scenes],
        },
        "goals": goals(clean),
        "sections": clean,
        "num_images": 2 * sum(section["num_images"] for section in clean.values()),
        "seconds": time.perf_counter() - started,
        **(extra or {}),
    }
    if spec.base_cache is not None:
        report["base_cache"] = {"folder": str(spec.base_cache.folder), "hits": spec.base_cache.hits,
                                "misses": spec.base_cache.misses}  # fmt: skip
    write_report(report, sections, Path(out))
    return report
