"""The bench protocol end to end on tiny real pipelines and the world's recognizer network (random weights).

This checks the plumbing - same seeds give the same images, the prefix reaches only the positive
prompt of the right model, every section and report file is produced - not the world's numbers
(those are measured by tests/test_training_world.py on the shipped world).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.bench.protocol import (
    BenchModels,
    BenchReaders,
    BenchSpec,
    Person,
    SceneCase,
    generate,
    image_seed,
)
from apl_adapter.bench.runner import run_bench
from apl_adapter.bench.world import _AttributeReader, _SceneReader
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline
from apl_adapter.world.recognizers import (
    WorldAttributeRecognizer,
    WorldIdentityRecognizer,
    WorldRecognizerNet,
    WorldSceneRecognizer,
)
from apl_adapter.world.spec import WorldSpec

from .test_training_loop import _one_thread  # noqa: F401 - autouse: one torch thread on the shared CPU


def random_world_readers(world: WorldSpec, seed: int = 0) -> BenchReaders:
    """The bench's three readers on one world recognizer network with random weights (plumbing, not numbers)."""
    torch.manual_seed(seed)
    net = WorldRecognizerNet(len(world.names))
    return BenchReaders(
        identity=WorldIdentityRecognizer(net, world.names),
        attributes=_AttributeReader(WorldAttributeRecognizer(net, world.names)),
        scenes=_SceneReader(WorldSceneRecognizer(net, world.names)),
    )


def test_protocol_end_to_end_on_tiny_models(tmp_path):
    world = WorldSpec.from_seed(0)
    readers = random_world_readers(world)
    persons = [Person(i.name, dict(i.attributes), i.split) for i in (world.seen[0], world.unseen[0], world.late[0])]
    spec = BenchSpec(
        persons=persons,
        person_templates=["a photo of {}", "a headshot of {}"],
        scenes=[SceneCase("a red star on a white background", "red star on white")],
        seeds=[0, 1],
        num_inference_steps=3,
        batch_size=4,
    )
    adapter = save_adapter(get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4)), tmp_path / "ad")
    models = BenchModels(
        base=tiny_sd_pipeline(seed=0), sibling=tiny_sd_pipeline(seed=1), dreambooth=tiny_sd_pipeline(seed=2)
    )
    for pipe in (models.base, models.sibling, models.dreambooth):
        pipe.set_progress_bar_config(disable=True)
    report = run_bench(spec, models, readers, adapter, tmp_path / "out")

    sections = report["sections"]
    assert set(sections) == {"seen", "unseen", "late", "transfer", "scenes", "scenes_sibling"}
    assert sections["seen"]["num_images"] == 4 and sections["transfer"]["num_images"] == 8
    assert report["num_images"] == 2 * (4 + 4 + 4 + 8 + 2 + 2)
    for name in ("seen", "late", "transfer", "scenes"):
        assert sections[name]["same_seed_pixel_change"] > 0  # a random prefix changes person and scene images
    assert len(report["goals"]) == 8  # 4 falls, faces, attributes, scenes on base and sibling
    assert set(sections["seen"]["apl"]["per_template"]) == {"a photo of {}", "a headshot of {}"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["num_images"] == report["num_images"]
    assert "| measure | measured | goal | met |" in (tmp_path / "out" / "report.md").read_text()
    # the pipeline is back to its plain state afterwards, and a seed fixes the image
    again = generate(models.base, ["a photo of " + persons[0].name], [0], spec, "check")
    first = generate(models.base, ["a photo of " + persons[0].name], [0], spec, "check")
    assert np.array_equal(np.asarray(again[0]), np.asarray(first[0]))
    assert not hasattr(models.base, "_apl_state") or models.base._apl_state is None


def test_each_prompt_of_a_bench_seed_draws_its_own_noise():
    """All scene prompts of a seed from one noise made a seed's scene accuracy swing 82-98% and its pairs dependent;
    now the seed and the prompt pick the noise: the same pair gives the same seed, any other pair another."""
    prompts = [f"a {colour} star on a white background" for colour in ("red", "blue", "green")]
    seeds = [image_seed(seed, prompt) for seed in (0, 1) for prompt in prompts]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [image_seed(seed, prompt) for seed in (0, 1) for prompt in prompts]  # deterministic
    assert all(0 <= seed < 2**63 for seed in seeds)  # what torch.Generator.manual_seed accepts
    torch.Generator().manual_seed(max(seeds))


def test_a_base_cache_shares_the_images_without_the_prefix_between_prefixes(tmp_path):
    """A second prefix on the same seeds reads the base half from the cache: the same base numbers, no base image
    generated again; another model (weights) misses the cache."""
    from apl_adapter.bench.cache import BaseImageCache, model_fingerprint

    world = WorldSpec.from_seed(0)
    readers = random_world_readers(world)
    person = world.seen[0]
    cache = BaseImageCache(tmp_path / "cache")
    spec = BenchSpec(
        persons=[Person(person.name, dict(person.attributes), person.split)],
        person_templates=["a photo of {}"],
        scenes=[SceneCase("a red star on a white background", "red star on white")],
        seeds=[0, 1],
        num_inference_steps=2,
        batch_size=4,
        base_cache=cache,
    )
    base = tiny_sd_pipeline(seed=0)
    base.set_progress_bar_config(disable=True)
    reports = []
    for init_seed in (0, 1):
        config = APLConfig(num_virtual_tokens=4, init_seed=init_seed)
        adapter = save_adapter(get_peft_model(tiny_clip_text_model(), config), tmp_path / f"ad{init_seed}")
        reports.append(run_bench(spec, BenchModels(base=base), readers, adapter, tmp_path / f"out{init_seed}"))
    first, second = (report["sections"] for report in reports)
    assert reports[0]["base_cache"]["misses"] == 4 and reports[0]["base_cache"]["hits"] == 0
    assert reports[1]["base_cache"]["hits"] == 4 and reports[1]["base_cache"]["misses"] == 4  # 2nd run: no new misses
    assert first["seen"]["base"] == second["seen"]["base"] and first["scenes"]["base"] == second["scenes"]["base"]
    assert first["seen"]["apl"]["mean_identity_score"] != second["seen"]["apl"]["mean_identity_score"]
    noise = image_seed(1, spec.scenes[0].prompt)  # bench seed 1's noise for this prompt
    fresh = generate(base, [spec.scenes[0].prompt], [noise], spec, "check")[0]
    key = cache.key(model_fingerprint(base), spec.scenes[0].prompt, noise, 2, 7.0)
    assert np.array_equal(np.asarray(cache.get(key)), np.asarray(fresh))  # lossless: the cached image is the image
    other = tiny_sd_pipeline(seed=1)
    other.set_progress_bar_config(disable=True)
    before = cache.misses
    run_bench(spec, BenchModels(base=other), readers, tmp_path / "ad0", tmp_path / "out-other")
    assert cache.misses - before == 4  # other weights: nothing read from the first model's images
