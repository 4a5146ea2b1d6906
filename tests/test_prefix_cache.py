"""CachedPrefixEncoder equals the full prefixed encoder (the APL adapter's own forward), for many prompts.

The reference is the real PEFT-wrapped CLIPTextModel with an APL adapter: it shifts the ids, splices the prefix after
BOS and runs all 77 positions. The cached encoder runs the prefix once and then only the prompt positions.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import CLIPTextModel

from apl_adapter import APLConfig, load_clip_tokenizer
from apl_adapter.errors import APLAdapterError
from apl_adapter.testing import sd15_text_config, tiny_clip_text_model
from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder

ATOL = 1e-5
PROMPTS = [
    "a photo of Ann Lee",
    "A photo of a male person, brown hair, blue eyes",
    "",
    "a red bicycle leaning on a wall",
    "portrait of a smiling woman in a garden, oil painting, soft light, detailed",
    "dog",
    # Long enough that the 10-vector prefix pushes its tail past position 76 (truncated, EOS kept).
    " ".join(["a very long prompt about a crowded street market at dusk with many people"] * 6),
]


def random_prompt_ids(count: int, seed: int) -> torch.Tensor:
    """Random token prompts of random lengths (BOS, tokens, EOS, EOS padding), as the tokenizer lays them out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((count, 77), 49407)
    ids[:, 0] = 49406
    for row in range(count):
        length = int(torch.randint(0, 76, (), generator=g))
        ids[row, 1 : 1 + length] = torch.randint(0, 49406, (length,), generator=g)
    return ids


def tokenized(prompts: list[str]) -> torch.Tensor:
    tokenizer = load_clip_tokenizer()
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_outputs(reference, cached, projection: bool = False):
    torch.testing.assert_close(cached.last_hidden_state, reference.last_hidden_state, atol=ATOL, rtol=0)
    if projection:
        torch.testing.assert_close(cached.text_embeds, reference.text_embeds, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(cached.pooler_output, reference.pooler_output, atol=ATOL, rtol=0)
    if reference.hidden_states is not None:
        assert len(cached.hidden_states) == len(reference.hidden_states)
        for ours, theirs in zip(cached.hidden_states, reference.hidden_states):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def adapted(hidden_size=64, heads=1, m=10, with_projection=False, seed=0):
    """A tiny real CLIP text model with an APL adapter; hidden 64 / 1 head gives head_dim 64 (a kernel fast path)."""
    model = tiny_clip_text_model(hidden_size=hidden_size, heads=heads, seed=seed, with_projection=with_projection)
    return get_peft_model(model, APLConfig(num_virtual_tokens=m))


@pytest.mark.filterwarnings("ignore::apl_adapter.PromptTruncationWarning")
@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize(("hidden_size", "heads"), [(64, 1), (32, 4)])
def test_cached_equals_full_prefixed_encoder_on_many_prompts(with_projection, hidden_size, heads):
    peft_model = adapted(hidden_size, heads, with_projection=with_projection)
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    batches = [tokenized(PROMPTS), random_prompt_ids(16, seed=1), random_prompt_ids(16, seed=2)]
    with torch.no_grad():
        for ids in batches:
            reference = peft_model(input_ids=ids, output_hidden_states=True)
            assert_same_outputs(reference, encoder(ids, output_hidden_states=True), projection=with_projection)


@pytest.mark.filterwarnings("ignore::apl_adapter.PromptTruncationWarning")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("length", [5, 77])
def test_short_prefix_and_short_sequences(m, length):
    """m = 1 (one cached position after BOS) and tokenizer outputs shorter than 77 (no padding)."""
    peft_model = adapted(m=m, seed=m)
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = random_prompt_ids(6, seed=length)[:, :length]
    ids[:, -1] = 49407
    with torch.no_grad():
        reference = peft_model(input_ids=ids, output_hidden_states=True)
        cached = encoder(ids, output_hidden_states=True)
    assert cached.last_hidden_state.shape == (6, min(length + m, 77), 64)
    assert_same_outputs(reference, cached)


def test_empty_prefix_is_the_plain_encoder():
    """m = 0: nothing to cache beyond BOS, and the result is the unadapted CLIP text model."""
    model = tiny_clip_text_model(hidden_size=64, heads=1)
    encoder = CachedPrefixEncoder(model, prefix=torch.empty(0, 64))
    ids = tokenized(PROMPTS[:4])
    with torch.no_grad():
        assert_same_outputs(model(input_ids=ids, output_hidden_states=True), encoder(ids, output_hidden_states=True))


def test_fused_kernel_and_reference_attention_agree():
    peft_model = adapted()
    ids = random_prompt_ids(8, seed=3)
    with torch.no_grad():
        fused = CachedPrefixEncoder.from_adapter(peft_model, use_kernel=True)(ids)
        reference = CachedPrefixEncoder.from_adapter(peft_model, use_kernel=False)(ids)
    torch.testing.assert_close(fused.last_hidden_state, reference.last_hidden_state, atol=ATOL, rtol=0)


def test_cache_is_reused_and_follows_in_place_prefix_updates():
    peft_model = adapted()
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = tokenized(PROMPTS[:3])
    prefix = peft_model.base_model.model.embeddings.active_prefix
    with torch.no_grad():
        before = encoder(ids).last_hidden_state
        state = encoder._state
        encoder(ids)
        assert encoder._state is state, "an unchanged prefix must reuse its cached K/V"
        prefix.add_(torch.randn(prefix.shape, generator=torch.Generator().manual_seed(1)))  # like an optimizer step
        after = encoder(ids)
        assert encoder._state is not state
        assert (after.last_hidden_state - before).abs().max() > 1e-3
        assert_same_outputs(peft_model(input_ids=ids), after)


def test_refresh_after_weight_change():
    peft_model = adapted()
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = tokenized(PROMPTS[:2])
    with torch.no_grad():
        encoder(ids)
        peft_model.base_model.model.encoder.layers[0].self_attn.k_proj.weight.mul_(1.5)
        encoder.refresh()
        assert_same_outputs(peft_model(input_ids=ids), encoder(ids))


def test_gradients_reach_the_prefix_like_the_full_encoder():
    """Training mode: the prefix state is recomputed with autograd, so gradients equal the full encoder's."""
    peft_model = adapted()
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    prefix = peft_model.base_model.model.embeddings.active_prefix
    ids = tokenized(PROMPTS[:3])
    target = torch.randn(3, 77, 64, generator=torch.Generator().manual_seed(0))

    (peft_model(input_ids=ids).last_hidden_state - target).square().mean().backward()
    full_grad = prefix.grad.clone()
    prefix.grad = None
    (encoder(ids).last_hidden_state - target).square().mean().backward()
    assert full_grad.abs().max() > 0
    torch.testing.assert_close(prefix.grad, full_grad, atol=1e-6, rtol=1e-4)


def test_disabled_adapter_gives_the_base_encoder():
    peft_model = adapted()
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = tokenized(PROMPTS[:2])
    with torch.no_grad(), peft_model.disable_adapter():
        assert_same_outputs(peft_model(input_ids=ids), encoder(ids))


def test_padding_masks_are_refused():
    encoder = CachedPrefixEncoder.from_adapter(adapted())
    ids = tokenized(PROMPTS[:1])
    mask = (ids != 49407).long()
    with pytest.raises(APLAdapterError, match="causal masking only"):
        encoder(ids, attention_mask=mask)


def test_tuple_output_and_sdxl_style_hidden_state():
    peft_model = adapted(with_projection=True)
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = tokenized(PROMPTS[:2])
    with torch.no_grad():
        reference = peft_model(input_ids=ids, output_hidden_states=True)
        text_embeds, _, hidden_states = encoder(ids, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(text_embeds, reference.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden_states[-2], reference.hidden_states[-2], atol=ATOL, rtol=0)


def test_sd15_size_encoder_matches():
    """SD 1.5 text encoder layers (768 wide, 12 heads of 64, MLP 3072), random weights; 3 of its 12 layers for time."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    config = sd15_text_config()
    config.num_hidden_layers = 3
    peft_model = get_peft_model(CLIPTextModel(config).eval(), APLConfig())
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    ids = tokenized(PROMPTS[:4])
    with torch.no_grad():
        assert_same_outputs(peft_model(input_ids=ids), encoder(ids))


def test_stands_in_for_the_text_encoder_in_diffusers_encode_prompt():
    """diffusers' encode_prompt reads .config, .dtype and .device, then calls the encoder: the cached one works there
    and gives the prefixed embeddings (the adapter's full path), while a disabled adapter gives the plain ones."""
    from apl_adapter.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    peft_model = get_peft_model(pipe.text_encoder, APLConfig())
    encoder = CachedPrefixEncoder.from_adapter(peft_model)
    pipe.text_encoder = encoder
    assert encoder.dtype == torch.float32 and encoder.config is peft_model.get_base_model().config
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt("a photo of Ann Lee", "cpu", 1, False)
        reference = peft_model(input_ids=tokenized(["a photo of Ann Lee"])).last_hidden_state
    torch.testing.assert_close(prompt_embeds, reference, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore::apl_adapter.PromptTruncationWarning")
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_legacy_config_ids_start_the_prefix_state_at_clip_bos(depth):
    """Text-encoder configs saved before transformers #24773 (Stable Diffusion 1.x among them) say bos_token_id=0 and
    eos_token_id=2; the tokenizer still writes BOS 49406. The prefix state must start from that BOS, not from id 0."""
    torch.manual_seed(0)
    config = sd15_text_config()
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1})
    config.update({"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
    model = CLIPTextModel(config).eval()
    peft_model = get_peft_model(model, APLConfig(num_virtual_tokens=4, prefix_depth=depth))
    ids = tokenized(PROMPTS)
    with torch.no_grad():
        assert_same_outputs(peft_model(input_ids=ids), CachedPrefixEncoder.from_adapter(peft_model)(ids))
