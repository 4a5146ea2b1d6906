"""apl-bench building blocks: metrics, goals, reports, world inputs and CLI errors (no generation here)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from apl_adapter.bench.cli import main
from apl_adapter.bench.protocol import (
    Person,
    attribute_agreement,
    fall_ratio,
    named_by_attributes_kept,
    paired_change,
    paired_difference_interval,
    pixel_change,
)
from apl_adapter.bench.report import compare_markdown, goals, strip_images, to_markdown, write_report
from apl_adapter.bench.templates import read_templates, robustness_templates
from apl_adapter.bench.world import pick_scenes, read_identity_list, templates_in_training_data
from apl_adapter.errors import APLAdapterError
from apl_adapter.world.spec import SCENE_BACKGROUNDS, WorldSpec


def test_attribute_agreement_counts_per_attribute_and_all_at_once():
    expected = [{"sex": "male", "hair": "red"}, {"sex": "female", "hair": "black"}, {"sex": "male", "hair": "grey"}]
    read = [{"sex": "male", "hair": "red"}, {"sex": "female", "hair": "brown"}, {}]  # last: no face
    result = attribute_agreement(read, expected)
    assert result["per_attribute"] == {"hair": pytest.approx(1 / 3), "sex": pytest.approx(2 / 3)}
    assert result["mean_agreement"] == pytest.approx(0.5)
    assert result["all_match_rate"] == pytest.approx(1 / 3)


def test_fall_ratio():
    assert fall_ratio(0.9, 0.09) == pytest.approx(10.0)
    assert math.isinf(fall_ratio(0.5, 0.0))
    assert fall_ratio(0.0, 0.0) == 1.0
    assert fall_ratio(0.2, 0.4) == pytest.approx(0.5)  # a rise shows as a factor below 1


def test_identity_is_split_by_whether_the_face_kept_the_attributes():
    from apl_adapter.metrics.base import FaceObservation

    ann = {"hair": "red", "skin": "tan"}
    observations = [
        FaceObservation(True, 0.9, "Ann"),  # kept, named
        FaceObservation(True, 0.9, None),  # kept, a stranger
        FaceObservation(True, 0.9, "Ann"),  # skin changed, still named
        FaceObservation(True, 0.9, None),  # hair changed, a stranger
        FaceObservation(False, 0.1),  # no face: neither kept nor named, whatever was read
    ]
    read = [ann, ann, {"hair": "red", "skin": "light"}, {"hair": "black", "skin": "tan"}, ann]
    split = named_by_attributes_kept(observations, read, ["Ann"] * 5, [ann] * 5)
    assert split == {"kept": 2, "named_when_kept": 1, "changed": 3, "named_when_changed": 1}


def test_pixel_change():
    black, white, grey = (Image.new("RGB", (4, 4), c) for c in ("black", "white", (51, 51, 51)))
    assert pixel_change([black, black], [black, black]) == 0.0
    assert pixel_change([black, black], [white, grey]) == pytest.approx((1.0 + 0.2) / 2)


def _section(base_acc, apl_acc, presence=1.0, attrs=0.9, n=10):
    def side(acc):
        return {
            "top1_accuracy": acc,
            "mean_identity_score": acc,
            "face_presence_rate": presence,
            "attributes": {"mean_agreement": attrs, "all_match_rate": attrs, "per_attribute": {}},
            "per_template": {"a photo of {}": acc},
        }

    return {
        "num_images": n,
        "base": side(base_acc),
        "apl": side(apl_acc),
        "accuracy_fall": fall_ratio(base_acc, apl_acc),
        "same_seed_pixel_change": 0.1,
        "_images": (
            [Image.new("RGB", (8, 8))],
            [Image.new("RGB", (8, 8), "red")],
            [(Person("Ann Lee", {}, "seen"), 0, "a photo of Ann Lee", 0)],
        ),
        "_verdicts": (["Ann Lee"], ["a stranger"]),
    }


def test_goals_are_judged_on_the_measured_numbers(tmp_path):
    sections = {
        "seen": _section(0.9, 0.05),  # 18x: met
        "unseen": _section(0.8, 0.4),  # 2x: missed
        "scenes": {
            "num_images": 4,
            "base": {"scene_accuracy": 0.95},
            "apl": {"scene_accuracy": 0.90},
            "accuracy_drop_points": 5.0,
            "paired": paired_change([True, True, True, True], [True, True, True, False]),
            "same_seed_pixel_change": 0.01,
            "_images": ([Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))], []),
        },
    }
    rows = {row["measure"].split(":")[0].split(",")[0]: row["met"] for row in goals(strip_images(sections))}
    assert rows["seen identities (base model)"] is True
    assert rows["unseen identities (base model)"] is False
    assert rows["late"] is None and rows["transfer"] is None  # not measured, said so
    assert rows["scene accuracy on the base model"] is False  # a 5-point drop misses the 2-point goal
    assert "scene accuracy on the sibling model" not in rows  # no sibling measured, no row

    report = {
        "adapter": "a",
        "recognizers": "r",
        "settings": {"num_inference_steps": 20, "guidance_scale": 7.0, "seeds": [0], "person_templates":
                     ["a photo of {}"], "train_templates": []},
        "goals": goals(strip_images(sections)),
        "sections": strip_images(sections),
        "num_images": 48,
        "seconds": 1.0,
    }  # fmt: skip
    markdown = to_markdown(report)
    assert "| seen | 10 | 90.0% | 5.0% | 18.0x |" in markdown
    assert "**no**" in markdown and "not measured" in markdown
    assert "= +5.0 points; 1 lost, 0 gained, McNemar p = 1, APL minus base 95% CI -69.9 to +28.1" in markdown
    assert "APL 90.0% (base minus APL +5.0 points; 1 lost" in markdown  # the section says which way it runs
    assert "named when kept" not in markdown  # sections measured before the split carry none: no table
    sections["seen"]["apl"]["by_attributes_kept"] = {"kept": 6, "named_when_kept": 1, "changed": 4,
                                                     "named_when_changed": 0}  # fmt: skip
    sections["seen"]["fall_when_attributes_kept"] = fall_ratio(0.9, 1 / 6)
    markdown = to_markdown({**report, "sections": strip_images(sections)})
    assert "| seen | 6 | 1 (16.7%) | 5.4x | 4 | 0 |" in markdown
    old_mask = os.umask(0o022)
    try:
        write_report(report, sections, tmp_path / "out")
    finally:
        os.umask(old_mask)
    # a server running as another user reads the report (mkstemp alone would make grid.png 0600)
    files = ["grid.png", "report.html", "report.json", "report.md"]
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == dict.fromkeys(files, 0o644)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sections"]["seen"]["accuracy_fall"] == 18.0
    assert "_verdicts" not in (tmp_path / "out" / "report.json").read_text()
    # two rows (seen, unseen) of 8-pixel images, each cell scaled to 128 px with a 16-px verdict line under it
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png").convert("RGB")).astype(int)
    assert grid.shape == (16 + 2 * (128 + 16), 230 + 2 * 128, 3)
    verdict = grid[16 + 128 : 16 + 144, 230 + 128 :]  # under the first APL image: "a stranger", in green
    assert ((verdict[..., 1] > verdict[..., 0] + 40) & (verdict.sum(-1) < 500)).any()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<td>seen</td><td>10</td><td>90.0%</td>" in page and '<img src="grid.png"' in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files


def test_world_identity_and_template_files(tmp_path):
    world = WorldSpec.from_seed(0)
    names = tmp_path / "names.txt"
    names.write_text(f"# comment\n{world.seen[0].name}\nlate\t{world.unseen[0].name}\n")
    persons = read_identity_list(names, world)
    assert [(p.name, p.split) for p in persons] == [(world.seen[0].name, "seen"), (world.unseen[0].name, "late")]
    assert persons[0].attributes == world.seen[0].attributes
    names.write_text("Nobody Atall\n")
    with pytest.raises(APLAdapterError, match="not a person of this world"):
        read_identity_list(names, world)
    templates = tmp_path / "templates.txt"
    templates.write_text("a sketch of {name}\n{} at the beach\ntypo\ta photo of {name_typo}\n")
    assert read_templates(templates) == (
        ["a sketch of {}", "{} at the beach", "a photo of {name_typo}"],
        {"a photo of {name_typo}": "typo"},
    )
    for bad, message in [("a sketch of someone", "no place for the name"), ("a photo of {x}", "does not know"),
                         ("a photo of {0}", "does not know")]:  # fmt: skip
        templates.write_text(bad + "\n")
        with pytest.raises(APLAdapterError, match=message):
            read_templates(templates)


def test_robustness_families_fill_every_template():
    """Seven families, two templates each; every prompt holds the name in the family's form."""
    from apl_adapter.bench.protocol import BenchSpec

    templates, families = robustness_templates()
    assert sorted(set(families.values())) == sorted(
        ["lower-case", "typo", "two names", "repeated", "the real", "styles", "paraphrases"]
    )
    persons = [Person("Ann Lee", {}, "seen"), Person("Bo Chen", {}, "seen")]
    spec = BenchSpec(persons=persons, person_templates=templates, scenes=[], seeds=[0], template_families=families)
    prompts = {families[templates[i]]: [] for i in range(len(templates))}
    for person, index, prompt, _ in spec.person_prompts("seen"):
        if person.name == "Ann Lee":
            prompts[families[templates[index]]].append(prompt)
    assert prompts["lower-case"] == ["a photo of ann lee", "a close-up portrait of ann lee"]
    assert prompts["typo"] == ["a photo of Ann Lei", "a headshot of Ann Lei"]
    assert prompts["two names"] == ["a photo of Ann Lee and Bo Chen", "a photo of Bo Chen next to Ann Lee"]
    assert prompts["repeated"][0] == "a photo of Ann Lee, Ann Lee"
    assert all("real Ann Lee" in p for p in prompts["the real"])
    assert all("Ann Lee" in p for p in prompts["styles"] + prompts["paraphrases"])


def test_held_out_templates_come_from_the_training_data(tmp_path):
    persons = [Person("Ann Lee", {}, "seen")]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"c1": "a photo of Ann Lee"}) + "\n")
    used = templates_in_training_data(tmp_path, ["a photo of {}", "a headshot of {}"], persons)
    assert used == ["a photo of {}"]


def test_scene_prompts_spread_over_the_world():
    world = WorldSpec.from_seed(0)
    scenes = pick_scenes(world, 24)
    assert len(scenes) == 24 and len({s.label for s in scenes}) == 24
    assert {s.label.split(" on ")[1] for s in scenes} == {"white", "black", "sky blue", "grass green"}
    # 6 scenes per background over 4 caption templates: each background in every template, once or twice
    pairs = Counter(caption_of(world, case) for case in scenes)
    assert set(pairs) == {(b, t) for b in range(4) for t in range(4)} and set(pairs.values()) == {1, 2}


def caption_of(world, case) -> tuple[int, int]:
    """(background index, caption template index) of a bench scene prompt."""
    for scene in world.scenes:
        for template in range(len(world.scene_templates)):
            if scene.caption(template) == case.prompt:
                return SCENE_BACKGROUNDS.index(scene.background), template
    raise AssertionError(f"{case.prompt!r} is no world caption")


def test_scene_prompts_ask_every_background_in_every_caption_template():
    world = WorldSpec.from_seed(0)
    pairs = Counter(caption_of(world, case) for case in pick_scenes(world, 96))
    assert pairs == Counter({(b, t): 6 for b in range(4) for t in range(4)})
    every = pick_scenes(world, "all")  # --num-scenes all: each of the 96 scenes in each of the 4 templates
    assert len({case.prompt for case in every}) == 384 and len({case.label for case in every}) == 96


def test_cli_rejects_bad_adapter_and_seeds(capsys, tmp_path):
    assert main(["--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "No adapter folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--seeds", "0,x"])
    assert exit_info.value.code == 2 and "expected a comma list of integers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_paired_change_counts_discordant_pairs_and_gives_the_exact_mcnemar_p():
    # 16 scenes lost and 3 gained among 192 same-seed pairs (the rest agree):
    # p = 2 * P(X <= 3), X ~ Binomial(19, 1/2) = 2 * (1 + 19 + 171 + 969) / 2**19
    before = [True] * 16 + [False] * 3 + [True] * 170 + [False] * 3
    after = [False] * 16 + [True] * 3 + [True] * 170 + [False] * 3
    paired = paired_change(before, after)
    assert (paired["lost"], paired["gained"]) == (16, 3)
    assert paired["mcnemar_p"] == pytest.approx(2 * 1160 / 2**19)
    assert paired_change(after, before)["mcnemar_p"] == paired["mcnemar_p"]  # two-sided
    assert paired_change([True, False], [True, False]) == {
        "lost": 0, "gained": 0, "mcnemar_p": 1.0, "change_ci95_points": [0.0, 0.0]
    }  # fmt: skip
    assert paired_change([True] * 8, [False] * 8)["mcnemar_p"] == pytest.approx(2 / 2**8)


def test_paired_change_interval_of_the_accuracy_change():
    # Newcombe's method 10 written out with the closed-form Wilson interval (the code takes Wilson from scipy)
    before = [True] * 16 + [False] * 3 + [True] * 170 + [False] * 3
    after = [False] * 16 + [True] * 3 + [True] * 170 + [False] * 3
    both, lost, gained, neither, n, z = 170, 16, 3, 3, 192, 1.959964

    def wilson(k: int) -> tuple[float, float]:
        p = k / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half / (1 + z * z / n), centre + half / (1 + z * z / n)

    p1, p2 = (both + lost) / n, (both + gained) / n
    (l1, u1), (l2, u2) = wilson(both + lost), wilson(both + gained)
    phi = (both * neither - lost * gained) / math.sqrt(
        (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    )
    low = p2 - p1 - math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    high = p2 - p1 + math.sqrt((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)
    measured = paired_change(before, after)["change_ci95_points"]
    assert measured == [pytest.approx(100 * low, abs=0.05), pytest.approx(100 * high, abs=0.05)]
    assert measured[1] < 0  # 16 lost against 3 gained: a loss, and the interval says so
    assert paired_change(after, before)["change_ci95_points"] == [-measured[1], -measured[0]]  # symmetric
    with pytest.raises(ValueError, match="one 'after' per 'before'"):
        paired_change([True, True], [True])


def test_paired_interval_covers_the_true_change_95_percent_of_the_time():
    # 1,000 simulated benches of 384 paired images (a 1.5-point true loss): the interval is what it says it is
    rng = np.random.default_rng(0)
    probs, n = (0.85, 0.03, 0.015, 0.105), 384  # both right, lost, gained, neither
    covered = []
    for both, lost, gained, neither in rng.multinomial(n, probs, size=1000):
        low, high = paired_difference_interval(both, lost, gained, neither)
        covered.append(low <= probs[2] - probs[1] <= high)
    assert 0.93 <= np.mean(covered) <= 0.97
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)  # nothing measured: nothing known


def test_a_two_name_prompt_leaks_when_either_named_person_appears():
    from apl_adapter.bench.protocol import BenchSpec, _named_rate
    from apl_adapter.metrics.base import FaceObservation

    persons = [Person("Ann Lee", {}, "seen"), Person("Bo Chen", {}, "seen")]
    spec = BenchSpec(persons=persons, person_templates=["a photo of {}", "a photo of {} and {other_name}"], scenes=[])
    cases = [(persons[0], 0, "", 0), (persons[0], 1, "", 0), (persons[0], 1, "", 1)]
    seen_bo = FaceObservation(True, 1.0, "Bo Chen")
    assert _named_rate(spec, [(seen_bo, cases[0])]) == 0.0  # one name: only Ann counts
    assert _named_rate(spec, [(seen_bo, cases[1]), (FaceObservation(False, 0.0), cases[2])]) == 0.5


def test_scenes_are_kept_only_when_the_interval_stays_above_minus_4_points():
    def scenes(lost: int, gained: int, n: int) -> dict:
        before = [True] * lost + [False] * gained + [True] * (n - lost - gained)
        after = [False] * lost + [True] * gained + [True] * (n - lost - gained)
        paired = paired_change(before, after)
        base, apl = sum(before) / n, sum(after) / n
        return {"num_images": n, "base": {"scene_accuracy": base}, "apl": {"scene_accuracy": apl},
                "accuracy_drop_points": 100 * (base - apl), "paired": paired}  # fmt: skip

    def met(section: dict) -> bool:
        return next(row for row in goals({"scenes_sibling": section}) if "sibling" in row["measure"])["met"]

    assert met(scenes(lost=8, gained=0, n=768))  # -1.0 point, interval -1.7 to -0.3
    assert not met(scenes(lost=3, gained=2, n=48))  # -2.1 points, interval far below -4
    assert not met(scenes(lost=3, gained=1, n=96))  # -2.1 points: the point estimate alone misses
    assert not met(scenes(lost=16, gained=3, n=384))  # -3.4 points


def test_compared_reports_give_the_scene_change_with_its_sign_and_interval():
    def scenes(drop: float, ci: tuple[float, float]) -> dict:
        paired = {"change_ci95_points": list(ci), "lost": 1, "gained": 1, "mcnemar_p": 1.0}
        return {"scenes": {"num_images": 768, "accuracy_drop_points": drop, "paired": paired,
                           "base": {"scene_accuracy": 0.9}, "apl": {"scene_accuracy": 0.9 - drop / 100}}}  # fmt: skip

    reports = {"a": {"sections": scenes(0.0, (-1.4, 1.4))}, "b": {"sections": scenes(3.5, (-5.8, -1.2))}}
    table = compare_markdown(reports)
    row = next(line for line in table.splitlines() if line.startswith("| scenes, base model"))
    assert "| +0.0 pts [-1.4, +1.4] yes | -3.5 pts [-5.8, -1.2] **no** |" in row  # no drop is not "-0.0"


def test_compared_reports_give_the_falls_among_faces_that_keep_their_attributes():
    def person(fall: float, kept_fall: float | None) -> dict:
        apl = {"top1_accuracy": 0.9 / fall, "face_presence_rate": 1.0, "attributes": {"all_match_rate": 0.7}}
        section = {"num_images": 10, "accuracy_fall": fall, "base": {"top1_accuracy": 0.9}, "apl": apl}
        if kept_fall is not None:
            section["fall_when_attributes_kept"] = kept_fall
        return section

    split = {"seen": person(18.0, 11.3), "late": person(9.0, float("inf")), "transfer": person(4.0, None)}
    old = {"seen": person(18.0, None)}  # a report written before the split
    table = compare_markdown({"new": {"sections": split}, "old": {"sections": old}})
    row = next(line for line in table.splitlines() if line.startswith("| the same falls among faces"))
    assert row.endswith("| 11.3x / inf x (to 0) / - (seen / late / transfer) | - |"), row
