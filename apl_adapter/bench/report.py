"""apl-bench reports: ``report.json``, ``report.md`` / ``report.html`` (goals + details), ``grid.png`` (identities
x {base, APL}, with what the recognizer read)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import atomic_folder
from ..html_report import markdown_to_html

PERSON_SECTIONS = ("seen", "unseen", "late", "transfer")
SECTION_TITLES = {
    "seen": "seen identities (base model)",
    "unseen": "unseen identities (base model)",
    "late": "late identities (DreamBooth model)",
    "transfer": "transfer: seen + unseen on the sibling model",
}
# (section, goal fall factor) - the goals
FALL_GOALS = {"seen": 10.0, "unseen": 5.0, "late": 5.0, "transfer": 5.0}
FACE_PRESENCE_GOAL = 0.95
ATTRIBUTE_GOAL = 0.80
SCENE_DROP_GOAL_POINTS = 2.0
SCENE_CI_FLOOR_POINTS = 4.0  # the paired 95% interval's low end must stay above -4 points
#: issue 20's goal for every robustness family (prompts unlike the training data), on seen names
ROBUSTNESS_FALL = 5.0


def pooled(sections: dict, key_path: tuple[str, ...]) -> float | None:
    """Image-weighted mean of a metric over the person sections present (``None`` if none)."""
    total, weight = 0.0, 0
    for name in PERSON_SECTIONS:
        if name in sections:
            value = sections[name]
            for key in key_path:
                value = value[key]
            total += value * sections[name]["num_images"]
            weight += sections[name]["num_images"]
    return total / weight if weight else None


def goals(sections: dict) -> list[dict]:
    """One row per goal: measured values, the goal and whether it is met (``None`` = not measured)."""
    rows = []
    for name, factor in FALL_GOALS.items():
        if name not in sections:
            rows.append({"measure": f"{name}: top-1 accuracy falls", "goal": f">= {factor:g}x", "met": None})
            continue
        section = sections[name]
        fall = section["accuracy_fall"]
        rows.append(
            {
                "measure": f"{SECTION_TITLES[name]}: top-1 identity accuracy, base / APL",
                "value": f"{_pct(section['base']['top1_accuracy'])} / {_pct(section['apl']['top1_accuracy'])} "
                f"(falls {_times(fall)})",
                "goal": f"falls >= {factor:g}x",
                "met": fall >= factor,
            }
        )
    for family, fall in sections.get("seen", {}).get("fall_per_family", {}).items():
        seen = sections["seen"]
        rows.append(
            {
                "measure": f"seen names, template family '{family}': top-1, base / APL",
                "value": f"{_pct(seen['base']['per_family'][family])} / {_pct(seen['apl']['per_family'][family])} "
                f"(falls {_times(fall)})",
                "goal": f"falls >= {ROBUSTNESS_FALL:g}x",
                "met": fall >= ROBUSTNESS_FALL,
            }
        )
    presence = pooled(sections, ("apl", "face_presence_rate"))
    rows.append(_threshold_row("face presence with APL (all person prompts)", presence, FACE_PRESENCE_GOAL))
    agreement = pooled(sections, ("apl", "attributes", "all_match_rate"))
    rows.append(
        _threshold_row("attribute agreement with APL (all 4 attributes of the named person)", agreement, ATTRIBUTE_GOAL)
    )
    for name, model in (("scenes", "base"), ("scenes_sibling", "sibling")):
        if name in sections:
            rows.append(_scene_row(sections[name], model))
    return rows


def _scene_row(scenes: dict, model: str) -> dict:
    """Scenes are kept when the point estimate loses <= 2 points *and* the paired 95% interval of the change
    stays above -4 points (a small sample cannot pass by a lucky point estimate alone)."""
    drop = scenes["accuracy_drop_points"]
    paired = scenes.get("paired")
    low = paired["change_ci95_points"][0] if paired else None
    met = drop <= SCENE_DROP_GOAL_POINTS and (low is None or low > -SCENE_CI_FLOOR_POINTS)
    return {
        "measure": f"scene accuracy on the {model} model, base minus APL (prompts without a person)",
        "value": f"{_pct(scenes['base']['scene_accuracy'])} - {_pct(scenes['apl']['scene_accuracy'])} "
        f"= {drop:+.1f} points{_paired(scenes)}",
        "goal": f"<= {SCENE_DROP_GOAL_POINTS:g} points, CI low end > -{SCENE_CI_FLOOR_POINTS:g}",
        "met": met,
    }


def _paired(section: dict) -> str:
    """``"; 16 lost, 3 gained, McNemar p = 0.0044, APL minus base 95% CI -11.7 to -2.5"`` (same-seed pairs)."""
    paired = section.get("paired")
    if not paired:
        return ""
    low, high = paired["change_ci95_points"]
    return (
        f"; {paired['lost']} lost, {paired['gained']} gained, McNemar p = {paired['mcnemar_p']:.2g}, "
        f"APL minus base 95% CI {low:+.1f} to {high:+.1f}"
    )


def _threshold_row(measure: str, value: float | None, goal: float) -> dict:
    if value is None:
        return {"measure": measure, "goal": f">= {_pct(goal)}", "met": None}
    return {"measure": measure, "value": _pct(value), "goal": f">= {_pct(goal)}", "met": value >= goal}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _times(value: float) -> str:
    return "inf x (to 0)" if math.isinf(value) else f"{value:.1f}x"


def to_markdown(report: dict) -> str:
    """The report as Markdown: goals table first, then per-section details."""
    lines = ["# apl-bench report", ""]
    lines.append(
        f"Adapter `{report['adapter']}`; {report['settings']['num_inference_steps']} DDIM steps, CFG "
        f"{report['settings']['guidance_scale']:g}, seeds {report['settings']['seeds']} (each prompt its own noise, "
        "the same with and without APL), prefix on the positive prompt only. "
        f"Recognizers: {report['recognizers']}."
    )
    lines += ["", "| measure | measured | goal | met |", "|---|---|---|---|"]
    for row in report["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['measure']} | {row.get('value', '-')} | {row['goal']} | {met} |")
    sections = report["sections"]
    person_rows = [name for name in PERSON_SECTIONS if name in sections]
    if person_rows:
        lines += [
            "",
            "## Identity prompts",
            "",
            "| section | images | top-1 base | top-1 APL | fall | id-score base | id-score APL | face base | face APL "
            "| attributes base | attributes APL | pixel change |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in person_rows:
            s = sections[name]
            b, a = s["base"], s["apl"]
            lines.append(
                f"| {name} | {s['num_images']} | {_pct(b['top1_accuracy'])} | {_pct(a['top1_accuracy'])} "
                f"| {_times(s['accuracy_fall'])} | {b['mean_identity_score']:.3f} | {a['mean_identity_score']:.3f} "
                f"| {_pct(b['face_presence_rate'])} | {_pct(a['face_presence_rate'])} "
                f"| {_pct(b['attributes']['all_match_rate'])} | {_pct(a['attributes']['all_match_rate'])} "
                f"| {s['same_seed_pixel_change']:.3f} |"
            )
        lines += _kept_attribute_lines(sections, person_rows)
        trained = report["settings"]["train_templates"]
        note = "*held out* = never used in training" if trained else "pass --train-data to mark held-out templates"
        lines += ["", f"Top-1 accuracy per template (base / APL); {note}:", ""]
        lines += ["| template | " + " | ".join(person_rows) + " |", "|---|" + "---|" * len(person_rows)]
        for template in report["settings"]["person_templates"]:
            held_out = " *held out*" if trained and template not in trained else ""
            cells = [
                f"{_pct(sections[n]['base']['per_template'][template])} / "
                f"{_pct(sections[n]['apl']['per_template'][template])}"
                for n in person_rows
            ]
            lines.append(f"| `{template}`{held_out} | " + " | ".join(cells) + " |")
        families = [n for n in person_rows if "fall_per_family" in sections[n]]
        if families:
            lines += ["", f"Fall of top-1 per template family (base -> APL, goal >= {ROBUSTNESS_FALL:g}x each):", ""]
            lines += ["| family | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
            for family in sections[families[0]]["fall_per_family"]:
                cells = []
                for n in families:
                    base, apl = sections[n]["base"]["per_family"][family], sections[n]["apl"]["per_family"][family]
                    cells.append(f"{_pct(base)} -> {_pct(apl)} ({_times(sections[n]['fall_per_family'][family])})")
                lines.append(f"| {family} | " + " | ".join(cells) + " |")
    for name in ("scenes", "scenes_sibling"):
        if name in sections:
            s = sections[name]
            lines.append(
                f"\n**{name}** ({s['num_images']} images): scene accuracy base {_pct(s['base']['scene_accuracy'])}, "
                f"APL {_pct(s['apl']['scene_accuracy'])} "
                f"(base minus APL {s['accuracy_drop_points']:+.1f} points{_paired(s)}); "
                f"same-seed pixel change {s['same_seed_pixel_change']:.4f} (0 = identical images)."
            )
    lines += ["", f"Generated {report['num_images']} images in {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _kept_attribute_lines(sections: dict, person_rows: list[str]) -> list[str]:
    """APL's identity split by whether the face kept the person's four attributes (reports before 2026-12-04 lack
    it: no lines then)."""
    rows = [n for n in person_rows if "by_attributes_kept" in sections[n]["apl"]]
    if not rows:
        return []
    lines = [
        "",
        "With APL, split by the attributes: the recognizer almost never names a face whose attributes differ from "
        "the person's, so a fall bought by changing an attribute shows as named 0 of the changed faces; the fall "
        "among faces that keep all four is the anonymization that is not.",
        "",
        "| section | kept all four | named when kept | fall when kept | attribute changed | named when changed |",
        "|---|---|---|---|---|---|",
    ]
    for name in rows:
        split = sections[name]["apl"]["by_attributes_kept"]
        kept, changed = split["kept"], split["changed"]
        fall = sections[name].get("fall_when_attributes_kept")
        rate = _pct(split["named_when_kept"] / kept) if kept else "-"
        lines.append(
            f"| {name} | {kept} | {split['named_when_kept']} ({rate}) | {_times(fall) if fall is not None else '-'} "
            f"| {changed} | {split['named_when_changed']} |"
        )
    return lines


def compare_markdown(reports: dict[str, dict]) -> str:
    """Several bench reports side by side (columns = prefixes, rows = goals), e.g. the demo's short prefix next to
    the shipped one. Reports read back from ``report.json`` work too (a fall to 0 is stored as ``"inf"``).

    >>> apl = {"top1_accuracy": 0.08, "face_presence_rate": 1.0, "attributes": {"all_match_rate": 0.9}}
    >>> seen = {"num_images": 10, "accuracy_fall": 12.0, "base": {"top1_accuracy": 0.96}, "apl": apl}
    >>> print(compare_markdown({"short": {"sections": {"seen": seen}}, "shipped": {"sections": {"seen": seen}}}))
    | goal | short | shipped |
    |---|---|---|
    | seen: top-1 falls >= 10x | 96.0% -> 8.0% (12.0x) yes | 96.0% -> 8.0% (12.0x) yes |
    | face presence >= 95.0% | 100.0% yes | 100.0% yes |
    | attributes kept >= 80.0% | 90.0% yes | 90.0% yes |
    """
    columns = list(reports)
    lines = ["| goal | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for goal, cell in _compare_rows():
        cells = [cell(reports[label]["sections"]) for label in columns]
        if any(c is not None for c in cells):
            lines.append(f"| {goal} | " + " | ".join(c or "-" for c in cells) + " |")
    return "\n".join(lines)


def _compare_rows():
    def fall(name: str, factor: float):
        def cell(sections: dict) -> str | None:
            if name not in sections:
                return None
            s = sections[name]
            ratio = float(s["accuracy_fall"])  # "inf" from JSON reads back as inf
            met = "yes" if ratio >= factor else "**no**"
            return f"{_pct(s['base']['top1_accuracy'])} -> {_pct(s['apl']['top1_accuracy'])} ({_times(ratio)}) {met}"

        return f"{name}: top-1 falls >= {factor:g}x", cell

    def rate(key_path: tuple[str, ...], goal: float):
        def cell(sections: dict) -> str | None:
            value = pooled(sections, key_path)
            return None if value is None else f"{_pct(value)} {'yes' if value >= goal else '**no**'}"

        return cell

    def scenes(name: str):
        def cell(sections: dict) -> str | None:
            if name not in sections:
                return None
            s, row = sections[name], _scene_row(sections[name], "")
            low, high = s["paired"]["change_ci95_points"]
            change = 0.0 - s["accuracy_drop_points"]  # not -drop: no drop would print as "-0.0"
            return f"{change:+.1f} pts [{low:+.1f}, {high:+.1f}] {'yes' if row['met'] else '**no**'}"

        return cell

    rows = [fall(name, factor) for name, factor in FALL_GOALS.items()]
    rows.append(
        (f"face presence >= {_pct(FACE_PRESENCE_GOAL)}", rate(("apl", "face_presence_rate"), FACE_PRESENCE_GOAL))
    )
    rows.append(
        (f"attributes kept >= {_pct(ATTRIBUTE_GOAL)}", rate(("apl", "attributes", "all_match_rate"), ATTRIBUTE_GOAL))
    )

    def kept_falls(sections: dict) -> str | None:
        names = [n for n in PERSON_SECTIONS if n in sections]
        if not any("fall_when_attributes_kept" in sections[n] for n in names):
            return None  # a report from before the split
        cells = [sections[n].get("fall_when_attributes_kept") for n in names]
        return " / ".join("-" if c is None else _times(float(c)) for c in cells) + f" ({' / '.join(names)})"

    rows.append(("the same falls among faces that keep all four attributes (not a goal)", kept_falls))
    goal = f"within {SCENE_DROP_GOAL_POINTS:g} pts, 95% CI low end > -{SCENE_CI_FLOOR_POINTS:g}"
    rows.append((f"scenes, base model: APL minus base, {goal}", scenes("scenes")))
    rows.append((f"scenes, sibling model: APL minus base, {goal}", scenes("scenes_sibling")))
    return rows


#: pixels per image side in grid.png: the world's 32x32 images are scaled up (nearest) to at least this
GRID_CELL = 128


def make_grid(sections: dict, per_section: int = 3, cell: int = GRID_CELL) -> Image.Image:
    """Rows = a few identities per section (and scenes), columns = base | APL for the first template and seeds.

    Under each image: what the recognizer read in it (a name, "a stranger", "no face"; a scene label), red where the
    APL image still shows the named person (or lost its scene), green where it does not.
    """
    rows: list[tuple[str, str, list[Image.Image], list[str]]] = []
    for name in (*PERSON_SECTIONS, "scenes"):
        if name not in sections:
            continue
        plain, anonymized, cases = sections[name]["_images"]
        verdicts = sections[name].get("_verdicts", ([""] * len(plain), [""] * len(anonymized)))
        labels_seen: list[str] = []
        for index, case in enumerate(cases):
            label = case[0].name if name in PERSON_SECTIONS else case[0].label
            if label in labels_seen:
                continue
            labels_seen.append(label)
            if len(labels_seen) > per_section:
                break
            rows.append((f"{name}: {label}", label, [plain[index], anonymized[index]], [v[index] for v in verdicts]))
    if not rows:
        return Image.new("RGB", (1, 1))
    side = max(cell, rows[0][2][0].width)
    label_width, header, caption = 230, 16, 16
    grid = Image.new("RGB", (label_width + 2 * side, header + len(rows) * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_width + 4, 2), "base", fill="black")
    draw.text((label_width + side + 4, 2), "APL", fill="black")
    for row, (title, expected, images, read) in enumerate(rows):
        top = header + row * (side + caption)
        draw.text((4, top + side // 2 - 6), title[:36], fill="black")
        is_person = not title.startswith("scenes")
        for column, (image, verdict) in enumerate(zip(images, read)):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (label_width + column * side, top))
            kept = verdict == expected
            color = "black" if column == 0 else ("darkred" if kept == is_person else "darkgreen")
            draw.text((label_width + column * side + 4, top + side + 2), verdict[:30], fill=color)
    return grid


def write_report(report: dict, sections: dict, out: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``grid.png`` as the folder ``out``, replacing what
    was there (the folder is staged and swapped in whole, so a reader never sees one report's table with another's
    grid)."""
    out = Path(out)
    markdown = to_markdown(report)
    with atomic_folder(out, replace=True, kind="bench") as staging:
        (staging / "report.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
        (staging / "report.md").write_text(markdown)
        page = markdown + "\n\n![base and APL, what the recognizer read](grid.png)"
        (staging / "report.html").write_text(markdown_to_html(page, "apl-bench report"), encoding="utf-8")
        make_grid(sections).save(staging / "grid.png", format="PNG")
    return out


def _finite(value):
    """Strict JSON has no Infinity: a fall to 0 is written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strip_images(sections: dict) -> dict:
    """The sections without their in-memory images and verdicts (for JSON)."""
    in_memory = ("_images", "_verdicts")
    return {name: {k: v for k, v in section.items() if k not in in_memory} for name, section in sections.items()}
