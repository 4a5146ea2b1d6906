"""The APL adapter on real transformers CLIP text encoders (tiny configs, real tokenizer)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from apl_adapter import APLAdapterError, APLConfig, APLEmbedding, PromptTruncationWarning
from apl_adapter.testing import tiny_clip_text_model

from .reference import EOS, reference_encode

ATOL = 1e-5  # fp32, the bound


def _prefix(model: PeftModel) -> torch.Tensor:
    return model.get_base_model().embeddings.apl_prefix["default"].detach()


def test_default_config_is_the_papers():
    config = APLConfig()
    assert config.num_virtual_tokens == 10
    assert config.prefix_init == "random_uniform"
    assert config.prefix_position == "after_bos"
    assert config.apply_to_negative_prompt is False
    assert config.peft_type == "APL"


def test_trainable_parameters_are_the_prefix_only():
    model = get_peft_model(tiny_clip_text_model(hidden_size=48), APLConfig())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 10 * 48
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["base_model.model.embeddings.apl_prefix.default"]


def test_sd15_width_gives_7680_trainable_parameters():
    from transformers import CLIPTextModel

    from apl_adapter.testing import sd15_text_config

    config = sd15_text_config()
    config.num_hidden_layers = 1  # width is what matters; keep the test light
    model = get_peft_model(CLIPTextModel(config), APLConfig())
    assert model.get_nb_trainable_parameters()[0] == 7680


def test_forward_matches_independent_reference(prompt_ids):
    model = get_peft_model(tiny_clip_text_model(), APLConfig()).eval()
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_hidden_states=True)
    ref_last, ref_pooled, ref_hidden = reference_encode(model.get_base_model(), prompt_ids, _prefix(model))
    assert out.last_hidden_state.shape == (4, 77, 32)
    torch.testing.assert_close(out.last_hidden_state, ref_last, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref_pooled, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref_hidden)
    for got, want in zip(out.hidden_states, ref_hidden):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_prefix_sits_at_positions_1_to_m(prompt_ids):
    model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=3)).eval()
    captured = {}
    embeddings = model.get_base_model().embeddings
    hook = embeddings.register_forward_hook(lambda mod, args, kwargs_out: captured.setdefault("out", kwargs_out))
    with torch.no_grad():
        model(input_ids=prompt_ids)
    hook.remove()
    positions = embeddings.base_layer.position_embedding.weight[:77]
    token_part = captured["out"] - positions
    torch.testing.assert_close(token_part[:, 1:4], _prefix(model).expand(4, -1, -1), atol=1e-6, rtol=0)
    table = embeddings.base_layer.token_embedding.weight
    torch.testing.assert_close(token_part[:, 0], table[prompt_ids[:, 0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(token_part[:, 4], table[prompt_ids[:, 1]], atol=1e-6, rtol=0)


def test_with_projection_pools_at_shifted_eos(prompt_ids):
    base = tiny_clip_text_model(with_projection=True)
    model = get_peft_model(base, APLConfig()).eval()
    with torch.no_grad():
        out = model(input_ids=prompt_ids)
    text_model = model.get_base_model().text_model
    ref_last, ref_pooled, _ = reference_encode(text_model, prompt_ids, text_model.embeddings.apl_prefix["default"])
    torch.testing.assert_close(out.last_hidden_state, ref_last, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.text_embeds, ref_pooled @ base.text_projection.weight.T, atol=ATOL, rtol=0)


def test_return_dict_false_and_attention_mask(tokenizer):
    model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4)).eval()
    batch = tokenizer(["a photo of Ann Lee"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        as_tuple = model(batch.input_ids, batch.attention_mask, return_dict=False)
        as_dict = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state)
    # With a mask, the visible positions still match the reference (the prefix is always visible).
    ref_last, _, _ = reference_encode(model.get_base_model(), batch.input_ids, _prefix(model))
    visible = int(batch.attention_mask.sum()) + 4
    torch.testing.assert_close(as_dict.last_hidden_state[:, :visible], ref_last[:, :visible], atol=ATOL, rtol=0)


def test_disabled_adapter_is_the_base_model_exactly(prompt_ids):
    plain = tiny_clip_text_model(seed=3)
    with torch.no_grad():
        expected = plain(input_ids=prompt_ids, output_hidden_states=True)
    model = get_peft_model(tiny_clip_text_model(seed=3), APLConfig()).eval()
    with model.disable_adapter(), torch.no_grad():
        got = model(input_ids=prompt_ids, output_hidden_states=True)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.pooler_output, expected.pooler_output)
    with torch.no_grad():
        enabled = model(input_ids=prompt_ids).last_hidden_state
    assert not torch.allclose(enabled, expected.last_hidden_state)


def test_unload_returns_the_untouched_base(prompt_ids):
    plain = tiny_clip_text_model(seed=4)
    with torch.no_grad():
        expected = plain(input_ids=prompt_ids).last_hidden_state
    base = tiny_clip_text_model(seed=4)
    model = get_peft_model(base, APLConfig())
    restored = model.unload()
    assert restored is base
    assert type(restored.embeddings) is CLIPTextEmbeddings
    assert not hasattr(restored, "_apl_hook_handle")
    assert not hasattr(restored, "peft_config")
    with torch.no_grad():
        assert torch.equal(restored(input_ids=prompt_ids).last_hidden_state, expected)


def test_causal_prefix_positions_do_not_depend_on_the_prompt(tokenizer):
    """Positions 0..m (BOS + prefix) are the same for any prompt: what the K/V cache relies on."""
    model = get_peft_model(tiny_clip_text_model(), APLConfig()).eval()
    prompts = ["a photo of Ann Lee", "a landscape with three blue mountains at dawn, oil painting"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for states in (*out.hidden_states, out.last_hidden_state):
        assert torch.equal(states[0, :11], states[1, :11])
    assert not torch.allclose(out.last_hidden_state[0, 11:], out.last_hidden_state[1, 11:])


def test_long_prompt_is_truncated_keeping_eos_with_a_warning(tokenizer):
    model = get_peft_model(tiny_clip_text_model(), APLConfig()).eval()
    ids = tokenizer(["word " * 90], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(PromptTruncationWarning, match="truncated"), torch.no_grad():
        out = model(input_ids=ids)
    assert out.last_hidden_state.shape == (1, 77, 32)
    _, ref_pooled, _ = reference_encode(model.get_base_model(), ids, _prefix(model))
    torch.testing.assert_close(out.pooler_output, ref_pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, -1], atol=0, rtol=0)  # EOS is last


def test_short_prompt_warns_not(prompt_ids, recwarn):
    model = get_peft_model(tiny_clip_text_model(), APLConfig()).eval()
    with torch.no_grad():
        model(input_ids=prompt_ids)
    assert not [w for w in recwarn if issubclass(w.category, PromptTruncationWarning)]


def test_backward_reaches_the_prefix_only(prompt_ids):
    model = get_peft_model(tiny_clip_text_model(), APLConfig())
    model.train()
    out = model(input_ids=prompt_ids)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    for name, param in model.named_parameters():
        if "apl_prefix" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("init", ["random_uniform", "vocab", "text"])
def test_initialisations(init, tokenizer):
    config = APLConfig(prefix_init=init, prefix_init_text="an anonymous person", num_virtual_tokens=5, init_seed=7)
    model = get_peft_model(tiny_clip_text_model(), config)
    prefix = _prefix(model)
    table = model.get_base_model().embeddings.base_layer.token_embedding.weight.detach()
    if init == "random_uniform":
        assert prefix.min() >= 0 and prefix.max() < 1
    elif init == "vocab":
        matches = (prefix[:, None, :] == table[None]).all(-1).any(-1)
        assert matches.all()
    else:
        ids = tokenizer("an anonymous person", add_special_tokens=False).input_ids
        expected = table[torch.tensor((ids * 5)[:5])]
        assert torch.equal(prefix, expected)
    again = _prefix(get_peft_model(tiny_clip_text_model(), config))
    assert torch.equal(prefix, again), "initialisation must be seeded"


@pytest.mark.parametrize("m", [0, -3, 76, 200])
def test_bad_num_virtual_tokens(m):
    with pytest.raises(APLAdapterError, match="num_virtual_tokens"):
        APLConfig(num_virtual_tokens=m)


def test_largest_prefix_that_fits():
    model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=75)).eval()
    ids = torch.tensor([[49406, EOS] + [EOS] * 75])  # the empty prompt: BOS + 75 prefix vectors + EOS
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.last_hidden_state.shape == (1, 77, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, -1], atol=0, rtol=0)


def test_text_init_needs_a_phrase():
    with pytest.raises(APLAdapterError, match="prefix_init_text"):
        APLConfig(prefix_init="text")


def test_not_a_clip_text_encoder_is_refused():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(APLAdapterError, match="CLIP text encoder"):
        get_peft_model(bert, APLConfig())


def test_position_ids_are_refused(prompt_ids):
    model = get_peft_model(tiny_clip_text_model(), APLConfig())
    with pytest.raises(APLAdapterError, match="position_ids"):
        model(input_ids=prompt_ids, position_ids=torch.arange(77)[None])


def test_two_adapters_switch_and_only_one_is_active(prompt_ids):
    model = get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=1)).eval()
    model.add_adapter("other", APLConfig(init_seed=2))
    with torch.no_grad():
        first = model(input_ids=prompt_ids).last_hidden_state
        model.set_adapter("other")
        second = model(input_ids=prompt_ids).last_hidden_state
    assert not torch.allclose(first, second)
    layer = model.get_base_model().embeddings
    assert isinstance(layer, APLEmbedding)
    ref_last, _, _ = reference_encode(model.get_base_model(), prompt_ids, layer.apl_prefix["other"].detach())
    torch.testing.assert_close(second, ref_last, atol=ATOL, rtol=0)
