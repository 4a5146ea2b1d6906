"""The diffusers integration on real pipelines saved to and loaded from local folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import get_peft_model
from PIL import Image

from apl_adapter import APLAdapterError, APLConfig
from apl_adapter.pipelines import apl_cached_encoders, apl_models, apply_apl, remove_apl, with_and_without_apl
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of Ann Lee"
STEPS = dict(num_inference_steps=3, output_type="np")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=5)).save_pretrained(folder)
    return folder


@pytest.fixture
def sd(sd_folder):
    return StableDiffusionPipeline.from_pretrained(sd_folder).to("cpu")


def _plain_encode(pipe, prompt, n=1):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", n, True, negative_prompt="blurry")


def test_prefix_goes_to_the_positive_prompt_only(sd, adapter_folder):
    plain_pos, plain_neg = _plain_encode(sd, PROMPT, n=2)
    apply_apl(sd, adapter_folder)
    pos, neg = _plain_encode(sd, PROMPT, n=2)
    assert pos.shape == plain_pos.shape == (2, 77, 32)
    assert torch.equal(neg, plain_neg), "the negative prompt must be encoded without the prefix"
    assert not torch.allclose(pos, plain_pos)
    # The positive embedding equals the adapter's own PeftModel output.
    model = apl_models(sd)["text_encoder"]
    ids = sd.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model(input_ids=ids).last_hidden_state
    # Default path: the cached prefix encoder (fused kernel), equal to the full encoder within 1e-5.
    torch.testing.assert_close(pos[0:1], direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[1:2], direct, atol=1e-5, rtol=0)


def test_cached_encoder_is_the_default_and_can_be_turned_off(sd, adapter_folder):
    config_before = dict(sd.config)
    original_encoder = sd.text_encoder
    apply_apl(sd, adapter_folder)
    (cached,) = apl_cached_encoders(sd).values()
    calls = []
    hook = cached.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        fast, _ = sd.encode_prompt(PROMPT, "cpu", 1, True)
    hook.remove()
    assert calls == [1], "the positive prompt goes through the cached encoder once"
    assert sd.text_encoder is original_encoder and dict(sd.config) == config_before
    remove_apl(sd)
    apply_apl(sd, adapter_folder, use_prefix_cache=False)
    assert apl_cached_encoders(sd) == {}
    with torch.no_grad():
        full, _ = sd.encode_prompt(PROMPT, "cpu", 1, True)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    ids = sd.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = apl_models(sd)["text_encoder"](input_ids=ids).last_hidden_state
    torch.testing.assert_close(full, direct, atol=0, rtol=0)


def test_default_cache_follows_the_device_and_true_forces_it(sd, adapter_folder, monkeypatch):
    """Default: the cache only where it pays off (the CPU), judged at encode time; True: wherever the encoder is."""
    import apl_adapter.pipelines as pipelines

    def cached_calls(**apply_kwargs):
        apply_apl(sd, adapter_folder, **apply_kwargs)
        calls = []
        (cached,) = apl_cached_encoders(sd).values()
        hook = cached.register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            embeds, _ = sd.encode_prompt(PROMPT, "cpu", 1, True)
        hook.remove()
        remove_apl(sd)
        return len(calls), embeds

    on_cpu, cpu_embeds = cached_calls()
    monkeypatch.setattr(pipelines, "prefix_cache_pays_off", lambda device: False)  # as on a GPU
    elsewhere, full_embeds = cached_calls()
    forced, forced_embeds = cached_calls(use_prefix_cache=True)
    assert (on_cpu, elsewhere, forced) == (1, 0, 1)
    torch.testing.assert_close(full_embeds, cpu_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(forced_embeds, cpu_embeds, atol=0, rtol=0)


def test_the_cache_pays_off_on_the_cpu_only():
    from apl_adapter.pipelines import prefix_cache_pays_off

    assert prefix_cache_pays_off(torch.device("cpu"))
    assert not prefix_cache_pays_off(torch.device("cuda", 0))


def test_images_change_with_apl_and_come_back_after_removal(sd, adapter_folder):
    before = sd(PROMPT, generator=_gen(), **STEPS).images
    apply_apl(sd, adapter_folder)
    with_apl = sd(PROMPT, generator=_gen(), num_images_per_prompt=2, **STEPS).images
    assert with_apl.shape == (2, 16, 16, 3)
    assert np.abs(with_apl[:1] - before).max() > 1e-3
    remove_apl(sd)
    after = sd(PROMPT, generator=_gen(), **STEPS).images
    np.testing.assert_array_equal(after, before)
    assert "encode_prompt" not in sd.__dict__


def test_with_and_without_apl_draws_the_plain_pipeline_then_the_prefixed_one(sd, adapter_folder):
    """The pairs of apl-bench, apl-eval and the demo: the plain half is exactly what the pipeline draws alone."""
    prompts, seeds = [PROMPT, "a red cube on a table"], [0, 1]
    calls = []

    def draw(prefixed: bool) -> np.ndarray:
        calls.append(prefixed)
        return sd(prompts, generator=[_gen(s) for s in seeds], **STEPS).images

    alone = draw(False)  # the plain pipeline, before any prefix was ever applied
    plain, prefixed = with_and_without_apl(sd, adapter_folder, draw)
    assert calls == [False, False, True]
    np.testing.assert_array_equal(plain, alone)
    apply_apl(sd, adapter_folder)
    np.testing.assert_array_equal(prefixed, draw(True))
    remove_apl(sd)
    assert np.abs(prefixed - plain).max() > 1e-3  # the prefix was on for the second draw
    np.testing.assert_array_equal(draw(False), alone)  # and is off again

    def failing(prefixed: bool) -> None:
        if prefixed:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        with_and_without_apl(sd, adapter_folder, failing)
    assert "encode_prompt" not in sd.__dict__  # removed even so: the next pair can apply it again
    np.testing.assert_array_equal(with_and_without_apl(sd, adapter_folder, draw)[0], alone)


def test_prompt_embeds_passthrough_is_untouched(sd, adapter_folder):
    embeds = torch.randn(1, 77, 32, generator=_gen(3))
    before = sd(prompt_embeds=embeds, generator=_gen(), **STEPS).images
    apply_apl(sd, adapter_folder)
    after = sd(prompt_embeds=embeds, generator=_gen(), **STEPS).images
    np.testing.assert_array_equal(after, before)


def test_negative_prompt_option_prefixes_both(sd, adapter_folder):
    _, plain_neg = _plain_encode(sd, PROMPT)
    apply_apl(sd, adapter_folder, apply_to_negative_prompt=True)
    _, neg = _plain_encode(sd, PROMPT)
    assert not torch.allclose(neg, plain_neg)


def test_peft_model_from_training_applies_in_place(sd):
    model = get_peft_model(sd.text_encoder, APLConfig(init_seed=9))
    apply_apl(sd, model)
    assert apl_models(sd)["text_encoder"] is model
    image = sd(PROMPT, generator=_gen(), **STEPS).images
    assert np.isfinite(image).all()


def test_img2img_pipeline(sd_folder, adapter_folder):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    init = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    before = pipe(PROMPT, image=init, strength=0.8, generator=_gen(), **STEPS).images
    apply_apl(pipe, adapter_folder)
    after = pipe(PROMPT, image=init, strength=0.8, generator=_gen(), **STEPS).images
    assert after.shape == before.shape and np.abs(after - before).max() > 1e-3


def test_sdxl_pipeline_with_both_encoders(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    kwargs = dict(height=16, width=16, num_inference_steps=2, output_type="np")
    before = pipe(PROMPT, generator=_gen(), **kwargs).images
    with torch.no_grad():
        plain = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    first = get_peft_model(pipe.text_encoder, APLConfig())
    second = get_peft_model(pipe.text_encoder_2, APLConfig())
    second.save_pretrained(tmp_path / "adapter_2")
    second.unload()
    apply_apl(pipe, first, tmp_path / "adapter_2")
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert pos.shape == plain[0].shape == (1, 77, 32 + 48)
    assert not torch.allclose(pos, plain[0]) and not torch.allclose(pooled, plain[2])
    assert torch.equal(neg, plain[1]) and torch.equal(neg_pooled, plain[3])
    with_apl = pipe(PROMPT, generator=_gen(), **kwargs).images
    assert np.abs(with_apl - before).max() > 1e-3
    remove_apl(pipe)
    np.testing.assert_array_equal(pipe(PROMPT, generator=_gen(), **kwargs).images, before)


def test_applying_twice_or_removing_nothing_is_an_error(sd, adapter_folder):
    with pytest.raises(APLAdapterError, match="no APL prefix"):
        remove_apl(sd)
    apply_apl(sd, adapter_folder)
    with pytest.raises(APLAdapterError, match="already has an APL prefix"):
        apply_apl(sd, adapter_folder)


def test_width_mismatch_through_the_pipeline(sd, tmp_path):
    get_peft_model(tiny_clip_text_model(hidden_size=64), APLConfig()).save_pretrained(tmp_path / "wide")
    with pytest.raises(APLAdapterError, match=r"width 64.*width 32"):
        apply_apl(sd, tmp_path / "wide")


def test_a_failed_apply_leaves_the_pipeline_as_it_was(tmp_path):
    """SDXL: the first encoder takes its prefix, the second one's is too narrow; neither keeps anything."""
    from peft import LoraConfig

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "sdxl")
    plain = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    get_peft_model(tiny_clip_text_model(), APLConfig()).save_pretrained(tmp_path / "narrow")
    with pytest.raises(APLAdapterError, match=r"width 32.*width 48"):
        apply_apl(pipe, tmp_path / "narrow", tmp_path / "narrow")
    lora = get_peft_model(tiny_clip_text_model(), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(APLAdapterError, match="'LORA' adapter"):
        apply_apl(pipe, tmp_path / "lora")
    for name in ("text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, name), getattr(plain, name)
        assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]
        ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
        torch.testing.assert_close(got(ids)[0], want(ids)[0], rtol=0, atol=0)
    kwargs = dict(height=16, width=16, num_inference_steps=2, output_type="np")
    np.testing.assert_array_equal(
        pipe(PROMPT, generator=_gen(), **kwargs).images, plain(PROMPT, generator=_gen(), **kwargs).images
    )
    apply_apl(pipe, tmp_path / "narrow")  # and the pipeline still takes a good prefix
    remove_apl(pipe)


def test_load_apl_and_unload_apl_mirror_the_lora_loaders(sd, adapter_folder, tmp_path):
    """diffusers-style loading: a folder (or a subfolder of one), and unload gives the untouched pipeline."""
    from apl_adapter.pipelines import load_apl, unload_apl

    before = sd(PROMPT, generator=_gen(), **STEPS).images
    import shutil

    shutil.copytree(adapter_folder, tmp_path / "repo" / "apl")
    load_apl(sd, tmp_path / "repo", subfolder="apl")
    assert np.abs(sd(PROMPT, generator=_gen(), **STEPS).images - before).max() > 1e-3
    unload_apl(sd)
    np.testing.assert_array_equal(sd(PROMPT, generator=_gen(), **STEPS).images, before)


def test_a_hub_id_offline_is_a_clear_error_without_network(tmp_path):
    """A Hub id is accepted where a folder is; with HF_HUB_OFFLINE=1 and nothing cached it says what to do, at
    once, and opens no socket."""
    import os
    import subprocess
    import sys

    script = """
import os, sys
sys.addaudithook(lambda event, args: os._exit(3) if event == "socket.connect" else None)
from apl_adapter import APLAdapterError
from apl_adapter.pipelines import load_apl
from apl_adapter.testing import tiny_sd_pipeline
try:
    load_apl(tiny_sd_pipeline(), "some-org/apl-prefix")
except APLAdapterError as err:
    print(err)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert "some-org/apl-prefix is not a local folder" in done.stdout
    assert "huggingface-cli download some-org/apl-prefix" in done.stdout
