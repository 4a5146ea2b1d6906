"""experiments/step_bands.py: the prefix applied at some sampler steps only, through diffusers' own step callback.

The two ends must be the pipelines they claim to be - no band is the base pipeline, every step is
the pipeline with the prefix applied - and a band in between must differ from both; the measured
rows must pair each band against no prefix. Tiny real pipelines, the world's recognizer network
with random weights (the plumbing, not the world's numbers: those are in docs/experiments/2026-12-02-world.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.bench.protocol import BenchSpec, Person, SceneCase, generate, generate_pair
from apl_adapter.errors import APLAdapterError
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline
from apl_adapter.world.spec import WorldSpec
from experiments.step_bands import (
    encode_contexts,
    generate_with_prefix_steps,
    main,
    measure_step_bands,
    parse_bands,
    to_markdown,
)

from .test_bench_protocol import random_world_readers
from .test_training_loop import _one_thread  # noqa: F401 - autouse: one torch thread on the shared CPU

STEPS = 4


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@pytest.fixture
def setup(tmp_path):
    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    encoder = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4))
    adapter = save_adapter(encoder, tmp_path / "adapter")
    spec = BenchSpec(persons=[], person_templates=["a photo of {}"], scenes=[], seeds=[0, 1], num_inference_steps=STEPS)
    return pipe, adapter, spec


def test_no_band_is_the_base_pipeline_and_every_step_is_the_prefixed_one(setup):
    pipe, adapter, spec = setup
    prompts, seeds = ["a red star on a white background", "a photo of Ann Lee"], [0, 1]
    plain_images, apl_images = generate_pair(pipe, adapter, prompts, seeds, spec, "reference")
    contexts = encode_contexts(pipe, adapter, prompts)

    def banded(steps: set[int]) -> np.ndarray:
        return _pixels(generate_with_prefix_steps(pipe, *contexts, seeds, steps, num_inference_steps=STEPS))

    none, every, late = banded(set()), banded(set(range(STEPS))), banded({2, 3})
    # uint8 images: the cached-prefix encoder agrees with the full one within 1e-5, so at most one level apart
    assert np.abs(none - _pixels(plain_images)).max() <= 1
    assert np.abs(every - _pixels(apl_images)).max() <= 1
    assert np.abs(_pixels(plain_images) - _pixels(apl_images)).max() > 8  # the random prefix changes the images
    assert np.abs(late - none).max() > 1 and np.abs(late - every).max() > 1  # a band is neither end
    assert np.array_equal(_pixels(generate(pipe, prompts[:1], [0], spec, "again")), none[:1])  # pipeline restored


def test_rows_pair_each_band_against_no_prefix(setup):
    pipe, adapter, spec = setup
    world = WorldSpec.from_seed(0)
    readers = random_world_readers(world)
    person = world.seen[0]
    spec.persons = [Person(person.name, dict(person.attributes), "seen")]
    scene = world.scenes[0]
    # the label is what the random recognizer reads off the base image, so the base row is all right
    spec.seeds = [0]
    label = readers.scenes.read_scenes(generate(pipe, [scene.caption(0)], [0], spec, "label"))[0]
    spec.scenes = [SceneCase(scene.caption(0), label)]

    rows = measure_step_bands(pipe, adapter, spec, readers, bands=[(0, STEPS), (2, STEPS)])
    assert [row["band"] for row in rows] == ["none", f"0-{STEPS}", f"2-{STEPS}"]
    assert rows[0]["scene_accuracy"] == 1.0 and rows[0]["scenes_lost"] == 0
    for row in rows[1:]:  # a band can only lose what the base image had right, and says so in its counts
        assert row["scenes_gained"] == 0
        assert row["scene_accuracy"] == 1.0 - row["scenes_lost"]
    table = to_markdown(rows, timesteps=[999, 749, 499, 249])
    assert f"| 2-{STEPS} | 499-249 |" in table and table.count("\n") == 4
    with pytest.raises(APLAdapterError, match="outside the sampler's 4 steps"):
        measure_step_bands(pipe, adapter, spec, readers, bands=[(3, 9)])


def test_bands_option_errors_name_the_fix(capsys):
    assert parse_bands("0:5,10:20") == [(0, 5), (10, 20)]
    with pytest.raises(APLAdapterError, match="FIRST:END"):
        parse_bands("0-5")
    with pytest.raises(APLAdapterError, match="FIRST:END"):
        parse_bands("5")
    assert main(["--adapter", "/nonexistent", "--bands", "5"]) == 2
    assert "FIRST:END" in capsys.readouterr().err
    assert main(["--adapter", "/nonexistent"]) == 2
    assert "No APL adapter at /nonexistent" in capsys.readouterr().err
