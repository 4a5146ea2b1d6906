"""The demo's report: ``report.md`` (the tables and where the grids are) and ``report.json`` (everything measured)."""

from __future__ import annotations

import json
from pathlib import Path

from .recipe import SHIPPED_LABEL, SHORT_LABEL


def write_report(out: Path, summary: dict) -> Path:
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = ["# APL demo report", "", f"Model: {summary['model']}.", ""]
    if "compare_markdown" in summary:
        recipe = summary["shipped_bench"].get("recipe", {})
        lines += ["## The headline: the two prefixes side by side (same models, prompts and seeds)", "",
                  summary["compare_markdown"], "",
                  f"*{SHIPPED_LABEL}*: `apl_adapter/world/assets/apl-prefix`, "
                  f"{recipe.get('summary', 'see its recipe.json')}.",
                  f"*{SHORT_LABEL}*: the {summary['bench']['training']['steps']}-step recipe below, "
                  f"{summary['bench']['training']['seconds']:.0f} s of training.",
                  "The demo benches one seed, two templates and 48 scenes a model to stay short: its scene intervals "
                  "are about 6 points wide each way, too wide for the scene goal (low end above -4), whatever the "
                  "prefix does. The held-out table in the README (768 scene images a model) is the measurement.",
                  ""]  # fmt: skip
    if "bench_markdown" in summary:
        lines += [f"## apl-bench: {SHORT_LABEL}", "", summary["bench_markdown"], "",
                  f"Per-image grid: `{out / 'bench' / 'grid.png'}`.", ""]  # fmt: skip
    if "shipped_markdown" in summary:
        lines += [f"## apl-bench: {SHIPPED_LABEL}", "", summary["shipped_markdown"], "",
                  f"Per-image grid: `{out / 'bench-shipped' / 'grid.png'}`.", ""]  # fmt: skip
    if "tiny_changes" in summary:
        lines += ["## The prefix at work (random weights: the change is real, its meaning is not)", "",
                  "| prompt | mean abs pixel change with APL |", "|---|---|"]  # fmt: skip
        lines += [f"| {c['prompt']} | {c['mean_abs_change']:.4f} |" for c in summary["tiny_changes"]]
        lines += ["", f"Grid: `{out / 'grid.png'}` (rows = prompts, columns = base, APL).", ""]
    export = summary["export"]
    lines += ["## apl-export + ONNX Runtime", "",
              f"Exported to `{export['onnx_folder']}` in {export['export_seconds']:.0f} s (validated against PyTorch).",
              "Same seed, DDIM 20 steps, CFG 7: ONNX Runtime image vs PyTorch image (`apply_apl`).", "",
              "| prompt | max abs pixel difference |", "|---|---|"]  # fmt: skip
    lines += [f"| {p} | {d:.2e} |" for p, d in zip(export["prompts"], export["max_abs_pixel_diff"])]
    lines += ["", f"Grid: `{out / 'export_grid.png'}` (rows = prompts, columns = PyTorch, ONNX Runtime).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
