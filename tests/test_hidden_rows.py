"""Hidden prefix rows (``APLConfig(hide_prefix_rows=True)``): the encoder's outputs drop the prefix's own rows.

The denoiser then sees ``[BOS][prompt][EOS][pad]`` (each prompt row computed behind the prefix, at the position the
plain encoder gives it) plus the last row ``m`` times, where the paper's layout shows it ``[BOS][P1..Pm][prompt]...``.
Every path that runs a prefix is checked against the hand-built reference (``tests/reference.py``, plain tensor math,
with the rows picked by index here) within 1e-5 in fp32: the hooked transformers forward (shallow and deep, with and
without a projection, dict and tuple outputs), the prefix K/V cache, PEFT save / load, ``apply_apl`` on SD and SDXL,
the export graphs (baked, prefix as input, the fast variant's graph, ONNX Runtime), ``apl-train`` and
``apl-adapter inspect``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from apl_adapter import APLAdapterError, APLConfig, save_adapter
from apl_adapter.cli import main as inspect_main
from apl_adapter.pipelines import apl_models, apply_apl, remove_apl
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline, tiny_sdxl_pipeline
from apl_adapter.training.objective import preservation_gap
from apl_adapter.tuners.apl.model import prefix_embedding_of, prefix_parameters
from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder
from apl_adapter.tuners.apl.serialization import check_adapter_folder

from .export_helpers import has_trt_builder
from .reference import reference_encode

ATOL = 1e-5  # fp32
M = 4


def _model(depth: str = "shallow", hide: bool = True, seed: int = 3, m: int = M, **kwargs) -> PeftModel:
    """An adapter whose tensors are moved away from their start, so every row matters."""
    config = APLConfig(num_virtual_tokens=m, prefix_depth=depth, hide_prefix_rows=hide)
    model = get_peft_model(tiny_clip_text_model(**kwargs), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in prefix_parameters(model).values():
            param.add_(torch.randn(param.shape, generator=generator))
    return model.eval()


def _kept_rows(length: int, m: int) -> list[int]:
    """The prefixed positions the hidden layout keeps, in order: BOS, the prompt's, then the last one ``m`` times."""
    return [0, *range(m + 1, length), *[length - 1] * m]


def _reference(model: PeftModel, ids: torch.Tensor):
    params = prefix_parameters(model)
    text_model = model.get_base_model()
    text_model = getattr(text_model, "text_model", text_model)
    return reference_encode(
        text_model, ids, params["apl_prefix"], params.get("apl_deep_keys"), params.get("apl_deep_values")
    )


def test_hidden_rows_are_off_by_default_add_no_tensors_and_t5_refuses_them():
    assert APLConfig().hide_prefix_rows is False
    shown = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=M))
    hidden = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=M, hide_prefix_rows=True))
    assert hidden.get_nb_trainable_parameters() == shown.get_nb_trainable_parameters()
    with pytest.raises(APLAdapterError, match=r"hide_prefix_rows.*T5"):
        APLConfig(text_encoder_type="t5", hide_prefix_rows=True)
    with pytest.raises(APLAdapterError, match="hide_prefix_rows must be True or False"):
        APLConfig(hide_prefix_rows="yes")


@pytest.mark.parametrize("depth", ["shallow", "deep"])
@pytest.mark.parametrize("with_projection", [False, True])
def test_hidden_forward_matches_the_hand_built_reference(prompt_ids, depth, with_projection):
    model = _model(depth, with_projection=with_projection, projection_dim=32)
    with torch.no_grad():
        out = model(input_ids=prompt_ids, output_hidden_states=True)
        ref_last, ref_pooled, ref_hidden = _reference(model, prompt_ids)
    rows = _kept_rows(ref_last.shape[1], M)
    assert out.last_hidden_state.shape == ref_last.shape == (4, 77, 32)
    torch.testing.assert_close(out.last_hidden_state, ref_last[:, rows], atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref_hidden)
    for got, want in zip(out.hidden_states, ref_hidden):
        torch.testing.assert_close(got, want[:, rows], atol=ATOL, rtol=0)
    if not with_projection:  # pooled at the shifted EOS, as without hiding
        torch.testing.assert_close(out.pooler_output, ref_pooled, atol=ATOL, rtol=0)
        as_tuple = model(input_ids=prompt_ids, output_hidden_states=True, return_dict=False)
        torch.testing.assert_close(as_tuple[0], out.last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(as_tuple[2][-2], out.hidden_states[-2], atol=0, rtol=0)
    with model.disable_adapter(), torch.no_grad():  # disabled: the plain encoder, nothing dropped
        plain = tiny_clip_text_model(with_projection=with_projection, projection_dim=32)(prompt_ids)
        torch.testing.assert_close(model(input_ids=prompt_ids).last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_cached_encoder_hides_the_rows_too(prompt_ids, use_kernel, depth):
    model = _model(depth)
    cached = CachedPrefixEncoder.from_adapter(model, use_kernel=use_kernel)
    with torch.no_grad():
        for _ in range(2):
            want = model(input_ids=prompt_ids, output_hidden_states=True)
            got = cached(prompt_ids, output_hidden_states=True)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
            prefix_parameters(model)["apl_prefix"].add_(0.5)  # an optimizer step must refresh the cache


def test_gradients_reach_the_prefix_through_the_prompt_rows_alone(prompt_ids):
    model = _model()
    prefix = prefix_parameters(model)["apl_prefix"]
    for encode in (model, CachedPrefixEncoder.from_adapter(model)):
        prefix.grad = None
        encode(input_ids=prompt_ids)[0][:, 1:2].square().mean().backward()  # the first prompt row only
        assert prefix.grad is not None and bool((prefix.grad.abs().sum(1) > 0).all())


def test_each_adapter_keeps_its_own_setting(prompt_ids):
    """A hidden and a shown adapter in one encoder: set_adapter, the cache and delete_adapter follow the active one."""
    shown, hidden = _model(hide=False, seed=5), _model(hide=True, seed=6)
    both = _model(hide=False, seed=5)
    both.add_adapter("hidden", APLConfig(num_virtual_tokens=M, hide_prefix_rows=True))
    with torch.no_grad():
        prefix_parameters(both, "hidden")["apl_prefix"].copy_(prefix_parameters(hidden)["apl_prefix"])
    cached = CachedPrefixEncoder.from_adapter(both)
    with torch.no_grad():
        for name, alone in (("hidden", hidden), ("default", shown), ("hidden", hidden)):
            both.set_adapter(name)
            want = alone(input_ids=prompt_ids).last_hidden_state
            torch.testing.assert_close(both(input_ids=prompt_ids).last_hidden_state, want, atol=ATOL, rtol=0)
            torch.testing.assert_close(cached(prompt_ids).last_hidden_state, want, atol=ATOL, rtol=0)
        both.delete_adapter("hidden")
        assert "hidden" not in prefix_embedding_of(both.get_base_model()).hide_rows
        want = shown(input_ids=prompt_ids).last_hidden_state
        torch.testing.assert_close(both(input_ids=prompt_ids).last_hidden_state, want, atol=ATOL, rtol=0)


def test_preservation_gap_reads_the_prompt_rows_where_each_layout_puts_them(prompt_ids):
    shown, hidden = _model(hide=False), _model(hide=True)  # the same seed: the same tensors
    with torch.no_grad():
        gap_shown = preservation_gap(shown, prompt_ids, shown(input_ids=prompt_ids)[0])
        gap_hidden = preservation_gap(hidden, prompt_ids, hidden(input_ids=prompt_ids)[0])
    assert gap_shown > 1e-3
    torch.testing.assert_close(gap_hidden, gap_shown, atol=1e-7, rtol=1e-5)


def test_save_load_inspect_and_a_bad_flag(tmp_path, prompt_ids, capsys):
    model = _model("deep")
    save_adapter(model, tmp_path / "hidden")
    check_adapter_folder(tmp_path / "hidden")
    config_path = tmp_path / "hidden" / "adapter_config.json"
    assert json.loads(config_path.read_text())["hide_prefix_rows"] is True
    loaded = PeftModel.from_pretrained(tiny_clip_text_model(), str(tmp_path / "hidden")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=prompt_ids).last_hidden_state, model(input_ids=prompt_ids).last_hidden_state
        )
    assert inspect_main(["inspect", str(tmp_path / "hidden")]) == 0
    assert "prefix rows: hidden" in capsys.readouterr().out
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hide_prefix_rows": "true"}))
    with pytest.raises(APLAdapterError, match="hide_prefix_rows must be true or false"):
        check_adapter_folder(tmp_path / "hidden")


def test_apply_apl_on_sd_and_sdxl_hides_the_rows(tmp_path, tokenizer):
    sd = tiny_sd_pipeline()
    save_adapter(_model(m=10), tmp_path / "hidden")
    ids = tokenizer("a photo of Ann Lee", padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = {}
    for use_cache in (True, False):
        apply_apl(sd, tmp_path / "hidden", use_prefix_cache=use_cache)
        with torch.no_grad():
            outs[use_cache] = sd.encode_prompt("a photo of Ann Lee", "cpu", 1, False)[0]
            encoder = apl_models(sd)["text_encoder"]
            direct = encoder(input_ids=ids).last_hidden_state
            ref_last, _, _ = _reference(encoder, ids)
        remove_apl(sd)
        torch.testing.assert_close(outs[use_cache], ref_last[:, _kept_rows(77, 10)], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[use_cache], direct, atol=ATOL, rtol=0)

    xl = tiny_sdxl_pipeline()
    second = _model(m=10, hidden_size=48, with_projection=True, projection_dim=48, pad_token_id=0, seed=4)
    save_adapter(second, tmp_path / "hidden-2")
    apply_apl(xl, tmp_path / "hidden", tmp_path / "hidden-2")
    ids_2 = xl.tokenizer_2("a photo of Ann Lee", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        prefixed = xl.encode_prompt("a photo of Ann Lee", device="cpu", do_classifier_free_guidance=False)
        encoder_2 = apl_models(xl)["text_encoder_2"]
        _, _, ref_hidden = _reference(encoder_2, ids_2)
    assert prefixed[0].shape == (1, 77, 80)
    torch.testing.assert_close(prefixed[0][..., 32:], ref_hidden[-2][:, _kept_rows(77, 10)], atol=ATOL, rtol=0)


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_export_graphs_hide_the_rows(prompt_ids, depth):
    from apl_export.modules import make_standard_text_encoder
    from apl_export.trt_plugin import FastCLIPTextEncoderGraph
    from apl_export.trt_plugin.fast_encoder import make_fast_text_encoder

    model = _model(depth)
    weights = prefix_embedding_of(model.get_base_model()).active_prefix_weights.detached()
    assert weights.hide_rows
    clip = model.get_base_model()
    graphs = [make_standard_text_encoder(clip, weights, False, M), FastCLIPTextEncoderGraph(clip, weights)]
    if depth == "shallow":  # a tensor prefix does not carry the flag: the makers take it
        fed = make_standard_text_encoder(clip, None, True, M, hide_rows=True)
        graphs += [lambda ids: fed(ids, weights.embeds), make_fast_text_encoder(clip, weights.embeds, False, M, True)]
    with torch.no_grad():
        want = model(input_ids=prompt_ids)
        for graph in graphs:
            last, pooled = graph(prompt_ids.to(torch.int32))
            torch.testing.assert_close(last, want.last_hidden_state, atol=ATOL, rtol=0)
            torch.testing.assert_close(pooled, want.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_apl_export_validates_a_hidden_rows_adapter_with_onnxruntime(tmp_path):
    from apl_export.errors import ExportError
    from apl_export.exporter import ExportOptions, export_pipeline
    from apl_export.runtime_ort import ORTAPLPipeline
    from apl_export.specs import ShapeRange, ShapeRanges

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "sd")
    hidden = get_peft_model(pipe.text_encoder, APLConfig(hide_prefix_rows=True))
    save_adapter(hidden, tmp_path / "hidden")
    ranges = ShapeRanges(batch=ShapeRange(1, 1, 2), height=ShapeRange(16, 16, 16), width=ShapeRange(16, 16, 16))
    ids = pipe.tokenizer(["a photo of Ann Lee"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = hidden(input_ids=ids.input_ids).last_hidden_state
    for mode in ("baked", "input"):
        # TensorRT-RTX builds engines on CPU where installed: the dropped rows are slices and a concat it must take
        options = ExportOptions(ranges=ranges, exporter="torchscript", prefix_mode=mode, trt=has_trt_builder())
        out = export_pipeline(tmp_path / "sd", tmp_path / "hidden", tmp_path / mode, options, progress=lambda s: None)
        manifest = json.loads((out / "apl_export.json").read_text())
        assert manifest["hide_prefix_rows"] is True
        assert max(manifest["models"]["text_encoder"]["validation"]["max_abs_error"].values()) <= ATOL
        if has_trt_builder():
            engine = manifest["engines"]["models"]["text_encoder"]
            assert (out / engine["path"]).stat().st_size == engine["bytes"] > 0
            assert engine["io"]["last_hidden_state"]["shape"] == [-1, 77, 32]
        runtime = ORTAPLPipeline.from_pretrained(out)
        positive, _ = runtime.encode_prompt(["a photo of Ann Lee"], [""])
        np.testing.assert_allclose(positive.numpy(), want.numpy(), atol=ATOL)
    # a prefix swapped into the input-mode export must agree with the graph on hiding its rows
    save_adapter(get_peft_model(tiny_sd_pipeline().text_encoder, APLConfig()), tmp_path / "shown")
    with pytest.raises(ExportError, match="hide_prefix_rows=False but this export"):
        runtime.set_prefix(tmp_path / "shown")
    runtime.set_prefix(tmp_path / "hidden")


def test_apl_train_hides_the_rows_and_saves_the_setting(tmp_path):
    from apl_adapter.training import TrainConfig, train

    from .test_training_loop import toy_rows, write_data_folder

    base = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(base)
    data = tmp_path / "data"
    write_data_folder(data, toy_rows())
    config = TrainConfig(
        base=str(base),
        data=str(data),
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=2,
        lr=1e-2,
        hide_prefix_rows=True,
        text_preserve=0.1,
    )
    result = train(config, show_progress=False)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["hide_prefix_rows"] is True
    assert config.recipe()["hide_prefix_rows"] is True
    assert "hide_prefix_rows" not in TrainConfig(base=str(base), data=str(data), out="x").recipe()
