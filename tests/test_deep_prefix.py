"""The deep prefix (``APLConfig(prefix_depth="deep")``): learned keys and values at every layer of CLIP's encoder.

Each path that runs a shallow prefix is checked with a deep one against the hand-built reference
(``tests/reference.py``, plain tensor math) within 1e-5 in fp32: the hooked transformers forward, the prefix K/V
cache (fused kernel and PyTorch), PEFT save / load, ``apply_apl`` on SD and SDXL, ``apl-train`` and resume,
``apl-export`` (baked, ONNX Runtime and the fast variant's graph) and ``apl-adapter inspect``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from apl_adapter import APLAdapterError, APLConfig, save_adapter
from apl_adapter.cli import main as inspect_main
from apl_adapter.pipelines import apl_models, apply_apl, remove_apl
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline, tiny_sdxl_pipeline
from apl_adapter.tuners.apl.layer import APLPrefixProjection
from apl_adapter.tuners.apl.model import prefix_parameters
from apl_adapter.tuners.apl.prefix import PrefixWeights
from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder
from apl_adapter.tuners.apl.serialization import check_adapter_folder

from .reference import reference_encode

ATOL = 1e-5  # fp32


def _deep_model(m: int = 4, seed: int = 3, **kwargs) -> PeftModel:
    """A deep adapter whose rows are moved away from their (shallow-equivalent) start, so they matter."""
    model = get_peft_model(tiny_clip_text_model(**kwargs), APLConfig(num_virtual_tokens=m, prefix_depth="deep"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in prefix_parameters(model).items():
            if name != "apl_prefix":
                param.add_(torch.randn(param.shape, generator=generator))
    return model.eval()


def _rows(model: PeftModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = prefix_parameters(model)
    return params["apl_prefix"], params["apl_deep_keys"], params["apl_deep_values"]


def test_shallow_stays_the_default_and_deep_adds_two_rows_per_layer():
    assert APLConfig().prefix_depth == "shallow"
    shallow = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4))
    deep = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4, prefix_depth="deep"))
    layers = deep.get_base_model().config.num_hidden_layers
    assert shallow.get_nb_trainable_parameters()[0] == 4 * 32
    assert deep.get_nb_trainable_parameters()[0] == 4 * 32 + 2 * layers * 4 * 32
    projections = [m for m in deep.modules() if isinstance(m, APLPrefixProjection)]
    assert len(projections) == 2 * layers
    with pytest.raises(APLAdapterError, match="prefix_depth"):
        APLConfig(prefix_depth="deeper")


def test_deep_prefix_starts_as_the_shallow_one(prompt_ids):
    shallow = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=6, init_seed=2))
    deep = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=6, init_seed=2, prefix_depth="deep"))
    with torch.no_grad():
        a = shallow(input_ids=prompt_ids).last_hidden_state
        b = deep(input_ids=prompt_ids).last_hidden_state
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("with_projection", [False, True])
def test_deep_forward_matches_the_hand_built_reference(prompt_ids, with_projection):
    model = _deep_model(with_projection=with_projection)
    prefix, keys, values = _rows(model)
    text_model = model.get_base_model()
    text_model = getattr(text_model, "text_model", text_model)
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_hidden_states=True)
        ref_last, ref_pooled, ref_hidden = reference_encode(text_model, prompt_ids, prefix, keys, values)
        shallow_last, _, _ = reference_encode(text_model, prompt_ids, prefix)
    torch.testing.assert_close(out.last_hidden_state, ref_last, atol=ATOL, rtol=0)
    for got, want in zip(out.hidden_states, ref_hidden):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if not with_projection:
        torch.testing.assert_close(out.pooler_output, ref_pooled, atol=ATOL, rtol=0)
    assert (out.last_hidden_state - shallow_last).abs().max() > 0.1, "the deep rows must change the output"


def test_deep_rows_act_only_inside_the_prefixed_forward(prompt_ids):
    model = _deep_model()
    plain = tiny_clip_text_model()
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=prompt_ids).last_hidden_state, plain(prompt_ids)[0])
        # The encoder called directly (as the export graphs and the cache do) is the plain encoder.
        embeds = plain.embeddings(prompt_ids)
        direct = model.get_base_model().encoder(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(direct, plain.encoder(inputs_embeds=embeds).last_hidden_state)

        # A forward that raises midway must not leave the rows switched on for the next caller.
        def fail(*args):
            raise RuntimeError("out of memory")

        handle = model.get_base_model().encoder.layers[-1].mlp.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            model(input_ids=prompt_ids)
        handle.remove()
        direct_again = model.get_base_model().encoder(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(direct_again, direct)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_cached_encoder_matches_and_follows_in_place_updates(prompt_ids, use_kernel):
    model = _deep_model()
    cached = CachedPrefixEncoder.from_adapter(model, use_kernel=use_kernel)
    _, keys, _ = _rows(model)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(
                cached(prompt_ids).last_hidden_state, model(input_ids=prompt_ids).last_hidden_state, atol=ATOL, rtol=0
            )
            keys[-1].add_(0.5)  # an optimizer step on the deep rows alone must refresh the cache


def test_gradients_reach_every_deep_row_through_the_cache(prompt_ids):
    model = _deep_model()
    params = prefix_parameters(model)
    for encode in (model, CachedPrefixEncoder.from_adapter(model)):
        for p in params.values():
            p.grad = None
        encode(input_ids=prompt_ids)[0].square().mean().backward()
        for name, p in params.items():
            assert p.grad is not None and bool((p.grad.abs().flatten(1).sum(1) > 0).all()), name


def test_save_load_inspect_and_unload(tmp_path, prompt_ids, capsys):
    model = _deep_model()
    save_adapter(model, tmp_path / "deep")
    tensors = check_adapter_folder(tmp_path / "deep")
    assert sorted(k.rsplit(".", 1)[1] for k in tensors) == ["apl_deep_keys", "apl_deep_values", "apl_prefix"]
    assert json.loads((tmp_path / "deep" / "adapter_config.json").read_text())["prefix_depth"] == "deep"
    loaded = PeftModel.from_pretrained(tiny_clip_text_model(), str(tmp_path / "deep")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=prompt_ids).last_hidden_state, model(input_ids=prompt_ids).last_hidden_state
        )
    assert inspect_main(["inspect", str(tmp_path / "deep")]) == 0
    text = capsys.readouterr().out
    assert "deep" in text and "apl_deep_keys: (2, 4, 32)" in text
    base = loaded.unload()
    assert not any(isinstance(m, APLPrefixProjection) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(prompt_ids)[0], tiny_clip_text_model()(prompt_ids)[0])


def test_deep_rows_missing_or_misshapen_are_refused(tmp_path):
    save_adapter(_deep_model(), tmp_path / "deep")
    weights = tmp_path / "deep" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("apl_deep_values"))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(APLAdapterError, match="lacks apl_deep_values"):
        check_adapter_folder(tmp_path / "deep")
    save_file({**tensors, key: tensors[key][:, :2].contiguous()}, weights)
    with pytest.raises(APLAdapterError, match="apl_deep_values has shape"):
        check_adapter_folder(tmp_path / "deep")


def test_apply_apl_on_sd_and_sdxl_matches_the_adapter(tmp_path, tokenizer):
    sd = tiny_sd_pipeline()
    save_adapter(_deep_model(m=10), tmp_path / "deep")
    ids = tokenizer("a photo of Ann Lee", padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = {}
    for use_cache in (True, False):
        apply_apl(sd, tmp_path / "deep", use_prefix_cache=use_cache)
        with torch.no_grad():
            outs[use_cache] = sd.encode_prompt("a photo of Ann Lee", "cpu", 1, False)[0]
            direct = apl_models(sd)["text_encoder"](input_ids=ids).last_hidden_state
        remove_apl(sd)
        torch.testing.assert_close(outs[use_cache], direct, atol=ATOL, rtol=0)
    torch.testing.assert_close(outs[True], outs[False], atol=ATOL, rtol=0)

    xl = tiny_sdxl_pipeline()
    deep_2 = _deep_model(m=10, hidden_size=48, with_projection=True, projection_dim=48, pad_token_id=0, seed=4)
    save_adapter(deep_2, tmp_path / "deep-2")
    with torch.no_grad():
        plain = xl.encode_prompt("a photo of Ann Lee", device="cpu", do_classifier_free_guidance=False)
    apply_apl(xl, tmp_path / "deep", tmp_path / "deep-2")
    ids_2 = xl.tokenizer_2("a photo of Ann Lee", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        prefixed = xl.encode_prompt("a photo of Ann Lee", device="cpu", do_classifier_free_guidance=False)
        full = apl_models(xl)["text_encoder_2"](input_ids=ids_2, output_hidden_states=True)
    assert prefixed[0].shape == plain[0].shape == (1, 77, 80)
    torch.testing.assert_close(prefixed[0][..., 32:], full.hidden_states[-2], atol=ATOL, rtol=0)
    torch.testing.assert_close(prefixed[2], full.text_embeds, atol=ATOL, rtol=0)


def test_export_graphs_bake_the_deep_prefix(prompt_ids):
    from apl_export.modules import BakedPrefixStateGraph, make_standard_text_encoder
    from apl_export.trt_plugin import FastCLIPTextEncoderGraph

    model = _deep_model()
    prefix, keys, values = _rows(model)
    weights = PrefixWeights(prefix, keys, values)
    graph = make_standard_text_encoder(model.get_base_model(), weights, False, 4)
    assert isinstance(graph, BakedPrefixStateGraph) and not graph.encoder.use_kernel
    with torch.no_grad():
        want = model(input_ids=prompt_ids)
        for g in (graph, FastCLIPTextEncoderGraph(model.get_base_model(), weights)):
            last, pooled = g(prompt_ids.to(torch.int32))
            torch.testing.assert_close(last, want.last_hidden_state, atol=ATOL, rtol=0)
            torch.testing.assert_close(pooled, want.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_apl_export_validates_a_deep_adapter_with_onnxruntime(tmp_path):
    from apl_export.errors import ExportError
    from apl_export.exporter import ExportOptions, export_pipeline
    from apl_export.runtime_ort import ORTAPLPipeline
    from apl_export.specs import ShapeRange, ShapeRanges

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "sd")
    deep = get_peft_model(pipe.text_encoder, APLConfig(prefix_depth="deep"))
    with torch.no_grad():
        for name, param in prefix_parameters(deep).items():
            if name != "apl_prefix":
                param.add_(torch.randn_like(param))
    save_adapter(deep, tmp_path / "deep")
    ranges = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 16), width=ShapeRange(16, 16, 16))
    options = ExportOptions(ranges=ranges, exporter="torchscript")
    with pytest.raises(ExportError, match="deep prefix"):
        export_pipeline(
            tmp_path / "sd", tmp_path / "deep", tmp_path / "input", ExportOptions(ranges=ranges, prefix_mode="input")
        )
    assert not (tmp_path / "input").exists()
    out = export_pipeline(tmp_path / "sd", tmp_path / "deep", tmp_path / "onnx", options, progress=lambda s: None)
    manifest = json.loads((out / "apl_export.json").read_text())
    assert manifest["prefix_depth"] == "deep"
    text = manifest["models"]["text_encoder"]
    assert [i["name"] for i in text["inputs"]] == ["input_ids"]
    assert max(text["validation"]["max_abs_error"].values()) <= ATOL
    ort = ORTAPLPipeline.from_pretrained(tmp_path / "onnx")
    positive, negative = ort.encode_prompt(["a photo of Ann Lee"], [""])
    ids = pipe.tokenizer(["a photo of Ann Lee", ""], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = deep(input_ids=ids.input_ids[:1]).last_hidden_state
        with deep.disable_adapter():
            plain = deep(input_ids=ids.input_ids[1:]).last_hidden_state
    np.testing.assert_allclose(positive.numpy(), want.numpy(), atol=ATOL)
    np.testing.assert_allclose(negative.numpy(), plain.numpy(), atol=ATOL)


def test_apl_train_deep_and_resume_checks_the_depth(tmp_path):
    from apl_adapter.training import TrainConfig, train

    from .test_training_loop import toy_rows, write_data_folder

    base = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(base)
    data = tmp_path / "data"
    write_data_folder(data, toy_rows())
    common = dict(base=str(base), data=str(data), batch_size=2, lr=1e-2)
    result = train(TrainConfig(out=str(tmp_path / "run"), steps=2, prefix_depth="deep", **common), show_progress=False)
    tensors = check_adapter_folder(result.adapter_dir)
    start = get_peft_model(tiny_clip_text_model(), APLConfig(prefix_depth="deep"))
    moved = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    for name, param in prefix_parameters(start).items():
        assert (moved[name] - param.detach()).abs().max() > 1e-4, f"{name} was not trained"
    resumed = TrainConfig(out=str(tmp_path / "run"), steps=3, prefix_depth="deep", resume="latest", **common)
    assert train(resumed, show_progress=False).steps == 3
    with pytest.raises(APLAdapterError, match=r"prefix_depth \('deep' -> 'shallow'\)"):
        train(TrainConfig(out=str(tmp_path / "run"), steps=4, resume="latest", **common), show_progress=False)
    # and even when new settings are allowed, the checkpoint's tensors must fit the depth
    changed = TrainConfig(out=str(tmp_path / "run"), steps=4, resume="latest", resume_with_new_settings=True, **common)
    with pytest.raises(APLAdapterError, match="--prefix-depth differs"):
        train(changed, show_progress=False)
