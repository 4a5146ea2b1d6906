"""The demo's runs: on the shipped world (:func:`run_demo`, then apl-export in :func:`run_world_demo`), or on a tiny
random pipeline when the world's weights are not installed (:func:`run_tiny_demo`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .recipe import (
    DEMO_BATCH_SIZE,
    DEMO_IDENTITY_FRACTION,
    DEMO_IMAGES_FROM,
    DEMO_LR,
    DEMO_NUM_SCENES,
    DEMO_PER_NAME,
    DEMO_PREFIX_LEN,
    DEMO_STEPS,
    SHIPPED_LABEL,
    SHORT_LABEL,
    demo_bench_inputs,
    demo_train_config,
    write_demo_data,
)

EXPORT_PROMPTS = ["a photo of {name}", "a red cube on a table"]
TINY_PROMPTS = ["a photo of Ann Lee", "a close-up portrait of Zorblax Quentaro", "a red cube on a table"]


def bench_shipped_prefix(
    out: str | Path, seeds: tuple[int, ...] = (0,), assets: str | Path | None = None
) -> dict | None:
    """The full-strength table: ``apl-bench`` of the prefix shipped in the package (``None`` if it is absent).

    Writes ``<out>/bench-shipped`` and fills ``<out>/base-cache`` with the images made without a prefix, which the
    demo's own bench then reuses (same models, prompts and seeds).
    """
    from ..bench.runner import run_bench
    from ..world.models import SHIPPED_PREFIX

    if not (SHIPPED_PREFIX / "adapter_config.json").is_file() or assets is not None:
        return None  # the shipped prefix belongs to the shipped world; another world's models would not match it
    out = Path(out)
    spec, models, readers = demo_bench_inputs(seeds, None, assets, out / "base-cache")
    recipe = _read_json(SHIPPED_PREFIX / "recipe.json") or {}
    return run_bench(spec, models, readers, SHIPPED_PREFIX, out / "bench-shipped", extra={"recipe": recipe})


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
    images_from: Literal["name", "description"] = DEMO_IMAGES_FROM,
    shipped: bool = True,
) -> dict:
    """Shipped prefix's bench -> data -> training -> bench; returns the bench report of the prefix trained here
    (with the shipped prefix's report under ``"shipped_report"`` when it was measured) and prints both tables.

    Writes ``<out_dir>/bench-shipped`` (the full-strength prefix shipped in the package), ``<out_dir>/data``
    (reused if sampled with the same settings), ``<out_dir>/run`` (the training run, adapter in ``run/adapter``),
    ``<out_dir>/bench`` (report.md, report.json, grid.png) and ``<out_dir>/base-cache`` (the images without a
    prefix, generated once for both benches).
    """
    from ..bench.report import compare_markdown, to_markdown
    from ..bench.runner import run_bench
    from ..training import train

    out = Path(out_dir)
    started = time.perf_counter()
    shipped_report = None
    if shipped:
        print(
            "[1/4] apl-bench of the full-strength prefix shipped in the package (apl_adapter/world/assets/apl-prefix)"
        )
        shipped_report = bench_shipped_prefix(out, seeds, assets)
        if shipped_report is None:
            print("      not measured: no shipped prefix for these world models")
        else:
            print(to_markdown(shipped_report))
    data = out / "data"
    # data from an earlier run is reused only if it was sampled with the same settings
    stamp = {"per_name": per_name, "num_scenes": num_scenes, "images_from": images_from}
    stamp_file = out / "data_settings.json"
    data_started = time.perf_counter()
    if not (data / "metadata.jsonl").is_file() or _read_json(stamp_file) != stamp:
        print(f"[2/4] sampling training data from the world base model into {data} (identity images from the "
              f"{images_from} prompt)")  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)
        write_demo_data(data, per_name, num_scenes, assets, images_from)
        stamp_file.write_text(json.dumps(stamp) + "\n")
    data_seconds = time.perf_counter() - data_started
    config = demo_train_config(
        data, out / "run", assets, steps=steps, batch_size=batch_size, lr=lr, prefix_len=prefix_len,
        identity_fraction=identity_fraction,
    )  # fmt: skip
    keys = ("steps", "batch_size", "lr", "lr_schedule", "prefix_len", "prefix_depth", "hide_prefix_rows",
            "text_preserve", "identity_fraction")  # fmt: skip
    recipe = {key: getattr(config, key) for key in keys}
    print(f"[3/4] training a short APL prefix ({', '.join(f'{key} {value}' for key, value in recipe.items())})")
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo always trains afresh
    result = train(config)
    print("[4/4] apl-bench of the short prefix (images without a prefix come from the cache)")
    spec, models, readers = demo_bench_inputs(seeds, data, assets, out / "base-cache" if assets is None else None)
    # the report records the settings the run used, read off its config
    extra = {"training": {**recipe, "images_from": images_from, "seconds": result.seconds,
                          "final_loss": result.final_loss, "data_seconds": data_seconds}}  # fmt: skip
    report = run_bench(spec, models, readers, result.adapter_dir, out / "bench", extra=extra)
    print(to_markdown(report))
    if shipped_report is not None:
        report["shipped_report"] = shipped_report
        print("Side by side (same models, prompts and seeds):\n")
        print(compare_markdown({SHORT_LABEL: report, SHIPPED_LABEL: shipped_report}))
    print(
        f"training {result.seconds:.0f} s, bench {report['seconds']:.0f} s, total {time.perf_counter() - started:.0f} s"
    )
    print(f"report: {out / 'bench' / 'report.md'}  grid: {out / 'bench' / 'grid.png'}  adapter: {result.adapter_dir}")
    return report


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _grid(rows: list[list[np.ndarray]], scale: int = 4) -> Image.Image:
    """Images in [0, 1], ``(H, W, 3)``, one grid row per list, each cell enlarged ``scale`` times (nearest)."""
    from diffusers.utils import make_image_grid

    cells = [Image.fromarray((cell * 255).round().astype("uint8")) for row in rows for cell in row]
    cells = [cell.resize((cell.width * scale, cell.height * scale), Image.Resampling.NEAREST) for cell in cells]
    return make_image_grid(cells, rows=len(rows), cols=len(rows[0]))


def world_available() -> bool:
    from ..world.models import model_path

    try:
        model_path("base")
    except FileNotFoundError:
        return False
    return True


def export_and_compare(model_dir: Path, adapter_dir: Path, out: Path, prompts: list[str], seed: int = 0) -> dict:
    """Export ``model_dir`` + adapter to ONNX, generate with ONNX Runtime and with PyTorch, compare."""
    from apl_export.exporter import ExportOptions, export_pipeline
    from apl_export.runtime_ort import ORTAPLPipeline
    from apl_export.specs import ShapeRange, ShapeRanges
    from diffusers import StableDiffusionPipeline

    from ..pipelines import apply_apl

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ranges = ShapeRanges(
        batch=ShapeRange(1, 1, 2), height=ShapeRange(side, side, side), width=ShapeRange(side, side, side)
    )
    started = time.perf_counter()
    export_pipeline(model_dir, adapter_dir, out / "onnx", ExportOptions(ranges=ranges, overwrite=True))
    export_seconds = time.perf_counter() - started
    runtime = ORTAPLPipeline.from_pretrained(out / "onnx")
    apply_apl(pipe, adapter_dir)
    kwargs = dict(num_inference_steps=PAPER_STEPS, guidance_scale=PAPER_GUIDANCE_SCALE)
    rows, diffs = [], []
    for prompt in prompts:
        ort_image = runtime(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]
        torch_image = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]
        diffs.append(float(np.abs(ort_image - torch_image).max()))
        rows.append([torch_image, ort_image])
    _grid(rows).save(out / "export_grid.png")
    return {"export_seconds": export_seconds, "prompts": prompts, "max_abs_pixel_diff": diffs,
            "onnx_folder": str(out / "onnx")}  # fmt: skip


def run_world_demo(out: Path, seed: int = 0, assets: str | Path | None = None, **recipe: Any) -> dict:
    """:func:`run_demo` (``recipe``: its keyword options), then apl-export of the prefix it trained, compared with
    PyTorch on ``seed``; returns the summary :func:`~apl_adapter.demo.report.write_report` writes."""
    from ..bench.report import compare_markdown, to_markdown
    from ..world.models import model_path
    from ..world.spec import WorldSpec

    report = run_demo(out, assets=assets, **recipe)
    shipped = report.pop("shipped_report", None)
    name = WorldSpec.from_seed(0).seen[0].name
    _stage("apl-export: ONNX with the prefix baked in, ONNX Runtime vs PyTorch")
    prompts = [p.format(name=name) for p in EXPORT_PROMPTS]
    export = export_and_compare(model_path("base", assets), out / "run" / "adapter", out, prompts, seed)
    model = f"the synthetic world in {assets}" if assets else "the shipped synthetic world (apl_adapter/world/assets)"
    summary = {"model": model, "bench": report,
               "bench_markdown": to_markdown(report), "export": export}  # fmt: skip
    if shipped is not None:
        summary["shipped_bench"] = shipped
        summary["shipped_markdown"] = to_markdown(shipped)
        summary["compare_markdown"] = compare_markdown({SHORT_LABEL: report, SHIPPED_LABEL: shipped})
    return summary


def run_tiny_demo(out: Path, seed: int) -> dict:
    """Fallback without world weights: apply a random prefix to a tiny pipeline, export, compare."""
    from peft import get_peft_model

    from .. import APLConfig, save_adapter
    from ..pipelines import with_and_without_apl
    from ..testing import tiny_sd_pipeline

    _stage("a tiny random Stable Diffusion pipeline (real CLIP tokenizer) + a 10-vector APL prefix")
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out / "tiny-sd")
    model = get_peft_model(pipe.text_encoder, APLConfig())
    save_adapter(model, out / "run" / "adapter")
    model.unload()
    _stage("the same prompts and seed with and without the prefix (prefix on the positive prompt only)")
    kwargs = dict(num_inference_steps=PAPER_STEPS, guidance_scale=PAPER_GUIDANCE_SCALE, output_type="np")

    def draw(prefixed: bool) -> list[np.ndarray]:
        return [pipe(p, generator=torch.Generator().manual_seed(seed), **kwargs).images[0] for p in TINY_PROMPTS]

    base, apl = with_and_without_apl(pipe, out / "run" / "adapter", draw)
    changes = [{"prompt": prompt, "mean_abs_change": float(np.abs(a - b).mean())}
               for prompt, b, a in zip(TINY_PROMPTS, base, apl)]  # fmt: skip
    _grid([list(pair) for pair in zip(base, apl)]).save(out / "grid.png")
    _stage("apl-export on a tiny random pipeline (no world weights installed)")
    export = export_and_compare(out / "tiny-sd", out / "run" / "adapter", out, ["a photo of Ann Lee"], seed)
    return {"model": "tiny random pipeline (world weights not installed: run `apl-world build`)", "export": export,
            "tiny_changes": changes}  # fmt: skip
