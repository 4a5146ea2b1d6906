"""apl-train on Stable Diffusion 3 and FLUX.1: the flow-matching loss, prefix-only gradients, the CLI, the round trip
through load_apl, and what is refused. Tiny random pipelines of the real classes, tokenizers built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from PIL import Image
from safetensors.torch import load_file

from apl_adapter import APLAdapterError, APLConfig
from apl_adapter.families import FLUX, SD3
from apl_adapter.pipelines import apl_models, load_apl, unload_apl
from apl_adapter.testing import tiny_flux_pipeline, tiny_sd3_pipeline
from apl_adapter.training import TrainConfig, train
from apl_adapter.training.cli import main as apl_train_main
from apl_adapter.training.data import DataFormatError, write_data_folder
from apl_adapter.training.flow_loop import freeze
from apl_adapter.training.flow_models import FlowModel
from apl_adapter.training.flow_objective import (
    adapters_disabled,
    eps_from_velocity,
    flow_apl_loss,
    flow_noisy_latents,
    sample_noise_levels,
)
from apl_adapter.tuners.apl.model import prefix_parameters

from .test_training_loop import toy_rows

WINDOW = 32  # the T5 window: short keeps the runs fast; the prefix (M) and the toy prompts (spelled out) fit
M = 4
FAMILIES = {"sd3": (SD3, tiny_sd3_pipeline), "flux": (FLUX, tiny_flux_pipeline)}
C1 = ["a photo of Ann Lee", "a red cube on a table"]
C2 = ["a photo of a woman", "a red cube on a table"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 test cores are shared
    yield
    torch.set_num_threads(threads)


def _prefixed(name: str):
    """A tiny pipeline of the family, its FlowModel and an APL adapter (M vectors) on every text encoder."""
    family, make = FAMILIES[name]
    pipe = freeze(make())  # as apl-train loads it
    adapters = {
        attr: get_peft_model(getattr(pipe, attr), APLConfig(num_virtual_tokens=M, init_seed=i)).eval()
        for i, attr in enumerate(family.encoders)
    }
    return pipe, FlowModel.of(pipe, family, WINDOW, None), adapters


def _batch(pipe, seed: int = 0):
    """z0, noise ``(2, C, 16, 16)`` and one low and one high noise level."""
    generator = torch.Generator().manual_seed(seed)
    channels = pipe.vae.config.latent_channels
    z0, noise = torch.randn(2, 2, channels, 16, 16, generator=generator)
    sigmas = torch.tensor([0.2, 0.9])
    return z0, noise, sigmas, sigmas * 1000


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_velocity_loss_is_the_papers_eps_loss_under_the_change_of_variable(name):
    """The transformer predicts v; eps = z_t + (1 - sigma) v at the same z_t, so the paper's eps-space loss is the
    v-space loss with each example weighted by (1 - sigma)^2, and loss_space='eps' is exactly it."""
    pipe, model, adapters = _prefixed(name)
    z0, noise, sigmas, timesteps = _batch(pipe)
    noisy = flow_noisy_latents(z0, noise, sigmas)
    # the change of variable itself: the true velocity n - z0 gives back the true noise
    torch.testing.assert_close(eps_from_velocity(noisy, noise - z0, sigmas), noise, atol=1e-6, rtol=0)

    with torch.no_grad():
        v_prefixed = model.denoise(noisy, timesteps, model.encode(C1))
        with adapters_disabled(adapters.values()):
            v_target = model.denoise(noisy, timesteps, model.encode(C2))
        arguments = (model.encode, model.denoise, adapters.values(), noisy, sigmas, timesteps, C1, C2)
        loss_v, loss_eps = flow_apl_loss(*arguments, "v"), flow_apl_loss(*arguments, "eps")
    papers = F.mse_loss(eps_from_velocity(noisy, v_prefixed, sigmas), eps_from_velocity(noisy, v_target, sigmas))
    per_example_v = (v_prefixed - v_target).square().flatten(1).mean(1)
    torch.testing.assert_close(loss_v, F.mse_loss(v_prefixed, v_target), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss_eps, papers, rtol=1e-5, atol=0)
    torch.testing.assert_close(((1 - sigmas) ** 2 * per_example_v).mean(), papers, rtol=1e-5, atol=0)
    assert papers.item() > 1e-8, "a random prefix changes the prediction"
    assert loss_v.item() > 2 * loss_eps.item(), "sigma = 0.9 counts 0.01x in eps space"


def test_noise_levels_come_from_the_schedulers_training_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    generator = torch.Generator().manual_seed(0)
    sigmas, timesteps = sample_noise_levels(scheduler, 4000, generator, "logit_normal")
    assert torch.equal(timesteps, sigmas * 1000) and bool(torch.isin(sigmas, scheduler.sigmas).all())
    uniform, _ = sample_noise_levels(scheduler, 4000, generator, "uniform")
    # shift 3 moves the uniform grid toward noise; the logit-normal density gathers around the middle of u
    assert uniform.median() > 0.7 and (uniform - 0.75).abs().median() > (sigmas - 0.75).abs().median()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="fresh scheduler"):
        sample_noise_levels(scheduler, 1, generator)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_step_moves_the_prefixes_only_and_the_loss_falls_with_fixed_data(name):
    pipe, model, adapters = _prefixed(name)
    frozen = {
        attr: {k: v.clone() for k, v in getattr(pipe, attr).state_dict().items() if "apl_" not in k}
        for attr in ("transformer", "vae", *adapters)
    }
    prefixes = [p for a in adapters.values() for p in prefix_parameters(a).values()]
    z0, noise, sigmas, timesteps = _batch(pipe, seed=1)
    noisy = flow_noisy_latents(z0, noise, sigmas)

    def loss():
        return flow_apl_loss(model.encode, model.denoise, adapters.values(), noisy, sigmas, timesteps, C1, C2, "v")

    optimizer = torch.optim.Adam(prefixes, lr=0.05)
    first = loss()
    first.backward()
    with_grad = [n for attr in frozen for n, p in getattr(pipe, attr).named_parameters() if p.grad is not None]
    assert with_grad and all("apl_prefix" in n for n in with_grad), with_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefixes), "every encoder's prefix learns"
    before = [p.detach().clone() for p in prefixes]
    for _ in range(12):
        optimizer.step()
        optimizer.zero_grad()
        last = loss()
        last.backward()
    assert last.item() < 0.5 * first.item(), (first.item(), last.item())
    assert all(not torch.equal(p, b) for p, b in zip(prefixes, before))
    for attr, state in frozen.items():
        now = getattr(pipe, attr).state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items()), f"{attr} changed"
    # the control: without a step the same batch gives the same loss, so the fall above is the prefixes' doing
    torch.testing.assert_close(loss(), loss(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-train")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux", "data": write_data_folder(root / "data", toy_rows())}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_apl_train_cli_trains_every_encoder_and_load_apl_applies_them(folders, tmp_path, name, capsys):
    family, make = FAMILIES[name]
    out = tmp_path / "run"
    argv = ["--base", str(folders[name]), "--data", str(folders["data"]), "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--prefix-len", str(M), "--max-sequence-length", str(WINDOW),
            "--report-to", "none"] + (["--mixed-precision", "bf16"] if name == "flux" else [])  # fmt: skip
    assert apl_train_main(argv) == 0
    assert "adapter saved to" in capsys.readouterr().out
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted(family.encoders)
    config = json.loads((adapter / family.encoders[-1] / "adapter_config.json").read_text())
    assert config["text_encoder_type"] == "t5" and config["num_virtual_tokens"] == M
    assert len(json.loads((out / "train_config.json").read_text())) > 10 and (out / "loss.csv").is_file()
    assert apl_train_main(argv) == 2  # the run is kept; the advice has no --resume (no SD3 / FLUX checkpoints yet)
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "Choose a new --out" in err and "--resume" not in err

    pipe, plain = make(), make()
    load_apl(pipe, adapter)  # the pipeline layout: every encoder's prefix at once
    assert sorted(apl_models(pipe)) == sorted(family.encoders)
    for attr, model in apl_models(pipe).items():
        (tensor,) = load_file(adapter / attr / "adapter_model.safetensors").values()
        # FLUX trained in bf16 (its weights loaded so): the prefixes are fp32 all the same
        assert tensor.dtype == torch.float32 and torch.equal(prefix_parameters(model)["apl_prefix"].detach(), tensor)
    with torch.no_grad():  # through the pipelines' encode_prompt: the loaded one is apply_apl's
        prefixed, unprefixed = (FlowModel.of(p, family, WINDOW, None).encode(C1)[0] for p in (pipe, plain))
    assert prefixed.shape == unprefixed.shape and (prefixed - unprefixed).abs().max() > 1e-4
    unload_apl(pipe)


def test_apl_train_trains_the_chosen_encoders_only_with_the_other_settings(folders, tmp_path):
    config = TrainConfig(
        base=str(folders["sd3"]), data=str(folders["data"]), out=str(tmp_path / "run"), steps=1, prefix_len=M,
        max_sequence_length=WINDOW, encoders=["text_encoder_3"], loss_space="v", timestep_density="uniform",
        latent_mode="mean", gradient_checkpointing=True, report_to="none",
    )  # fmt: skip
    result = train(config, show_progress=False)
    assert [p.name for p in result.adapter_dir.iterdir()] == ["text_encoder_3"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["encoders"] == ["text_encoder_3"]


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("sd3", {"identity_push": 0.3}, r"3 / 3.5 folder.*not implement: --identity-push: the identity push"),
        ("flux", {"prefix_depth": "deep"}, r"FLUX.1 folder.*--prefix-depth: a deep prefix"),
        ("flux", {"resume": "latest"}, r"--resume: resuming"),
        ("sd3", {"text_preserve": 0.1}, r"--text-preserve: the text preservation term"),
        ("flux", {"text_name_direction": 0.1}, r"--text-name-direction: the text name-direction term"),
        ("sd3", {"guidance": 3.5}, r"--guidance 3.5: .*guidance-distilled FLUX models \(FLUX.1-dev\) only"),
        ("sd3", {"encoders": ["text_encoder_4"]}, r"text_encoder, text_encoder_2, text_encoder_3 \(unknown: text_en"),
        ("flux", {"encoders": ["text_encoder_3"]}, r"FLUX.1's text encoders are text_encoder, text_encoder_2"),
    ],
)
def test_what_flow_training_does_not_do_fails_naming_it(folders, tmp_path, name, settings, message):
    config = TrainConfig(
        base=str(folders[name]), data=str(folders["data"]), out=str(tmp_path / "run"), steps=1, report_to="none",
        **settings,
    )  # fmt: skip
    with pytest.raises(APLAdapterError, match=message):
        train(config, show_progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_flow_only_options_on_an_sd_folder_and_bad_image_sizes_fail_naming_them(folders, tmp_path, tokenizer):
    from apl_adapter.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    config = TrainConfig(
        base=str(tmp_path / "sd"), data=str(folders["data"]), out=str(tmp_path / "run"), guidance=3.5,
        encoders=["text_encoder_2"], report_to="none",
    )  # fmt: skip
    with pytest.raises(APLAdapterError, match=r"--guidance, --encoders: for SD3 / FLUX folders only"):
        train(config, show_progress=False)

    odd = write_data_folder(
        tmp_path / "odd",
        [(Image.fromarray(np.zeros((15, 15, 3), np.uint8)), {"kind": kind, "c1": "a", "c2": "a"})
         for kind in ("identity", "preservation")],
    )  # fmt: skip
    config = TrainConfig(base=str(folders["flux"]), data=str(odd), out=str(tmp_path / "run2"), report_to="none")
    with pytest.raises(DataFormatError, match=r"15x15; FLUX.1 needs sides that are a multiple of 2.*--resolution"):
        train(config, show_progress=False)


def test_generate_identity_data_refuses_flow_folders_by_name(folders, tmp_path):
    from apl_adapter.training.generate import generate_identity_data, read_identity_file

    names = tmp_path / "names.tsv"
    names.write_text("Ann Lee\ta photo of a woman\n")
    with pytest.raises(APLAdapterError, match=r"FluxPipeline.*apl-train generate-identity-data handles Stable Diff"):
        generate_identity_data(folders["flux"], read_identity_file(names), tmp_path / "out", per_name=1)
    assert not Path(tmp_path / "out").exists()
