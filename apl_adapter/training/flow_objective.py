"""The APL objective for flow-matching transformer denoisers (Stable Diffusion 3 / 3.5, FLUX.1).

SD3 and FLUX are trained with rectified flow (``FlowMatchEulerDiscreteScheduler``): for an image latent ``z0``, noise
``n`` and a noise level ``sigma`` in ``[0, 1]``::

    z_t = (1 - sigma) z0 + sigma n          v = n - z0   (the velocity: what the transformer is trained to predict)

so the transformer's output is a velocity, not an epsilon. The APL loss compares two velocity predictions at the
same ``z_t``: the prefixed prompt's, and (every adapter off, no gradient) the target prompt's::

    L_v   = || v(z_t, t, tau([AP] + c1)) - stopgrad(v(z_t, t, tau(c2))) ||^2        (loss_space="v")

The paper's loss is written in epsilon space. Under the change of variable, a velocity prediction ``v`` at ``z_t``
gives ``x0 = z_t - sigma v`` and ``eps = z_t + (1 - sigma) v``; for two predictions at the same ``z_t`` the ``z_t``
terms cancel, so ``d eps = (1 - sigma) d v`` and::

    L_eps = || eps(.., [AP] + c1) - stopgrad(eps(.., c2)) ||^2 = (1 - sigma)^2 L_v   (per example; loss_space="eps")

``loss_space="eps"`` is exactly the paper's loss; ``"v"`` is the weighting the pipeline itself is trained with
(every noise level by its own flow-matching density), which does not fade out at high noise, where the eps loss
weights an example by ``(1 - sigma)^2`` -> 0 and a face's identity is decided.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from peft import PeftModel

#: how noise levels are drawn (diffusers' SD3 / FLUX training scripts): ``"logit_normal"`` = sigmoid of a normal
#: (SD3's paper and scripts, mean 0, std 1), ``"uniform"`` = ``U[0, 1)`` (the FLUX DreamBooth script's default)
TimestepDensity = Literal["logit_normal", "uniform"]
LossSpace = Literal["eps", "v"]

#: ``(prompts) -> conditioning``: a family's text encoding (the pipeline's own ``encode_prompt``)
Encode = Callable[[list[str]], tuple[torch.Tensor, ...]]
#: ``(z_t, timesteps, conditioning) -> v``: a family's transformer call, velocity in ``z_t``'s shape
Denoise = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


@contextlib.contextmanager
def adapters_disabled(adapters: Iterable[PeftModel]) -> Iterator[None]:
    """Every adapter in ``adapters`` switched off inside the block (the plain encoders, for the target)."""
    with contextlib.ExitStack() as stack:
        for model in adapters:
            stack.enter_context(model.disable_adapter())
        yield


def sample_noise_levels(
    scheduler, batch: int, generator: torch.Generator, density: TimestepDensity = "logit_normal"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(sigmas, timesteps)``, both ``(batch,)`` float, as the SD3 / FLUX training scripts do.

    ``u`` in ``[0, 1)`` is drawn from ``density``, then indexes the training scheduler's own grid (``u * T`` of its
    ``num_train_timesteps`` levels), so the scheduler's ``shift`` applies as in the pipeline's training. The
    scheduler must be fresh (``from_config``): ``set_timesteps`` replaces the training grid by an inference one.

    >>> from diffusers import FlowMatchEulerDiscreteScheduler
    >>> sigmas, t = sample_noise_levels(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, torch.Generator().manual_seed(0))
    >>> torch.allclose(t, sigmas * 1000)
    True
    """
    steps = int(scheduler.config.num_train_timesteps)
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator))
    elif density == "uniform":
        u = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"timestep density must be 'logit_normal' or 'uniform', got {density!r}")
    if len(scheduler.sigmas) < steps:
        raise ValueError("the scheduler's training grid was replaced by set_timesteps; pass a fresh scheduler")
    index = (u * steps).long().clamp(max=steps - 1)
    return scheduler.sigmas[index].float(), scheduler.timesteps[index].float()


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - sigma) z0 + sigma n`` for ``z0`` and ``n`` ``(B, C, h, w)`` and ``sigmas`` ``(B,)``."""
    sigma = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - sigma) * latents + sigma * noise


def eps_from_velocity(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The epsilon prediction a velocity prediction implies at ``z_t``: ``eps = z_t + (1 - sigma) v``.

    From ``z_t = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``: ``x0 = z_t - sigma v``.
    """
    sigma = sigmas.view(-1, *([1] * (noisy.dim() - 1))).to(noisy.dtype)
    return noisy + (1 - sigma) * velocity


def flow_apl_loss(
    encode: Encode,
    denoise: Denoise,
    adapters: Iterable[PeftModel],
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    c1: list[str],
    c2: list[str],
    loss_space: LossSpace = "v",
) -> torch.Tensor:
    """The APL loss of one batch on a flow-matching pipeline (a scalar; see the module docstring).

    Args:
        encode: the pipeline's prompt encoding; with the adapters on it is the prefixed path inference takes.
        denoise: the transformer call, returning the velocity ``(B, C, h, w)`` (or packed, the same for both).
        adapters: the ``PeftModel`` of every prefixed encoder: all are switched off for the target.
        noisy: ``z_t`` ``(B, C, h, w)``; sigmas, timesteps: ``(B,)`` from :func:`sample_noise_levels`.
        c1: ``B`` prompts the prefixes are added to; c2: ``B`` target prompts (encoded without any prefix).
        loss_space: ``"v"`` (mean squared velocity difference) or ``"eps"`` (the paper's loss: each example's
            ``(1 - sigma)^2`` times its ``"v"`` loss, exactly the eps-space loss at the same ``z_t``).
    """
    if loss_space not in ("eps", "v"):
        raise ValueError(f"loss_space must be 'eps' or 'v', got {loss_space!r}")
    with torch.no_grad(), adapters_disabled(adapters):
        target = denoise(noisy, timesteps, encode(c2))
    prediction = denoise(noisy, timesteps, encode(c1))
    per_example = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)  # (B,)
    if loss_space == "eps":
        per_example = per_example * (1 - sigmas.to(per_example.device, torch.float32)).square()
    return per_example.mean()
