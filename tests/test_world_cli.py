"""``apl-world`` commands and the APL training data they write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from apl_adapter.errors import APLAdapterError
from apl_adapter.world import ASSETS, WorldSpec
from apl_adapter.world.cli import main
from apl_adapter.world.data import write_apl_dataset
from apl_adapter.world.spec import ATTRIBUTE_VALUES


def test_help_teaches_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "apl_adapter.world.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("build", "sample", "info", "data"):
        assert command in out


def test_info_lists_people_and_splits(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    world = WorldSpec.from_seed(0)
    assert world.late[0].name in out and "unseen (12)" in out


MISSING = "world diffusion models missing; run `make world` to create apl_adapter/world/assets/base"
needs_base = pytest.mark.skipif(not (ASSETS / "base" / "unet").is_dir(), reason=MISSING)


@needs_base
def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--prompt",
                "a photo of a red circle on a white background",
                "--num",
                "2",
                "--zoom",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (64, 32)


def test_missing_assets_fail_cleanly(tmp_path, capsys):
    assert main(["--assets", str(tmp_path), "sample", "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    assert "apl-world build" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@needs_base
def test_data_writes_the_training_format(tmp_path):
    out = tmp_path / "data"
    n = write_apl_dataset(out, images_per_person=1, num_scenes=3, split="unseen", templates=[0, 1])
    world = WorldSpec.from_seed(0)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert n == len(rows) == len(world.unseen) + 3
    identity = [r for r in rows if r["kind"] == "identity"]
    assert {r["identity"] for r in identity} == {p.name for p in world.unseen}
    for r in identity:
        person = world.identity(r["identity"])
        assert r["c1"] in {world.identity_prompt(person.name, k) for k in (0, 1)}
        assert r["c2"] in {world.attribute_prompt(person.name, k) for k in (0, 1)}
        assert Image.open(out / r["file_name"]).size == (32, 32)
        # c2 with one attribute changed at a time, to each other value, in c2's own template (--attribute-hold)
        template = [world.attribute_prompt(person.name, k) for k in (0, 1)].index(r["c2"])
        for key, values in ATTRIBUTE_VALUES.items():
            expected = [world.attribute_prompt({**person.attributes, key: v}, template) for v in values]
            assert r["c2_contrasts"][key] == [text for text in expected if text != r["c2"]]
    scenes = [r for r in rows if r["kind"] == "preservation"]
    assert len(scenes) == 3 and all(r["c1"] == r["c2"] for r in scenes)

    # captions come from every scene template unless told otherwise (``templates`` restricts only the names)
    def caption_templates(folder):
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        by_caption = {scene.caption(k): k for scene in world.scenes for k in range(len(world.scene_templates))}
        return {by_caption[r["c1"]] for r in rows}

    write_apl_dataset(tmp_path / "all", images_per_person=0, num_scenes=40, templates=[0])
    assert caption_templates(tmp_path / "all") == set(range(len(world.scene_templates)))
    write_apl_dataset(tmp_path / "one", images_per_person=0, num_scenes=40, scene_templates=[2])
    assert caption_templates(tmp_path / "one") == {2}
    with pytest.raises(APLAdapterError, match="not empty; choose a new folder or pass --overwrite"):
        write_apl_dataset(out, images_per_person=1, num_scenes=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    # --overwrite replaces the folder whole: the old rows and images are gone
    assert write_apl_dataset(out, images_per_person=0, num_scenes=2, overwrite=True) == 2
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2 and len(list((out / "images").iterdir())) == 2


@needs_base
def test_data_can_draw_identity_images_from_the_attribute_prompt(tmp_path):
    import numpy as np

    from apl_adapter.world.evaluate import sample_images
    from apl_adapter.world.models import load_world_pipeline

    world = WorldSpec.from_seed(0)
    code = main(["data", "--out", str(tmp_path / "d"), "--split", "late", "--images-per-person", "1", "--scenes", "0",
                 "--templates", "0", "--images-from", "description"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines()]
    assert [r["c1"] for r in rows] == [world.identity_prompt(p.name, 0) for p in world.late]  # c1 stays the name
    expected = sample_images(load_world_pipeline("base"), [r["c2"] for r in rows], seed=0)
    for row, image in zip(rows, expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / row["file_name"])), np.asarray(image))
