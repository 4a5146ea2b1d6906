"""One object per exported model: the list the exporter loops over, and each model's feeds, profile and tolerance.

The end-to-end checks of every exported graph against PyTorch are in test_export_pipeline / test_export_fast."""

from __future__ import annotations

import numpy as np
import pytest
from apl_export.exported_models import FastTextEncoder, TextEncoder, pipeline_models
from apl_export.exporter import load_pipeline
from apl_export.specs import ShapeRange, ShapeRanges

from .export_helpers import save_tiny_sources

RANGES = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 32), width=ShapeRange(16, 16, 16))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    sources = save_tiny_sources(tmp_path_factory.mktemp("models-sources"))
    return load_pipeline(sources / "sd", sources / "adapter")


def test_pipeline_models_in_manifest_order_with_their_tolerances(loaded):
    models = pipeline_models(loaded, RANGES, "standard", baked=True)
    assert [(m.name, m.atol(False), m.atol(True)) for m in models] == [
        ("text_encoder", 1e-4, 2e-2),
        ("negative_text_encoder", 1e-4, 2e-2),
        ("unet", 1e-3, 2e-2),
        ("vae_decoder", 3e-4, 2e-2),
    ]
    assert type(models[0]) is TextEncoder
    fast = pipeline_models(loaded, RANGES, "fast", baked=True)[0]
    assert type(fast) is FastTextEncoder and fast.atol(False) == 1e-5
    assert fast.onnx_exporter("torchscript") == "dynamo" and fast.translation_table()


@pytest.mark.parametrize("baked", [True, False])
def test_each_models_feeds_fit_its_spec_and_profile(loaded, baked):
    for model in pipeline_models(loaded, RANGES, "standard", baked=baked):
        profile = model.spec.profile()
        assert list(profile) == model.spec.input_names
        feeds = model.feeds()
        assert len(feeds) >= 2, model.name
        for feed in feeds:
            assert list(feed) == model.spec.input_names, model.name
            for name, (lo, _, hi) in profile.items():
                shape = feed[name].shape
                assert all(a <= s <= b for a, s, b in zip(lo, shape, hi)), (model.name, name, shape, lo, hi)
                assert feed[name].dtype == next(t.dtype for t in model.spec.inputs if t.name == name)
    text = pipeline_models(loaded, RANGES, "standard", baked=baked)[0]
    assert ("prefix" in text.spec.input_names) is not baked
    # The UNet sees twice the prompt batch; the VAE decoder's profile spans the image sides' range.
    unet, vae = pipeline_models(loaded, RANGES, "standard", baked=baked)[-2:]
    assert [s[0] for s in unet.spec.profile()["sample"]] == [2, 2, 4]
    factor = loaded.vae_factor
    assert [s[2] for s in vae.spec.profile()["latent_sample"]] == [16 // factor, 16 // factor, 32 // factor]
    assert np.all(np.isfinite(unet.feeds()[0]["encoder_hidden_states"]))
