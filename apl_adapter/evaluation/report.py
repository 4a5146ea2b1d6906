"""The report folder: ``report.json`` (everything), ``report.md`` and ``report.html`` (tables), ``grid.png``."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from ..html_report import markdown_to_html

GRID_CELL = 160  # pixels per image side in grid.png (tiny test images are upscaled to it)


def write_report(report: dict, folder: Path, grid_rows: int | None = None) -> None:
    """Write JSON, Markdown, HTML and the base-vs-APL grid into ``folder``."""
    rows = grid_rows if grid_rows is not None else report.get("settings", {}).get("grid_rows", 12)
    make_grid(report["images"], folder, rows).save(folder / "grid.png")
    report["grid"] = "grid.png"
    (folder / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    markdown = to_markdown(report)
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    (folder / "report.html").write_text(to_html(report), encoding="utf-8")


def make_grid(records: list[dict], folder: Path, max_rows: int) -> Image.Image:
    """Two columns (base | APL), one row per prompt (first seed), at most ``max_rows`` rows."""
    first = {}
    for row in records:
        first.setdefault(row["key"], row)
    chosen = list(first.values())[: max(1, max_rows)]
    label_height = 14
    grid = Image.new("RGB", (2 * GRID_CELL, len(chosen) * (GRID_CELL + label_height) + label_height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 1), "base", fill="black")
    draw.text((GRID_CELL + 4, 1), "APL", fill="black")
    for index, row in enumerate(chosen):
        top = label_height + index * (GRID_CELL + label_height)
        draw.text((4, top), row["prompt"][:48], fill="black")
        for column, variant in enumerate(("base", "apl")):
            with Image.open(folder / row[variant]) as image:
                tile = image.convert("RGB").resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST)
            grid.paste(tile, (column * GRID_CELL, top + label_height))
    return grid


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _identity_tables(identity: dict) -> list[str]:
    if "skipped" in identity:
        return [f"Identity metrics skipped: {identity['skipped']}."]
    keys = [
        ("face_presence_rate", "face presence"),
        ("top1_accuracy", "top-1 accuracy"),
        ("same_person_rate", "same-person rate"),
        ("mean_identity_score", "mean cosine"),
        ("mean_distance", "mean distance (faces found)"),
    ]
    summary = _table(["metric", "base", "APL"], [[label, identity["base"][k], identity["apl"][k]] for k, label in keys])
    columns = [("face_presence_rate", "presence"), ("top1_accuracy", "top-1"), ("same_person_rate", "same person")]
    columns += [("mean_score", "mean cos"), ("max_score", "max cos")]
    per_header = ["identity", "n"] + [f"{label} {v}" for _, label in columns for v in ("base", "APL")]
    per_rows = []
    for name, base_row in identity["base"]["per_identity"].items():
        apl_row = identity["apl"]["per_identity"][name]
        per_rows.append([name, base_row["n"], *(row[key] for key, _ in columns for row in (base_row, apl_row))])
    mode = "open-set" if identity["open_set"] else "closed-set"
    base_top1, apl_top1 = identity["base"]["top1_accuracy"], identity["apl"]["top1_accuracy"]
    if base_top1 and apl_top1:
        summary += f"\n\nTop-1 accuracy falls {base_top1 / apl_top1:.1f}-fold with the prefix."
    elif base_top1:
        summary += "\n\nTop-1 accuracy falls to 0 with the prefix (check face presence beside it)."
    gallery_rows = [
        [
            name,
            row["num_references"],
            row["max_within_distance"],
            row.get("nearest_other"),
            row.get("nearest_other_distance"),
        ]
        for name, row in identity["gallery"].items()
    ]
    gallery = _table(["identity", "references", "max distance within", "nearest other", "its distance"], gallery_rows)
    return [
        f"Recognizer: **{identity['recognizer']}**, same person when distance < {identity['same_person_distance']}, "
        f"top-1 {mode}. Images without a face count as misses and score 0; read face presence beside every number.",
        summary,
        "### Per identity",
        _table(per_header, per_rows),
        "### Reference gallery",
        gallery,
    ]


def _quality_lines(quality: dict) -> list[str]:
    lines = []
    unchanged = quality["unchanged"]
    if "skipped" in unchanged:
        lines.append(f"Prompts without a person: skipped ({unchanged['skipped']}).")
    else:
        lines.append(
            f"Prompts without a person, base vs APL over {unchanged['num_pairs']} image pairs: mean SSIM "
            f"{_fmt(unchanged['mean_ssim'])}, mean PSNR {_fmt(unchanged['mean_psnr'], 1)} dB "
            f"({unchanged['identical_pairs']} pairs identical)."
        )
    clip = quality["clip_score"]
    if "skipped" in clip:
        lines.append(f"CLIP score: skipped ({clip['skipped']}).")
    else:
        groups = [("neutral", "prompts without a person"), ("identity", "identity prompts")]
        groups.append(("identity_anonymous", "identity images vs anonymous description"))
        rows = [[label, clip["base"][key], clip["apl"][key]] for key, label in groups]
        lines.append(_table(["CLIP score", "base", "APL"], rows))
    fid = quality["fid"]
    if "skipped" in fid:
        lines.append(f"FID: skipped ({fid['skipped']}).")
    else:
        rows = [["base vs APL", fid["base_vs_apl"]]]
        if "reference_vs_base" in fid:
            rows += [["reference vs base", fid["reference_vs_base"]], ["reference vs APL", fid["reference_vs_apl"]]]
        lines.append(_table(["FID", "value"], rows) + f"\n\n{fid['num_images']} images per set. {fid.get('note', '')}")
    return lines


def to_markdown(report: dict) -> str:
    settings = report["settings"]
    parts = [
        "# apl-eval report",
        f"Base `{settings['base']}`, adapter `{settings['adapter']}`, seeds {settings['seeds']}, "
        f"{settings['steps']} steps, CFG {settings['guidance_scale']}. Created {report['created']}.",
        "## Identity leakage",
        *_identity_tables(report["identity"]),
        "## Quality",
        *_quality_lines(report["quality"]),
        "## Images",
        "![base vs APL](grid.png)",
        "## Skipped",
        "\n".join(f"- {line}" for line in report["skipped"]) or "Nothing was skipped.",
        "## Warnings",
        "\n".join(f"- {line}" for line in report["warnings"]) or "None.",
    ]
    return "\n\n".join(parts) + "\n"


def to_html(report: dict) -> str:
    """A self-contained page: the Markdown's tables rendered as HTML tables, the grid inline."""
    return markdown_to_html(to_markdown(report), "apl-eval report")
