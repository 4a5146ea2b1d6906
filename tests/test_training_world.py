"""Acceptance: a short APL training run on the shipped world lowers seen-identity accuracy and keeps scenes.

As restated by issue 20: the scene half is measured on all 768 scene images of its two seeds (every scene in
every caption template), the point estimate within 2 points; the identity half asks a prefix trained inside the
test (the demo's recipe) to take seen top-1 down by >= 25 points, and the full-strength prefix shipped in the
package (``apl_adapter/world/assets/apl-prefix``) to take it down >= 5x on the same prompts and seeds.

Everything is real: training images are sampled from the world base model (the demo's data: with
the anonymous description prompts), the prefix is trained by ``apl_adapter.training.train``, and the
numbers come from the world's recognizers through the bench protocol. Nothing is tuned to the assertion: it compares
measured base vs APL numbers on the same prompts and seeds.
"""

from __future__ import annotations

import os

import pytest

from apl_adapter.world.models import model_path

# No one-thread fixture here: the <= 2 min training budget of the issue is measured with torch's default threads.

# APL_WORLD_ASSETS: a folder written by `apl-world build --out` (default: the models shipped in the package)
ASSETS = os.environ.get("APL_WORLD_ASSETS")
try:
    WORLD_BASE = model_path("base", ASSETS)
except FileNotFoundError:  # the world's weights are produced by `apl-world build` and shipped in the package
    WORLD_BASE = None

pytestmark = pytest.mark.skipif(WORLD_BASE is None, reason="world weights not built (run `apl-world build`)")


@pytest.mark.slow
def test_short_training_lowers_seen_identity_accuracy_and_keeps_scenes(tmp_path):
    from apl_adapter.bench.cache import BaseImageCache
    from apl_adapter.bench.protocol import BenchModels, BenchSpec, Person, run_protocol
    from apl_adapter.bench.world import every_scene_case, world_readers
    from apl_adapter.demo import demo_train_config, write_demo_data
    from apl_adapter.training import train
    from apl_adapter.world.models import SHIPPED_PREFIX, load_world_pipeline
    from apl_adapter.world.spec import WorldSpec

    world = WorldSpec.from_seed(0)
    # the demo's data and recipe: every seen name in template 0 (images drawn from its description), scene renders
    data = tmp_path / "data"
    write_demo_data(data, assets=ASSETS)
    result = train(demo_train_config(data, tmp_path / "run", ASSETS), show_progress=False)
    spec = BenchSpec(
        persons=[Person(p.name, dict(p.attributes), "seen") for p in world.seen],
        person_templates=[world.person_templates[0]],
        scenes=every_scene_case(world),  # 384 prompts x 2 seeds = 768 scene images
        seeds=[100, 101],
        batch_size=64,
        base_cache=BaseImageCache(tmp_path / "base-cache"),  # the shipped prefix's half reuses the base images
    )
    readers = world_readers(os.path.join(ASSETS, "recognizer") if ASSETS else None)
    models = BenchModels(base=load_world_pipeline("base", ASSETS))
    sections = run_protocol(spec, models, readers, result.adapter_dir)
    seen, scenes = sections["seen"], sections["scenes"]
    print(
        f"training {result.seconds:.0f} s; "
        f"seen top-1 {seen['base']['top1_accuracy']:.3f} -> {seen['apl']['top1_accuracy']:.3f}, "
        f"scenes {scenes['base']['scene_accuracy']:.3f} -> {scenes['apl']['scene_accuracy']:.3f} "
        f"({scenes['paired']['lost']} lost, {scenes['paired']['gained']} gained, "
        f"McNemar p = {scenes['paired']['mcnemar_p']:.2g}, 95% CI {scenes['paired']['change_ci95_points']} points)"
    )
    assert seen["base"]["top1_accuracy"] >= 0.6  # the base model draws these people
    # "measurably lowers": a quarter of the 40 images lose their name (the full demo's numbers:
    # docs/experiments/2026-12-02-world.md)
    assert seen["apl"]["top1_accuracy"] <= seen["base"]["top1_accuracy"] - 0.25
    assert seen["apl"]["face_presence_rate"] >= 0.8  # anonymous faces, not no faces
    # "keeps scene accuracy": at most 2 points lost over all 768 scene images (same prompts and seeds)
    assert scenes["num_images"] == 768
    assert scenes["apl"]["scene_accuracy"] >= scenes["base"]["scene_accuracy"] - 0.02
    # the shipped full-strength prefix, on the same 40 seen-name prompts and seeds (its base images from the cache)
    if ASSETS is None:
        assert (SHIPPED_PREFIX / "adapter_config.json").is_file(), "the package ships its full-strength prefix"
        spec.scenes = []
        shipped = run_protocol(spec, models, readers, SHIPPED_PREFIX)["seen"]
        fell = f"{shipped['base']['top1_accuracy']:.3f} -> {shipped['apl']['top1_accuracy']:.3f}"
        print(f"shipped prefix: seen top-1 {fell}")
        assert shipped["base"] == seen["base"]  # the same base images, read back from the cache
        assert shipped["accuracy_fall"] >= 5.0
