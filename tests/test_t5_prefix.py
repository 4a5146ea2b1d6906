"""The APL prefix in a T5 encoder (SD3's text_encoder_3, FLUX's text_encoder_2): layout, exactness, save/load."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

from apl_adapter import APLAdapterError, APLConfig, PromptTruncationWarning
from apl_adapter.cli import main as apl_adapter_cli
from apl_adapter.testing import tiny_clip_text_model, tiny_t5_encoder, tiny_t5_tokenizer
from apl_adapter.tuners.apl.model import prefix_parameters
from tests.reference import reference_t5_encode

WINDOW = 24  # a short T5 window (SD3 uses 256, FLUX 512): the same layout, faster
PROMPTS = [
    "a photo of Ann Lee",
    "a red cube on a table",
    "a",
    # longer than the window once the prefix takes its positions: cut, EOS kept
    "a close-up portrait of Zorblax Quentaro smiling in a garden at sunset with glasses and a hat by a window",
]


@pytest.fixture(scope="module")
def t5_tokenizer():
    return tiny_t5_tokenizer()


@pytest.fixture(scope="module")
def t5_inputs(t5_tokenizer):
    return t5_tokenizer(PROMPTS, padding="max_length", max_length=WINDOW, truncation=True, return_tensors="pt")


def test_tokenizer_is_t5_like(t5_tokenizer, t5_inputs):
    ids = t5_inputs.input_ids
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id) == (0, 1)
    assert ids.shape == (4, WINDOW) and ids.max() < tiny_t5_encoder().config.vocab_size
    assert ids[0].tolist().index(1) < WINDOW - 4 and ids[0, -1] == 0  # EOS then padding at the end, no BOS
    assert ids[3].tolist().index(1) >= WINDOW - 5, "the long prompt leaves no room for a 5-vector prefix"


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("window", [WINDOW, 256])  # 256: SD3's window, where the long prompt fits
def test_prefixed_t5_equals_the_hand_built_reference(t5_tokenizer, with_mask, window):
    inputs = t5_tokenizer(PROMPTS, padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    plain = tiny_t5_encoder(seed=3)
    model = get_peft_model(tiny_t5_encoder(seed=3), APLConfig(num_virtual_tokens=5, init_seed=1)).eval()
    prefix = prefix_parameters(model)["apl_prefix"].detach()
    mask = inputs.attention_mask if with_mask else None
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=inputs.input_ids, attention_mask=mask).last_hidden_state
    truncated = [w for w in caught if issubclass(w.category, PromptTruncationWarning)]
    assert len(truncated) == (window == WINDOW), "warned exactly when the prefix pushed prompt tokens out"
    expected = reference_t5_encode(plain, inputs.input_ids, prefix, mask)
    assert out.shape == (4, window, 32), "the prefix takes positions of the window; its length is kept"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = plain(input_ids=inputs.input_ids, attention_mask=mask).last_hidden_state
    assert (out - base).abs().max() > 1e-2, "the prefix must change the encoding"


def test_adapter_off_and_unload_give_the_plain_encoder_bit_for_bit(t5_inputs):
    ids = t5_inputs.input_ids[:3]  # no truncation here
    plain = tiny_t5_encoder(seed=4)
    with torch.no_grad():
        expected = plain(input_ids=ids).last_hidden_state
        model = get_peft_model(tiny_t5_encoder(seed=4), APLConfig(num_virtual_tokens=3))
        prefixed = model(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            off = model(input_ids=ids).last_hidden_state
        restored = model.unload()
        after = restored(input_ids=ids).last_hidden_state
    assert not torch.equal(prefixed, expected)
    assert torch.equal(off, expected) and torch.equal(after, expected)
    assert type(restored.encoder.embed_tokens) is torch.nn.Embedding
    assert restored.encoder.embed_tokens.weight is restored.shared.weight, "the tied table stays tied"


def test_config_names_the_encoder_type_and_round_trips(tmp_path, t5_inputs, capsys):
    ids = t5_inputs.input_ids[:2]
    model = get_peft_model(tiny_t5_encoder(seed=5), APLConfig(num_virtual_tokens=4, init_seed=2))
    config = model.peft_config["default"]
    assert (config.text_encoder_type, config.token_dim, config.target_modules) == ("t5", 32, ["encoder.embed_tokens"])
    model.save_pretrained(tmp_path / "t5")
    saved = json.loads((tmp_path / "t5" / "adapter_config.json").read_text())
    assert saved["text_encoder_type"] == "t5"
    loaded = PeftModel.from_pretrained(tiny_t5_encoder(seed=5), str(tmp_path / "t5")).eval()
    assert loaded.peft_config["default"].text_encoder_type == "t5"
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, atol=0, rtol=0
        )
    assert apl_adapter_cli(["inspect", str(tmp_path / "t5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text_encoder_type"] == "t5"
    assert apl_adapter_cli(["inspect", str(tmp_path / "t5")]) == 0
    assert "for a t5 text encoder" in capsys.readouterr().out.lower()


def test_a_clip_adapter_saved_before_the_field_still_loads(tmp_path):
    get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=3)).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    config = json.loads(path.read_text())
    assert config.pop("text_encoder_type") == "clip"
    path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_clip_text_model(), str(tmp_path / "old"))
    assert loaded.peft_config["default"].text_encoder_type == "clip"


def test_prefixes_do_not_cross_encoder_types(tmp_path):
    get_peft_model(tiny_t5_encoder(), APLConfig(num_virtual_tokens=3)).save_pretrained(tmp_path / "t5")
    get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=3)).save_pretrained(tmp_path / "clip")
    with pytest.raises(APLAdapterError, match=r"prefix for a T5 text encoder.*CLIPTextModel.*text_encoder_3 is T5"):
        PeftModel.from_pretrained(tiny_clip_text_model(), str(tmp_path / "t5"))
    with pytest.raises(APLAdapterError, match=r"prefix for a CLIP text encoder.*T5EncoderModel"):
        PeftModel.from_pretrained(tiny_t5_encoder(), str(tmp_path / "clip"))
    with pytest.raises(APLAdapterError, match=r"width 48 .*d_model"):
        PeftModel.from_pretrained(tiny_t5_encoder(d_model=48), str(tmp_path / "t5"))


def test_unsupported_t5_settings_fail_with_the_fix(t5_inputs):
    with pytest.raises(APLAdapterError, match=r"deep prefix .*not supported for T5.*prefix_depth='shallow'"):
        get_peft_model(tiny_t5_encoder(), APLConfig(prefix_depth="deep"))
    with pytest.raises(APLAdapterError, match=r"deep prefix .*not supported for T5"):
        APLConfig(prefix_depth="deep", text_encoder_type="t5")
    with pytest.raises(APLAdapterError, match=r"text_encoder_type='t5'.*at most 75"):
        APLConfig(num_virtual_tokens=100)
    assert APLConfig(num_virtual_tokens=100, text_encoder_type="t5").num_virtual_tokens == 100
    with pytest.raises(APLAdapterError, match="prefix_init='text' for a T5 encoder needs tokenizer_name_or_path"):
        get_peft_model(tiny_t5_encoder(), APLConfig(prefix_init="text", prefix_init_text="a person"))
    model = get_peft_model(tiny_t5_encoder(), APLConfig(num_virtual_tokens=WINDOW))
    with pytest.raises(APLAdapterError, match=f"{WINDOW}-vector T5 prefix leaves no room .*max_sequence_length"):
        model(input_ids=t5_inputs.input_ids)
    embeds = torch.zeros(1, WINDOW, 32)
    with pytest.raises(APLAdapterError, match=r"inputs_embeds cannot be combined .*pass input_ids"):
        model(inputs_embeds=embeds)


def test_vocab_init_and_training_gradient_reach_the_prefix_only(t5_inputs):
    model = get_peft_model(tiny_t5_encoder(seed=6), APLConfig(num_virtual_tokens=3, prefix_init="vocab"))
    prefix = prefix_parameters(model)["apl_prefix"]
    table = model.get_base_model().shared.weight
    assert all(any(torch.equal(row, t) for t in table) for row in prefix.detach()), "rows of the vocabulary"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.encoder.embed_tokens.apl_prefix.default"]
    model(input_ids=t5_inputs.input_ids[:2]).last_hidden_state.square().mean().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_saved_t5_adapter_card_says_where_it_goes(tmp_path):
    from apl_adapter import save_adapter

    save_adapter(get_peft_model(tiny_t5_encoder(), APLConfig(num_virtual_tokens=3)), tmp_path / "t5")
    card = (tmp_path / "t5" / "README.md").read_text()
    assert "T5 text encoder" in card and "load_apl(pipe, adapter_3=" in card and "CLIP" not in card
    assert "apl-export <sd folder>" not in card, "a T5 prefix is exported with an SD3 / FLUX folder, not an SD one"
    assert "<adapters>/text_encoder_3/" in card and "apl-export <sd3 or flux folder>" in card
