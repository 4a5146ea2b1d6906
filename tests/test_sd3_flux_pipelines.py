"""APL on Stable Diffusion 3 and FLUX.1 pipelines: tiny random real pipelines, real tokenizers built offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from apl_adapter import APLAdapterError, APLConfig
from apl_adapter.pipelines import apl_disabled, apl_models, apply_apl, load_apl, remove_apl, unload_apl
from apl_adapter.testing import tiny_clip_text_model, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_encoder
from apl_adapter.training.base_model import base_family, check_base_folder
from apl_adapter.tuners.apl.model import has_apl_layers, prefix_parameters
from apl_adapter.tuners.apl.prefix import clip_text_model_of
from tests.reference import reference_encode, reference_t5_encode

PROMPT = "a photo of Ann Lee"
NEGATIVE = "blurry"
WINDOW = 32  # max_sequence_length: a short T5 window keeps the tiny runs fast; the layout is the same at 256 / 512
RUN = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=WINDOW, output_type="np")
M = 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One folder per encoder, as a pipeline lays out its components (text_encoder/, text_encoder_2/ ...)."""
    root = tmp_path_factory.mktemp("adapters")
    sd3, flux = root / "sd3", root / "flux"
    clip = dict(with_projection=True, projection_dim=32)
    get_peft_model(tiny_clip_text_model(**clip), APLConfig(num_virtual_tokens=M, init_seed=1)).save_pretrained(
        sd3 / "text_encoder"
    )
    get_peft_model(tiny_clip_text_model(**clip), APLConfig(num_virtual_tokens=M, init_seed=2)).save_pretrained(
        sd3 / "text_encoder_2"
    )
    get_peft_model(tiny_t5_encoder(d_model=64), APLConfig(num_virtual_tokens=M, init_seed=3)).save_pretrained(
        sd3 / "text_encoder_3"
    )
    get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=M, init_seed=4)).save_pretrained(
        flux / "text_encoder"
    )
    get_peft_model(tiny_t5_encoder(d_model=48), APLConfig(num_virtual_tokens=M, init_seed=5)).save_pretrained(
        flux / "text_encoder_2"
    )
    return {"sd3": sd3, "flux": flux}


def _prefix(pipe, attr: str) -> torch.Tensor:
    return prefix_parameters(apl_models(pipe)[attr])["apl_prefix"].detach()


def _sd3_encode(pipe, n: int = 2):
    with torch.no_grad():
        return pipe.encode_prompt(
            PROMPT, None, None, "cpu", n, True, negative_prompt=NEGATIVE, max_sequence_length=WINDOW
        )


def _clip_ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _t5_ids(tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=WINDOW, truncation=True, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------------------------
# SD3
# ----------------------------------------------------------------------------------------------------------------


def test_sd3_prefixes_each_encoder_as_the_reference_and_not_the_negative(adapters):
    plain, pipe = tiny_sd3_pipeline(), tiny_sd3_pipeline()  # same seeds: plain is the reference's weights
    before = _sd3_encode(pipe)
    apply_apl(pipe, adapters["sd3"])  # the folder holds one adapter per encoder
    assert sorted(apl_models(pipe)) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    embeds, negative, pooled, negative_pooled = _sd3_encode(pipe)
    assert torch.equal(negative, before[1]) and torch.equal(negative_pooled, before[3]), "negative un-prefixed"

    # The hand-built reference: SD3 reads CLIP's penultimate layer and projected pooled output, and T5's last state.
    states, pools = [], []
    for attr, tokenizer in (("text_encoder", plain.tokenizer), ("text_encoder_2", plain.tokenizer_2)):
        encoder = getattr(plain, attr)
        _, pooled_ref, hidden = reference_encode(clip_text_model_of(encoder), _clip_ids(tokenizer), _prefix(pipe, attr))
        states.append(hidden[-2])
        with torch.no_grad():
            pools.append(encoder.text_projection(pooled_ref))
    t5 = reference_t5_encode(plain.text_encoder_3, _t5_ids(plain.tokenizer_3), _prefix(pipe, "text_encoder_3"))
    clip = F.pad(torch.cat(states, dim=-1), (0, t5.shape[-1] - 64))
    expected = torch.cat([clip, t5], dim=-2).repeat(2, 1, 1)  # num_images_per_prompt=2
    assert embeds.shape == before[0].shape == (2, 77 + WINDOW, 64)
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, torch.cat(pools, dim=-1).repeat(2, 1), atol=1e-5, rtol=0)


def test_sd3_runs_end_to_end_and_unload_restores_it_bit_for_bit(adapters):
    pipe = tiny_sd3_pipeline()
    before = pipe(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), **RUN).images
    encoded = _sd3_encode(pipe)
    load_apl(pipe, adapters["sd3"] / "text_encoder", adapter_3=adapters["sd3"] / "text_encoder_3")
    with_apl = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, generator=_gen(), **RUN).images
    assert with_apl.shape == (2, 16, 16, 3) and np.isfinite(with_apl).all()
    assert np.abs(with_apl[:1] - before).max() > 1e-3
    unload_apl(pipe)
    np.testing.assert_array_equal(pipe(PROMPT, negative_prompt=NEGATIVE, generator=_gen(), **RUN).images, before)
    assert all(torch.equal(a, b) for a, b in zip(_sd3_encode(pipe), encoded))
    assert "encode_prompt" not in pipe.__dict__
    assert not any(has_apl_layers(getattr(pipe, a)) for a in ("text_encoder", "text_encoder_2", "text_encoder_3"))


def test_sd3_t5_prefix_alone_leaves_the_clip_part(adapters):
    pipe = tiny_sd3_pipeline()
    before = _sd3_encode(pipe, n=1)
    apply_apl(pipe, {"text_encoder_3": adapters["sd3"] / "text_encoder_3"})
    after = _sd3_encode(pipe, n=1)
    assert torch.equal(after[0][:, :77], before[0][:, :77]), "CLIP rows of the joint sequence untouched"
    assert torch.equal(after[2], before[2]), "pooled output comes from CLIP only"
    assert (after[0][:, 77:] - before[0][:, 77:]).abs().max() > 1e-2


def test_sd3_bad_inputs_fail_with_the_fix_and_leave_the_pipeline(adapters):
    pipe = tiny_sd3_pipeline()
    with pytest.raises(APLAdapterError, match=r"text_encoder_2: .*prefix for a T5 text encoder.*text_encoder_3 is T5"):
        apply_apl(pipe, None, adapter_2=adapters["sd3"] / "text_encoder_3")
    assert not has_apl_layers(pipe.text_encoder_2) and "encode_prompt" not in pipe.__dict__
    with pytest.raises(APLAdapterError, match=r"Unknown encoder name.*text_encoder_3"):
        apply_apl(pipe, {"t5": adapters["sd3"] / "text_encoder_3"})
    with pytest.raises(APLAdapterError, match="No adapter given"):
        apply_apl(pipe)
    apply_apl(pipe, adapter_3=adapters["sd3"] / "text_encoder_3")
    with pytest.raises(APLAdapterError, match=r"no room in a 4-token window.*max_sequence_length"):
        pipe.encode_prompt(PROMPT, None, None, "cpu", 1, False, max_sequence_length=M)
    remove_apl(pipe)


# ----------------------------------------------------------------------------------------------------------------
# FLUX
# ----------------------------------------------------------------------------------------------------------------


def test_flux_prefixes_its_only_branch_as_the_reference(adapters):
    plain, pipe = tiny_flux_pipeline(), tiny_flux_pipeline()
    with torch.no_grad():
        before = pipe.encode_prompt(PROMPT, None, max_sequence_length=WINDOW)
    apply_apl(pipe, adapters["flux"])
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, num_images_per_prompt=2, max_sequence_length=WINDOW)
    _, pooled_ref, _ = reference_encode(plain.text_encoder, _clip_ids(plain.tokenizer), _prefix(pipe, "text_encoder"))
    t5 = reference_t5_encode(plain.text_encoder_2, _t5_ids(plain.tokenizer_2), _prefix(pipe, "text_encoder_2"))
    assert embeds.shape == (2, WINDOW, 48) and text_ids.shape == (WINDOW, 3), "the T5 window keeps its length"
    torch.testing.assert_close(embeds, t5.repeat(2, 1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, pooled_ref.repeat(2, 1), atol=1e-5, rtol=0)
    assert (embeds[:1] - before[0]).abs().max() > 1e-2


def test_flux_runs_end_to_end_and_unload_restores_it_bit_for_bit(adapters):
    pipe = tiny_flux_pipeline()
    before = pipe(PROMPT, generator=_gen(), **RUN).images
    apply_apl(pipe, adapters["flux"] / "text_encoder", adapters["flux"] / "text_encoder_2")
    with_apl = pipe(PROMPT, generator=_gen(), **RUN).images
    assert with_apl.shape == (1, 16, 16, 3) and np.abs(with_apl - before).max() > 1e-3
    remove_apl(pipe)
    np.testing.assert_array_equal(pipe(PROMPT, generator=_gen(), **RUN).images, before)
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__


def test_flux_true_cfg_negative_prompt_is_refused_with_the_way_around(adapters):
    plain, pipe = tiny_flux_pipeline(), tiny_flux_pipeline()
    apply_apl(pipe, adapters["flux"])
    with pytest.raises(APLAdapterError, match=r"negative_prompt.*would be prefixed too.*apl_disabled"):
        pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.0, generator=_gen(), **RUN)
    with torch.no_grad(), apl_disabled(pipe):  # the way the message gives
        negative, negative_pooled, _ = pipe.encode_prompt(NEGATIVE, None, max_sequence_length=WINDOW)
    with torch.no_grad():
        expected = plain.encode_prompt(NEGATIVE, None, max_sequence_length=WINDOW)
    assert torch.equal(negative, expected[0]) and torch.equal(negative_pooled, expected[1])
    images = pipe(
        PROMPT,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        true_cfg_scale=2.0,
        generator=_gen(),
        **RUN,
    ).images
    assert np.isfinite(images).all()
    with pytest.raises(APLAdapterError, match="FluxPipeline has no text_encoder_3"):
        apply_apl(tiny_flux_pipeline(), adapter_3=adapters["sd3"] / "text_encoder_3")


# ----------------------------------------------------------------------------------------------------------------
# What is not done yet says so
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_train_takes_sd3_and_flux_folders_and_names_missing_parts(tmp_path, class_name):
    """apl-train trains these folders (tests/test_sd3_flux_training.py) and apl-export exports them
    (tests/test_export_sd3_flux.py); a folder without their parts is refused by name."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["x", "y"]}))
    with pytest.raises(APLAdapterError, match=f"{class_name}.*lacks the component.*'vae'.*every text encoder"):
        base_family(tmp_path)
    with pytest.raises(APLAdapterError, match=f"{class_name}.*generate-identity-data handles Stable Diffusion 1"):
        check_base_folder(tmp_path, "apl-train generate-identity-data")
