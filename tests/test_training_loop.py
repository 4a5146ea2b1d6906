"""APL training on a tiny real SD pipeline: the loss by hand, gradients, resume, Accelerate multi-process."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from safetensors.torch import load_file

from apl_adapter import APLConfig
from apl_adapter.errors import APLAdapterError
from apl_adapter.testing import tiny_sd_pipeline, tiny_unet
from apl_adapter.training import TrainConfig, apl_loss, train
from apl_adapter.training.data import DataFormatError, read_metadata, write_data_folder
from apl_adapter.training.loop import lr_scheduler, tokenize
from apl_adapter.training.objective import noisy_latents
from apl_adapter.tuners.apl.prefix import clip_eos_token_id, insert_prefix_ids

from .reference import reference_encode


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine's 2 cores are shared; one thread avoids OpenMP spin-waiting against other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def toy_rows(count: int = 8, size: int = 16, seed: int = 0) -> list[tuple[Image.Image, dict]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        if index % 2:
            fields = {"kind": "identity", "c1": "a photo of Zorvan Kelt", "c2": "a photo of a man", "identity": "Z K"}
        else:
            fields = {"kind": "preservation", "c1": "a red star on white", "c2": "a red star on white"}
        rows.append((image, fields))
    return rows


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return write_data_folder(tmp_path_factory.mktemp("train") / "data", toy_rows())


def test_loss_matches_hand_computation(tokenizer):
    """The loss equals MSE(eps(z_t, t, [AP]+c1), eps(z_t, t, c2)) computed with the hand-built encoder and DDPM math."""
    pipe = tiny_sd_pipeline()
    encoder = get_peft_model(pipe.text_encoder, APLConfig(num_virtual_tokens=3))
    prefix = encoder.base_model.model.embeddings.apl_prefix["default"]
    c1 = tokenize(tokenizer, ["a photo of Zorvan Kelt", "a red star on white"])
    c2 = tokenize(tokenizer, ["a photo of a man", "a red star on white"])
    generator = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loss = apl_loss(pipe.unet, encoder, noisy_latents(scheduler, z0, noise, t), t, c1, c2)

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    text_model = encoder.base_model.model
    with torch.no_grad():
        prefixed = reference_encode(text_model, c1, prefix.detach())[0]
        plain = reference_encode(text_model, c2, None)[0]
        expected = ((pipe.unet(z_t, t, prefixed).sample - pipe.unet(z_t, t, plain).sample) ** 2).mean()
    assert loss.item() > 1e-6  # a random prefix changes the prediction
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)


def test_v_space_loss_is_the_mse_of_velocities(tokenizer):
    """loss_space='v' equals MSE(v(AP+c1), v(c2)), each v built from its eps prediction with the scheduler's own
    get_velocity (x0 recovered from z_t): large t weighs 1/alpha_bar_t times what the eps loss gives it."""
    from diffusers import DDPMScheduler

    pipe = tiny_sd_pipeline()
    encoder = get_peft_model(pipe.text_encoder, APLConfig(num_virtual_tokens=3))
    c1 = tokenize(tokenizer, ["a photo of Zorvan Kelt", "a red star on white"])
    c2 = tokenize(tokenizer, ["a photo of a man", "a red star on white"])
    generator = torch.Generator().manual_seed(2)
    z0, noise = torch.randn(2, 2, 4, 8, 8, generator=generator)
    t = torch.tensor([20, 980])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    z_t = noisy_latents(scheduler, z0, noise, t)
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, loss_space="v", alphas_cumprod=scheduler.alphas_cumprod)

    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps_prefixed = pipe.unet(z_t, t, encoder(input_ids=c1)[0]).sample
        with encoder.disable_adapter():
            eps_target = pipe.unet(z_t, t, encoder(input_ids=c2)[0]).sample

    def velocity(eps):
        x0 = (z_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return scheduler.get_velocity(x0, eps, t)

    per_sample = (velocity(eps_prefixed) - velocity(eps_target)).square().flatten(1).mean(1)
    torch.testing.assert_close(loss.detach(), per_sample.mean(), rtol=1e-3, atol=1e-7)
    eps_loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2).detach()
    assert loss.item() > 10 * eps_loss.item()  # t = 980 (alpha_bar ~ 0.005) dominates
    with pytest.raises(ValueError, match="alphas_cumprod"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, loss_space="v")


def test_pushed_and_boosted_identity_targets_and_untouched_preservation_target(tokenizer):
    """push=eta: an identity row's target is eps(c2) - eta (eps(c1) - eps(c2)); a preservation row's stays eps(c2)."""
    pipe = tiny_sd_pipeline()
    encoder = get_peft_model(pipe.text_encoder, APLConfig(num_virtual_tokens=3))
    c1 = tokenize(tokenizer, ["a photo of Zorvan Kelt", "a red star on white"])
    c2 = tokenize(tokenizer, ["a photo of a man", "a red star on white"])
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        prefixed = pipe.unet(z_t, t, encoder(input_ids=c1)[0]).sample
        with encoder.disable_adapter():
            plain = pipe.unet(z_t, t, encoder(input_ids=c1)[0]).sample
            target = pipe.unet(z_t, t, encoder(input_ids=c2)[0]).sample

    def pushed_by(step: torch.Tensor) -> torch.Tensor:
        """The targets with the identity row's moved by ``-step``, the preservation row's left at eps(c2)."""
        moved = target.clone()
        moved[0] = target[0] - step
        return moved

    def with_share_term(weight: float, share: torch.Tensor, eta: float, step: torch.Tensor) -> torch.Tensor:
        """The loss pushed by ``eta * step`` plus a share term ``weight * (share + eta)^2`` (the pushed target's own
        share is -eta)."""
        return (prefixed - pushed_by(eta * step)).square().mean() + weight * (share + eta) ** 2

    for eta in (0.0, 0.5, 2.0):
        pushed = pushed_by(eta * (plain[0] - target[0]))
        expected = (prefixed - pushed).square().mean()
        loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=eta).detach()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    only_scene = apl_loss(pipe.unet, encoder, z_t[1:], t[1:], c1[1:], c2[1:], push=2.0).detach()
    torch.testing.assert_close(only_scene, (prefixed[1:] - target[1:]).square().mean(), rtol=1e-4, atol=1e-7)
    # boost=beta: the identity target also gains beta (eps(c2) - eps('')); the preservation target stays eps(c2)
    empty = tokenize(tokenizer, [""])
    with torch.no_grad(), encoder.disable_adapter():
        unconditional = pipe.unet(z_t, t, encoder(input_ids=empty.expand(2, -1))[0]).sample
    moved = target.clone()
    moved[0] = target[0] - 0.3 * (plain[0] - target[0]) + 0.7 * (target[0] - unconditional[0])
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.3, boost=0.7, empty_ids=empty).detach()
    torch.testing.assert_close(loss, (prefixed - moved).square().mean(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="empty_ids"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, boost=0.7)
    # push_ids: the push moves away from eps(name + description) instead of eps(c1); preservation rows untouched
    source = tokenize(tokenizer, ["a photo of Zorvan Kelt, a man", "a red star on white"])
    with torch.no_grad(), encoder.disable_adapter():
        named_described = pipe.unet(z_t, t, encoder(input_ids=source)[0]).sample
    moved = target.clone()
    moved[0] = target[0] - 0.5 * (named_described[0] - target[0])
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.5, push_ids=source).detach()
    torch.testing.assert_close(loss, (prefixed - moved).square().mean(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(named_described[0], plain[0])  # the two push sources are different targets
    # text_match=lambda: + lambda * mean ||tau([AP] + c1) - tau(c2)||^2 over the identity row only
    with torch.no_grad():
        prefixed_states = encoder(input_ids=c1)[0]
        with encoder.disable_adapter():
            described_states = encoder(input_ids=c2)[0]
    gap = (prefixed_states[0] - described_states[0]).square().mean()
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, text_match=0.25).detach()
    torch.testing.assert_close(loss, (prefixed - target).square().mean() + 0.25 * gap, rtol=1e-4, atol=1e-7)
    assert gap > 1e-3  # the term is not vanishing in this check
    # direction=lambda: + lambda * (r - r*)^2 on the identity row, r = <prefixed - target_c2, d> / ||d||^2 with
    # d = eps(c1) - eps(c2), and r* = -push (the pushed target's own share of d)
    d = (plain[0] - target[0]).flatten()
    share = ((prefixed[0] - target[0]).flatten() @ d) / (d @ d)
    for eta in (0.0, 0.3):
        expected = with_share_term(0.2, share, eta, plain[0] - target[0])
        loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=eta, direction=0.2).detach()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert abs(share) > 1e-2  # the term is not vanishing in this check
    # guidance_relative=lambda: + lambda * ||prefixed - target||^2 / ||eps(c2) - eps('')||^2 on the identity row only
    pushed = pushed_by(0.3 * (plain[0] - target[0]))
    relative = (prefixed[0] - pushed[0]).square().sum() / (target[0] - unconditional[0]).square().sum()
    expected = (prefixed - pushed).square().mean() + 0.05 * relative
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.3, guidance_relative=0.05, empty_ids=empty).detach()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert relative > 1e-2  # the term is not vanishing in this check
    with pytest.raises(ValueError, match="empty_ids"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, guidance_relative=0.05)
    # attribute_hold=lambda: + lambda * mean_k s_k^2 on the identity row, s_k = <prefixed - eps(c2), a_k> / ||a_k||^2,
    # a_k = eps(c2) - mean of eps(c2 with attribute k changed); the preservation row's contrasts are padding (-1)
    changed = ["a photo of a woman", "a photo of a tall man", "a photo of a short man"]
    contrast_ids = torch.stack([tokenize(tokenizer, changed), tokenize(tokenizer, ["a red star on white"] * 3)])
    contrast_groups = torch.tensor([[0, 1, 1], [-1, -1, -1]])
    with torch.no_grad(), encoder.disable_adapter():
        eps_changed = pipe.unet(z_t[:1].expand(3, -1, -1, -1), t[:1].expand(3), encoder(input_ids=contrast_ids[0])[0])
    pulls = [target[0] - eps_changed.sample[0], target[0] - eps_changed.sample[1:].mean(dim=0)]
    shares = torch.stack([((prefixed[0] - target[0]) * a).sum() / a.square().sum() for a in pulls])
    expected = (prefixed - target).square().mean() + 0.5 * shares.square().mean()
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, attribute_hold=0.5, contrast_ids=contrast_ids,
                    contrast_groups=contrast_groups).detach()  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert shares.abs().min() > 1e-3  # the term is not vanishing in this check
    with pytest.raises(ValueError, match="contrast_ids"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, attribute_hold=0.5)
    # push_without_attributes: the push direction loses its least-squares part in the span of the pulls a_k,
    # d' = d - A^T (A A^T)^-1 A d, and the target is eps(c2) - eta d'; the preservation row's target stays eps(c2)
    d = (plain[0] - target[0]).flatten()
    basis = torch.stack([a.flatten() for a in pulls])  # (2, D)
    projected = d - basis.T @ torch.linalg.solve(basis @ basis.T, basis @ d)
    assert (basis @ projected).abs().max() < 1e-4 * d.norm()  # no part of it along any pull
    assert (projected - d).norm() > 1e-3 * d.norm()  # and the projection changed something in this check
    pushed = pushed_by(0.3 * projected.view_as(target[0]))
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.3, push_without_attributes=True,
                    contrast_ids=contrast_ids, contrast_groups=contrast_groups).detach()  # fmt: skip
    torch.testing.assert_close(loss, (prefixed - pushed).square().mean(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="contrast_ids"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.3, push_without_attributes=True)
    # text_attribute_hold=lambda: attribute_hold's term in the encoder's output, b_k = m(tau(c2)) - mean m(tau(c2 with
    # attribute k changed)) with m the mean over positions, s_k = <m(tau([AP] + c1)) - m(tau(c2)), b_k> / ||b_k||^2
    with torch.no_grad(), encoder.disable_adapter():
        changed_summaries = encoder(input_ids=contrast_ids[0])[0].mean(dim=1)  # (3, D)
    described_summary = described_states[0].mean(dim=0)
    text_pulls = [described_summary - changed_summaries[0], described_summary - changed_summaries[1:].mean(dim=0)]
    lost = prefixed_states[0].mean(dim=0) - described_summary
    text_shares = torch.stack([(lost @ b) / (b @ b) for b in text_pulls])
    expected = (prefixed - target).square().mean() + 0.5 * text_shares.square().mean()
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, text_attribute_hold=0.5, contrast_ids=contrast_ids,
                    contrast_groups=contrast_groups).detach()  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert text_shares.abs().min() > 1e-3  # the term is not vanishing in this check
    with pytest.raises(ValueError, match="contrast_ids"):
        apl_loss(pipe.unet, encoder, z_t, t, c1, c2, text_attribute_hold=0.5)
    # text_preserve=lambda: + lambda * mean ||tau([AP] + c)[m+1:] - tau_m(c)[1:L-m]||^2 over the preservation row only,
    # tau_m the plain encoder with the prompt at positions 1+m.. (here m = 3; BOS keeps position 0)
    m, length = 3, c1.shape[1]
    shifted = torch.tensor([[0] + [min(j + m, length - 1) for j in range(1, length)]])
    with torch.no_grad(), encoder.disable_adapter():
        moved_plain = encoder.base_model.model(input_ids=c1[1:], position_ids=shifted)[0]
    kept = (prefixed_states[1, m + 1 :] - moved_plain[0, 1 : length - m]).square().mean()
    # the alignment itself, from the layout's own code: prefixed position m + j holds the prompt's token j
    laid_out = insert_prefix_ids(c1[1:], m, clip_eos_token_id(pipe.text_encoder.config))
    assert torch.equal(laid_out[0, m + 1 :], c1[1, 1 : length - m])  # a short caption: only padding is cut
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, text_preserve=0.5).detach()
    torch.testing.assert_close(loss, (prefixed - target).square().mean() + 0.5 * kept, rtol=1e-4, atol=1e-7)
    assert kept > 1e-3  # the term is not vanishing in this check
    with torch.no_grad(), encoder.disable_adapter():
        unshifted = encoder(input_ids=c1[1:])[0]
    assert (prefixed_states[1, m + 1 :] - unshifted[0, 1 : length - m]).square().mean() > kept  # positions matter
    identity_only = apl_loss(pipe.unet, encoder, z_t[:1], t[:1], c1[:1], c2[:1], text_preserve=0.5).detach()
    torch.testing.assert_close(identity_only, (prefixed[:1] - target[:1]).square().mean(), rtol=1e-4, atol=1e-7)
    # text_direction=lambda: direction's term in the encoder's output, d = m(tau(c1)) - m(tau(c2)) (m the mean over
    # positions), r = <m(tau([AP] + c1)) - m(tau(c2)), d> / ||d||^2 on the identity row, + lambda * (r + push)^2
    with torch.no_grad(), encoder.disable_adapter():
        name_summary = encoder(input_ids=c1[:1])[0][0].mean(dim=0)
    text_d = name_summary - described_summary
    text_share = (lost @ text_d) / (text_d @ text_d)
    for eta in (0.0, 0.3):
        expected = with_share_term(0.5, text_share, eta, plain[0] - target[0])
        loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=eta, text_direction=0.5).detach()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert abs(text_share) > 1e-2  # the term is not vanishing in this check
    # with push_without_attributes the text pulls b_k leave d (least squares) and the UNet push loses the a_k
    text_basis = torch.stack(text_pulls)  # (2, D)
    text_projected = text_d - text_basis.T @ torch.linalg.solve(text_basis @ text_basis.T, text_basis @ text_d)
    assert (text_projected - text_d).norm() > 1e-3 * text_d.norm()  # the projection changes something here
    projected_share = (lost @ text_projected) / (text_projected @ text_projected)
    expected = with_share_term(0.5, projected_share, 0.3, projected.view_as(target[0]))
    loss = apl_loss(pipe.unet, encoder, z_t, t, c1, c2, push=0.3, push_without_attributes=True, text_direction=0.5,
                    contrast_ids=contrast_ids, contrast_groups=contrast_groups).detach()  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_gradient_reaches_only_the_prefix(tokenizer):
    pipe = tiny_sd_pipeline()
    for module in (pipe.unet, pipe.vae):
        module.requires_grad_(False)
    encoder = get_peft_model(pipe.text_encoder, APLConfig(num_virtual_tokens=3))
    ids = tokenize(tokenizer, ["a photo of Zorvan Kelt"])
    loss = apl_loss(pipe.unet, encoder, torch.randn(1, 4, 8, 8), torch.tensor([500]), ids, tokenize(tokenizer, [""]))
    loss.backward()
    with_grad = [name for name, p in encoder.named_parameters() if p.grad is not None]
    assert with_grad == ["base_model.model.embeddings.apl_prefix.default"]
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert encoder.base_model.model.embeddings.apl_prefix["default"].grad.abs().sum() > 0


def _prefix(folder: Path) -> torch.Tensor:
    return next(v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "apl_prefix" in k)


def test_training_lowers_loss_and_writes_run_folder(base_folder, data_folder, tmp_path):
    config = TrainConfig(
        base=str(base_folder), data=str(data_folder), out=str(tmp_path / "run"), steps=40, batch_size=4, lr=3e-2
    )
    result = train(config, show_progress=False)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-40" / "optimizer.safetensors").is_file()
    assert (tmp_path / "run" / "loss.csv").read_text().count("\n") == 41


def test_resume_gives_the_same_prefix_as_an_uninterrupted_run(base_folder, data_folder, tmp_path):
    common = {"base": str(base_folder), "data": str(data_folder), "batch_size": 2, "lr": 1e-2}
    full = train(TrainConfig(out=str(tmp_path / "full"), steps=6, **common), show_progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=3, **common), show_progress=False)
    resumed = train(TrainConfig(out=str(tmp_path / "split"), steps=6, resume="latest", **common), show_progress=False)
    torch.testing.assert_close(_prefix(resumed.adapter_dir), _prefix(full.adapter_dir), rtol=0, atol=1e-6)
    assert [step for step, _ in resumed.losses] == list(range(1, 7))
    # and a different seed really gives a different prefix (the comparison above can fail)
    other = train(TrainConfig(out=str(tmp_path / "other"), steps=6, seed=1, **common), show_progress=False)
    assert not torch.allclose(_prefix(other.adapter_dir), _prefix(full.adapter_dir))


def test_interrupted_cosine_run_resumes_on_its_schedule(base_folder, data_folder, tmp_path):
    # the schedule runs over --steps, so an interrupted run resumes with the same --steps it was started with
    common = {"base": str(base_folder), "data": str(data_folder), "batch_size": 2, "lr": 1e-2, "steps": 6}
    full = train(
        TrainConfig(out=str(tmp_path / "full"), lr_schedule="cosine", checkpoint_every=3, **common), show_progress=False
    )
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")  # killed after step 3
    resumed = train(
        TrainConfig(out=str(tmp_path / "cut"), lr_schedule="cosine", resume="latest", **common), show_progress=False
    )
    torch.testing.assert_close(_prefix(resumed.adapter_dir), _prefix(full.adapter_dir), rtol=0, atol=1e-6)


def _rates(config: TrainConfig, start_step: int = 0) -> list[float]:
    """The learning rate of every step from ``start_step`` on, as the training loop steps its schedule."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = lr_scheduler(config, optimizer, start_step)
    rates = []
    for _ in range(start_step, config.steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def test_cosine_schedule_decays_from_lr_to_zero_and_changes_the_result(base_folder, data_folder, tmp_path):
    config = TrainConfig(base="b", data="d", out="o", steps=10, lr=1e-2, lr_schedule="cosine")
    rates = _rates(config)
    assert rates[0] == pytest.approx(1e-2) and rates[5] == pytest.approx(5e-3)
    assert rates[9] == pytest.approx(5e-3 * (1 + math.cos(0.9 * math.pi)))
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert _rates(config, start_step=6) == pytest.approx(rates[6:])  # a resumed run is placed on its schedule
    assert _rates(TrainConfig(base="b", data="d", out="o", steps=10, lr=1e-2)) == pytest.approx([1e-2] * 10)
    warm = _rates(
        TrainConfig(
            base="b", data="d", out="o", steps=10, lr=1e-2, lr_schedule="constant_with_warmup", lr_warmup_steps=4
        )
    )
    assert warm[:5] == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2]) and warm[9] == pytest.approx(1e-2)
    with pytest.raises(APLAdapterError, match="lr_warmup_steps"):
        TrainConfig(base="b", data="d", out="o", steps=10, lr_schedule="cosine", lr_warmup_steps=10)
    with pytest.raises(APLAdapterError, match="constant_with_warmup"):  # 'constant' has no warm-up: not a no-op
        TrainConfig(base="b", data="d", out="o", steps=10, lr_warmup_steps=2)
    with pytest.raises(APLAdapterError, match="lr_schedule must be one of"):
        TrainConfig(base="b", data="d", out="o", lr_schedule="cyclic")
    common = {"base": str(base_folder), "data": str(data_folder), "batch_size": 2, "lr": 1e-2, "steps": 4}
    constant = train(TrainConfig(out=str(tmp_path / "constant"), **common), show_progress=False)
    cosine = train(TrainConfig(out=str(tmp_path / "cosine"), lr_schedule="cosine", **common), show_progress=False)
    assert not torch.allclose(_prefix(cosine.adapter_dir), _prefix(constant.adapter_dir))


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(base_folder, data_folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "apl_adapter.training.cli",
        "--base", str(base_folder), "--data", str(data_folder), "--out", str(out), "--steps", "3", "--batch-size", "2",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.csv").read_text().count("\n") == 4


def test_gradient_checkpointing_gives_the_same_prefix_and_bf16_runs(base_folder, data_folder, tmp_path):
    common = {"base": str(base_folder), "data": str(data_folder), "batch_size": 2, "lr": 1e-2, "steps": 3}
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common), show_progress=False)
    checkpointed = train(
        TrainConfig(out=str(tmp_path / "gc"), gradient_checkpointing=True, **common), show_progress=False
    )
    torch.testing.assert_close(_prefix(checkpointed.adapter_dir), _prefix(plain.adapter_dir), rtol=1e-5, atol=1e-6)
    bf16 = train(TrainConfig(out=str(tmp_path / "bf16"), mixed_precision="bf16", **common), show_progress=False)
    assert math.isfinite(bf16.final_loss)
    assert not torch.equal(_prefix(bf16.adapter_dir), _prefix(plain.adapter_dir))  # autocast really ran


def test_training_through_more_unets_takes_the_mean_of_their_losses(base_folder, data_folder, tmp_path):
    common = {"data": str(data_folder), "batch_size": 4, "lr": 1e-2}
    # a second base: the same text encoder, tokenizer and VAE, another UNet (as a fine-tune of the base would be)
    other_base = tmp_path / "other-base"
    shutil.copytree(base_folder, other_base)
    tiny_unet(seed=7).save_pretrained(other_base / "unet")
    first = {}
    for name, base, extra in [("one", base_folder, []), ("other", other_base, []), ("both", base_folder, [other_base])]:
        through = [str(folder) for folder in extra]
        config = TrainConfig(base=str(base), out=str(tmp_path / name), steps=1, also_through=through, **common)
        first[name] = train(config, show_progress=False).losses[0][1]
    # the same batch, noise and prefix init: the first step's loss is the mean of the two UNets' losses
    assert first["both"] == pytest.approx((first["one"] + first["other"]) / 2, rel=1e-5)
    assert abs(first["one"] - first["other"]) > 1e-3 * first["one"]  # the two losses really differ
    # the base UNet twice (given as a bare UNet folder): the mean of two equal losses, so the same prefix
    common["base"], common["steps"] = str(base_folder), 3
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common), show_progress=False)
    twice_config = TrainConfig(out=str(tmp_path / "twice"), also_through=[str(base_folder / "unet")], **common)
    twice = train(twice_config, show_progress=False)
    torch.testing.assert_close(_prefix(twice.adapter_dir), _prefix(plain.adapter_dir), rtol=1e-5, atol=1e-6)
    card = (twice.adapter_dir / "README.md").read_text()
    assert "| also_through | ['unet'] |" in card and str(tmp_path) not in card  # by name, never a local path
    assert "also_through" not in (plain.adapter_dir / "README.md").read_text()


def test_checkpoint_limit_and_validation_images_without_and_with_the_prefix(base_folder, data_folder, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    prompts = ["a photo of Zorvan Kelt", "a red star on white"]
    config = TrainConfig(
        base=str(base_folder), data=str(data_folder), out=str(tmp_path / "run"), steps=4, batch_size=2, lr=1e-2,
        checkpoint_every=1, checkpoints_total_limit=2, validation_prompts=prompts, validation_every=3,
    )  # fmt: skip
    result = train(config, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-3.png", "step-4.png"]
    assert "validation_prompts" not in (result.adapter_dir / "README.md").read_text()  # bookkeeping, not recipe
    grid = np.asarray(Image.open(tmp_path / "run" / "validation" / "step-4.png").convert("RGB"))
    assert grid.shape == (2 * 128, 2 * 128, 3)  # 16-pixel images, each cell scaled up to 128
    cells = [[grid[r * 128 : (r + 1) * 128 : 8, c * 128 : (c + 1) * 128 : 8] for c in range(2)] for r in range(2)]
    # the left column is the plain model from the same seed; the right one differs where the prefix acts
    pipe = StableDiffusionPipeline.from_pretrained(base_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for k, prompt in enumerate(prompts):
        expected = pipe(prompt, num_inference_steps=20, guidance_scale=7.0, output_type="np",
                        generator=torch.Generator().manual_seed(config.seed + k)).images[0]  # fmt: skip
        assert np.abs(cells[k][0].astype(float) - np.round(expected * 255)).max() <= 1, prompt
    assert np.abs(cells[0][1].astype(float) - cells[0][0].astype(float)).mean() > 1.0


def test_push_to_hub_refused_offline_before_training_and_a_failed_upload_keeps_the_adapter(
    base_folder, data_folder, tmp_path
):
    common = ["--base", str(base_folder), "--data", str(data_folder), "--steps", "2", "--batch-size", "2"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "apl_adapter.training.cli", *common]
    done = subprocess.run([*command, "--out", str(tmp_path / "off"), "--push-to-hub", "me/apl"], env=offline,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "HF_HUB_OFFLINE is set" in done.stderr
    assert not (tmp_path / "off").exists()  # refused before anything was trained or written
    with pytest.raises(APLAdapterError, match="repo id"):
        train(TrainConfig(base="b", data="d", out=str(tmp_path / "bad"), push_to_hub="not a repo"))
    # a Hub that cannot be reached (a closed local port): the adapter is saved, the error says how to upload it later
    unreachable = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}
    done = subprocess.run([*command, "--out", str(tmp_path / "run"), "--push-to-hub", "me/apl"], env=unreachable,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    adapter = tmp_path / "run" / "adapter"
    assert done.returncode == 2 and f"huggingface-cli upload me/apl {adapter}" in done.stderr, done.stderr[-2000:]
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()


def test_attribute_hold_reads_the_data_contrasts_and_refuses_data_without_them(base_folder, data_folder, tmp_path):
    rows = toy_rows()
    for _, fields in rows:
        if fields["kind"] == "identity":
            fields["c2_contrasts"] = {"sex": ["a photo of a woman"], "height": ["a photo of a tall man"]}
    contrasted = write_data_folder(tmp_path / "contrasted", rows)
    examples = read_metadata(contrasted)
    assert examples[1].c2_contrasts == {"sex": ("a photo of a woman",), "height": ("a photo of a tall man",)}
    common = {"base": str(base_folder), "batch_size": 4, "lr": 1e-2, "steps": 2, "identity_fraction": 0.5}
    plain = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "plain"), **common), show_progress=False)
    held = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "held"), attribute_hold=5.0, **common),
                 show_progress=False)  # fmt: skip
    assert not torch.allclose(_prefix(held.adapter_dir), _prefix(plain.adapter_dir))  # the term reached the prefix
    with pytest.raises(DataFormatError, match="c2_contrasts"):
        train(TrainConfig(data=str(data_folder), out=str(tmp_path / "none"), attribute_hold=1.0, **common))
    assert not (tmp_path / "none").exists()
    with pytest.raises(APLAdapterError, match="--c2 attribute"):
        TrainConfig(base="b", data="d", out="o", attribute_hold=1.0, c2="empty")
    # push_without_attributes reads the same contrasts: end to end it trains another prefix than the plain push
    push = {**common, "identity_push": 0.5}
    pushed = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "push"), **push), show_progress=False)
    shaped = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "shaped"), push_without_attributes=True,
                               **push), show_progress=False)  # fmt: skip
    assert not torch.allclose(_prefix(shaped.adapter_dir), _prefix(pushed.adapter_dir))
    with pytest.raises(DataFormatError, match="push_without_attributes needs c2_contrasts"):
        train(TrainConfig(data=str(data_folder), out=str(tmp_path / "none"), push_without_attributes=True, **push))
    with pytest.raises(APLAdapterError, match="needs --identity-push > 0"):
        TrainConfig(base="b", data="d", out="o", push_without_attributes=True)
    # text_attribute_hold reads them too, and reaches the prefix
    text_held = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "text"), text_attribute_hold=5.0, **common),
                      show_progress=False)  # fmt: skip
    assert not torch.allclose(_prefix(text_held.adapter_dir), _prefix(plain.adapter_dir))
    with pytest.raises(DataFormatError, match=r"text_attribute_hold=1\.0 needs c2_contrasts"):
        train(TrainConfig(data=str(data_folder), out=str(tmp_path / "none"), text_attribute_hold=1.0, **common))
    with pytest.raises(APLAdapterError, match="--c2 attribute"):
        TrainConfig(base="b", data="d", out="o", text_attribute_hold=1.0, c2="empty")
    # text_preserve reads the preservation rows (no contrasts needed) and reaches the prefix; the recipe records it
    kept = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "kept"), text_preserve=5.0, **common),
                 show_progress=False)  # fmt: skip
    assert not torch.allclose(_prefix(kept.adapter_dir), _prefix(plain.adapter_dir))
    assert json.loads((tmp_path / "kept" / "train_config.json").read_text())["text_preserve"] == 5.0
    # the text name direction reaches the prefix (it needs contrasts only with push_without_attributes)
    named = train(TrainConfig(data=str(contrasted), out=str(tmp_path / "named"), text_name_direction=5.0, **common),
                  show_progress=False)  # fmt: skip
    assert not torch.allclose(_prefix(named.adapter_dir), _prefix(plain.adapter_dir))
    assert json.loads((tmp_path / "named" / "train_config.json").read_text())["text_name_direction"] == 5.0
    with pytest.raises(APLAdapterError, match=r"text_name_direction .*needs --c2 attribute"):
        TrainConfig(base="b", data="d", out="o", text_name_direction=1.0, c2="empty")
    bad = write_data_folder(tmp_path / "bad", [(rows[1][0], {**rows[1][1], "c2_contrasts": {"sex": []}})])
    with pytest.raises(DataFormatError, match="non-empty list"):
        read_metadata(bad)
