"""Saving and loading APL adapters in PEFT's format: round trips, transfer, and bad files."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from apl_adapter import APLAdapterError, APLConfig, check_adapter_folder, save_adapter
from apl_adapter.testing import tiny_clip_text_model


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=6, init_seed=3))
    folder = tmp_path / "apl-prefix"
    model.save_pretrained(folder)
    return model, folder


def test_save_writes_peft_format_with_apl_type(saved):
    model, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "APL"
    assert config["num_virtual_tokens"] == 6
    assert config["token_dim"] == 32
    tensors = load_file(folder / "adapter_model.safetensors")
    assert list(tensors) == ["base_model.model.embeddings.apl_prefix"]
    assert torch.equal(
        tensors["base_model.model.embeddings.apl_prefix"],
        model.get_base_model().embeddings.apl_prefix["default"].detach(),
    )


def test_plug_and_play_transfer_to_another_encoder_of_the_same_width(saved, prompt_ids):
    model, folder = saved
    other = tiny_clip_text_model(seed=11)  # a "sibling" encoder: same width, other weights
    restored = PeftModel.from_pretrained(other, folder)
    assert isinstance(restored.base_model, type(model.base_model))
    assert torch.equal(
        restored.get_base_model().embeddings.apl_prefix["default"],
        model.get_base_model().embeddings.apl_prefix["default"],
    )
    with torch.no_grad():
        a = model(input_ids=prompt_ids).last_hidden_state
        b = PeftModel.from_pretrained(tiny_clip_text_model(), folder)(input_ids=prompt_ids).last_hidden_state
    assert torch.equal(a, b)  # same base weights + same prefix = same output


def test_width_mismatch_names_both_widths(saved):
    _, folder = saved
    with pytest.raises(APLAdapterError, match=r"width 32.*width 64"):
        PeftModel.from_pretrained(tiny_clip_text_model(hidden_size=64), folder)


def test_truncated_weights_are_refused(saved):
    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(APLAdapterError, match="truncated or corrupted"):
        PeftModel.from_pretrained(tiny_clip_text_model(), folder)


def test_corrupted_header_is_refused(saved):
    _, folder = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(APLAdapterError, match="truncated or corrupted"):
        PeftModel.from_pretrained(tiny_clip_text_model(), folder)


def test_corrupted_config_is_refused(saved):
    _, folder = saved
    (folder / "adapter_config.json").write_text('{"peft_type": "APL", ')
    with pytest.raises(APLAdapterError, match="not valid JSON"):
        check_adapter_folder(folder)


def test_pickle_checkpoints_are_refused(saved):
    _, folder = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(APLAdapterError, match="safetensors only"):
        PeftModel.from_pretrained(tiny_clip_text_model(), folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_prefix_is_refused(saved, bad):
    _, folder = saved
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key][2, 5] = bad
    save_file(tensors, path)
    with pytest.raises(APLAdapterError, match="NaN or Inf"):
        PeftModel.from_pretrained(tiny_clip_text_model(), folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(APLAdapterError, match="No adapter folder"):
        check_adapter_folder(tmp_path / "nope")


def test_save_adapter_is_atomic_and_replaces(tmp_path, prompt_ids):
    target = tmp_path / "ckpt"
    first = get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=1))
    save_adapter(first, target)
    second = get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=2))
    save_adapter(second, target)
    loaded = load_file(target / "adapter_model.safetensors")["base_model.model.embeddings.apl_prefix"]
    assert torch.equal(loaded, second.get_base_model().embeddings.apl_prefix["default"].detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no staging or backup folders left behind"


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path):
    target = tmp_path / "ckpt"
    model = get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=1))
    save_adapter(model, target)
    before = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError):
        save_adapter(model, target, selected_adapters=["no-such-adapter"])
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saving_onto_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("keep me")
    model = get_peft_model(tiny_clip_text_model(), APLConfig())
    with pytest.raises(APLAdapterError, match="a file with that name exists"):
        save_adapter(model, path)
    assert path.read_text() == "keep me"
    with pytest.raises(ValueError):  # PEFT's own save refuses too
        model.save_pretrained(path)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize(
    "extra_key",
    [
        "base_model.model.final_layer_norm.weight",  # would rewrite the encoder's last layer norm
        "base_model.model.embeddings.base_layer.token_embedding.weight",  # would change what a name encodes to
        "base_model.model.embeddings.apl_prefix_2",
    ],
)
def test_an_adapter_may_only_be_a_prefix(saved, extra_key, prompt_ids, capsys):
    from apl_adapter.cli import main as inspect_main
    from apl_adapter.pipelines import apply_apl
    from apl_adapter.testing import tiny_sd_pipeline

    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    base = tiny_clip_text_model()
    source = base.final_layer_norm.weight if "layer_norm" in extra_key else torch.zeros(4, 32)
    if "token_embedding" in extra_key:
        source = base.embeddings.token_embedding.weight
    save_file({**tensors, extra_key: source.detach().clone() * 0 + 7}, weights)
    with pytest.raises(APLAdapterError, match="not part of an APL prefix") as err:
        check_adapter_folder(folder)
    assert extra_key in str(err.value)
    with pytest.raises(APLAdapterError, match="not part of an APL prefix"):
        PeftModel.from_pretrained(base, str(folder))
    pipe = tiny_sd_pipeline()
    with pytest.raises(APLAdapterError, match="not part of an APL prefix"):
        apply_apl(pipe, folder)
    # nothing reached the encoder
    torch.testing.assert_close(pipe.text_encoder(prompt_ids)[0], tiny_clip_text_model()(prompt_ids)[0])
    assert inspect_main(["inspect", str(folder)]) == 2
    assert extra_key in capsys.readouterr().err


def test_a_prefix_loads_across_the_two_clip_classes(tmp_path, prompt_ids):
    """SDXL users move prefixes between CLIPTextModel and CLIPTextModelWithProjection of one width."""
    from transformers import CLIPTextModelWithProjection

    with_projection = CLIPTextModelWithProjection(tiny_clip_text_model().config)
    source = get_peft_model(with_projection, APLConfig(num_virtual_tokens=4, init_seed=9))
    with torch.no_grad():  # as if trained: a fresh prefix of the same seed must not pass for the loaded one
        source.get_base_model().text_model.embeddings.apl_prefix["default"].mul_(-3)
    source.save_pretrained(tmp_path / "from-projection")
    loaded = PeftModel.from_pretrained(tiny_clip_text_model(), str(tmp_path / "from-projection"))
    expected = source.get_base_model().text_model.embeddings.apl_prefix["default"]
    torch.testing.assert_close(loaded.get_base_model().embeddings.apl_prefix["default"], expected, rtol=0, atol=0)
    back = PeftModel.from_pretrained(
        CLIPTextModelWithProjection(with_projection.config), str(tmp_path / "from-projection")
    )
    torch.testing.assert_close(back.get_base_model().text_model.embeddings.apl_prefix["default"], expected)


def test_a_renamed_prefix_key_is_an_error_not_a_random_prefix(saved, capsys):
    from apl_adapter.cli import main as inspect_main

    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    ((key, value),) = load_file(weights).items()
    save_file({key.replace("model.embeddings", "model.encoder.embeddings"): value}, weights)
    with pytest.raises(APLAdapterError, match="not part of an APL prefix"):
        PeftModel.from_pretrained(tiny_clip_text_model(), str(folder))
    assert inspect_main(["inspect", str(folder)]) == 2
    assert "encoder.embeddings" in capsys.readouterr().err


def test_a_text_init_adapter_loads_offline_from_anywhere(tmp_path, monkeypatch):
    """The saved tokenizer path is relative to where training ran; elsewhere transformers takes it for a Hub id
    (a 235 s stall of failed requests here). Loading must not need it: any socket connect fails this test."""
    import subprocess
    import sys

    from apl_adapter.tokenizer import load_clip_tokenizer

    monkeypatch.chdir(tmp_path)
    load_clip_tokenizer().save_pretrained("tok")
    config = APLConfig(
        num_virtual_tokens=4, prefix_init="text", prefix_init_text="a person", tokenizer_name_or_path="tok"
    )
    model = get_peft_model(tiny_clip_text_model(), config)
    with torch.no_grad():
        model.get_base_model().embeddings.apl_prefix["default"].add_(0.5)  # as if trained
    model.save_pretrained("adapter")
    torch.save(model.get_base_model().embeddings.apl_prefix["default"].detach().clone(), tmp_path / "expected.pt")
    (tmp_path / "elsewhere").mkdir()
    script = """
import os, sys, torch
sys.addaudithook(lambda event, args: os._exit(3) if event == "socket.connect" else None)
from peft import PeftModel
import apl_adapter
from apl_adapter.testing import tiny_clip_text_model
loaded = PeftModel.from_pretrained(tiny_clip_text_model(), sys.argv[1])
got = loaded.get_base_model().embeddings.apl_prefix["default"]
print(bool(torch.equal(got, torch.load(sys.argv[2]))))
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "adapter"), str(tmp_path / "expected.pt")],
        cwd=tmp_path / "elsewhere",
        env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"loading reached for the network (exit {done.returncode}): {done.stderr[-800:]}"
    assert done.stdout.strip() == "True"


_BAD_CONFIGS = {
    "m 100": ({"num_virtual_tokens": 100}, "num_virtual_tokens"),
    "m 76": ({"num_virtual_tokens": 76}, "num_virtual_tokens"),
    "m 0": ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    "m null": ({"num_virtual_tokens": None}, "num_virtual_tokens"),
    "m 4.0": ({"num_virtual_tokens": 4.0}, "num_virtual_tokens"),
    "m '4'": ({"num_virtual_tokens": "4"}, "num_virtual_tokens"),
    "lora": ({"peft_type": "LORA"}, "'LORA' adapter"),
    "unknown type": ({"peft_type": "FOO"}, "'FOO' adapter"),
    "no type": ({"peft_type": None}, "no peft_type"),
    "unknown init": ({"prefix_init": "zeros"}, "prefix_init"),
    "token_dim disagrees": ({"token_dim": 48}, "token_dim=48"),
    "negative as string": ({"apply_to_negative_prompt": "false"}, "apply_to_negative_prompt"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONFIGS))
def test_inspect_refuses_configs_that_cannot_load(saved, case, capsys):
    from apl_adapter.cli import main as inspect_main

    _, folder = saved
    path = folder / "adapter_config.json"
    change, reason = _BAD_CONFIGS[case]
    config = json.loads(path.read_text())
    config.update(change)
    if change.get("peft_type", "") is None:
        del config["peft_type"]
    path.write_text(json.dumps(config))
    assert inspect_main(["inspect", str(folder)]) == 2
    assert reason in capsys.readouterr().err
    from apl_adapter.pipelines import apply_apl
    from apl_adapter.testing import tiny_sd_pipeline

    with pytest.raises(APLAdapterError, match=re.escape(reason)):
        apply_apl(tiny_sd_pipeline(), folder)
    if config.get("peft_type") == "APL":  # other types are PEFT's to load
        with pytest.raises(APLAdapterError, match=re.escape(reason)):
            PeftModel.from_pretrained(tiny_clip_text_model(), str(folder))


def test_inspect_refuses_a_config_that_is_a_json_list(saved, capsys):
    from apl_adapter.cli import main as inspect_main

    _, folder = saved
    (folder / "adapter_config.json").write_text("[1, 2]")
    assert inspect_main(["inspect", str(folder)]) == 2
    assert "JSON list" in capsys.readouterr().err


def test_inspect_refuses_a_prefix_so_large_images_come_out_nan(saved, capsys):
    from apl_adapter.cli import main as inspect_main

    _, folder = saved
    weights = folder / "adapter_model.safetensors"
    ((key, value),) = load_file(weights).items()
    save_file({key: torch.full_like(value, 1e30)}, weights)
    assert inspect_main(["inspect", str(folder)]) == 2
    assert "images come out NaN" in capsys.readouterr().err


def test_a_saved_adapter_has_an_apl_model_card(tmp_path):
    """Not PEFT's template: what the prefix is, how to apply it, the base model without a local path, the recipe."""
    from huggingface_hub import ModelCard

    base = tmp_path / "models" / "my-sd15"
    encoder = tiny_clip_text_model()
    encoder.config._name_or_path = str(base / "text_encoder")  # what from_pretrained(local folder) records
    model = get_peft_model(encoder, APLConfig(num_virtual_tokens=4, prefix_depth="deep"))
    save_adapter(model, tmp_path / "adapter", recipe={"steps": 400, "lr": 0.01})
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "peft" and "apl" in card.data.tags
    assert "Anonymization Prompt Learning" in card.text and "load_apl(pipe" in card.text
    assert "| vectors (m) | 4 |" in card.text and "deep: keys and values" in card.text
    assert "| steps | 400 |" in card.text and "More Information Needed" not in card.text
    assert str(tmp_path) not in (tmp_path / "adapter" / "README.md").read_text()
    assert "`my-sd15`" in card.text  # the local base folder by its name


def test_a_saved_adapter_is_readable_per_the_umask(tmp_path):
    """safetensors writes its files 0600 whatever the umask; a server running as another user could not read an
    adapter a training job saved."""
    old_mask = os.umask(0o022)
    try:
        folder = save_adapter(get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=2)), tmp_path / "a")
    finally:
        os.umask(old_mask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert modes == dict.fromkeys(["README.md", "adapter_config.json", "adapter_model.safetensors"], 0o644)
    assert folder.stat().st_mode & 0o777 == 0o755


def test_the_shipped_adapter_saved_before_the_tuner_moved_still_loads(prompt_ids):
    """The prefix in the package was saved when the tuner lived in apl_adapter.model: a saved folder names its type
    (``"peft_type": "APL"``), never a module path, so moving the code must not orphan adapters on disk."""
    from transformers import CLIPTextModel

    from apl_adapter import APLModel
    from apl_adapter.world.models import ASSETS, SHIPPED_PREFIX

    tensors = check_adapter_folder(SHIPPED_PREFIX)
    encoder = CLIPTextModel.from_pretrained(ASSETS / "base" / "text_encoder")
    model = PeftModel.from_pretrained(encoder, SHIPPED_PREFIX)
    assert isinstance(model.peft_config["default"], APLConfig)
    assert isinstance(model.base_model, APLModel)
    embeddings = model.get_base_model().embeddings
    for name in ("apl_prefix", "apl_deep_keys", "apl_deep_values"):
        assert torch.equal(getattr(embeddings, name)["default"], tensors[f"base_model.model.embeddings.{name}"])
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=prompt_ids).last_hidden_state
    with torch.no_grad():
        prefixed = model(input_ids=prompt_ids).last_hidden_state
    assert prefixed.shape == plain.shape and not torch.allclose(prefixed, plain)
