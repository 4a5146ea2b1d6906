"""The APL objective (REFERENCE.md section 1).

For an image latent ``z0``, a timestep ``t`` and noise ``n``, with ``z_t = add_noise(z0, n, t)``::

    L = || eps(z_t, t, tau([AP] + c1)) - stopgrad(eps(z_t, t, tau(c2))) ||^2      (mean over elements)

``tau`` is the frozen text encoder, ``[AP]`` the learned prefix, ``eps`` the frozen UNet. The
target uses the *same* encoder with the adapter switched off, under ``torch.no_grad()``, so
nothing of it is stored for backward. There is no true-noise term: the prefixed prompt is pulled
toward what the model already does for ``c2`` (an anonymous description, or the unchanged
caption for preservation pairs).

``loss_space="v"`` (beyond the paper) measures the same difference in v-space (``v = alpha eps - sigma x0``):
for two predictions of the same ``z_t``, ``||dv||^2 = ||d eps||^2 / alpha_bar_t``. The eps-space loss is an x0
difference weighted by SNR(t), so it nearly ignores large t - where a face's identity is decided and what CFG then
amplifies: a prefix trained in eps-space leaves most of a name's eps gap at t ~ 950 (measured, docs/experiments).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from peft import PeftModel

from ..tuners.apl.prefix import shifted_position_ids


def name_share(residual: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per row ``<residual, direction> / ||direction||^2`` (rows flattened): the share of ``direction`` in
    ``residual``. With ``residual = eps([AP] + c1) - eps(c2)`` and ``direction = eps(c1) - eps(c2)`` it is how much of
    the name's own direction a prefixed prediction keeps ("name share kept" of experiments/eps_gap_diagnostics.py).

    >>> name_share(torch.tensor([[2.0, 1.0]]), torch.tensor([[4.0, 0.0]]))
    tensor([0.5000])
    """
    residual, direction = residual.float().flatten(1), direction.float().flatten(1)
    return (residual * direction).sum(dim=1) / direction.square().sum(dim=1).clamp_min(1e-12)


def attribute_pulls(
    unet, noisy: torch.Tensor, timesteps: torch.Tensor, described: torch.Tensor, contrast_states: torch.Tensor,
    contrast_groups: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each stated attribute's own pull ``a_k = eps(c2) - mean eps(c2 with attribute k changed)``; call it under
    ``torch.no_grad()``.

    Args:
        noisy, timesteps: ``(n, 4, h, w)`` and ``(n,)`` of the identity rows; described: their ``eps(c2)``.
        contrast_states: ``(n * J, 77, D)`` plain text-encoder states of the contrast prompts (row-major);
        contrast_groups: ``(n, J)`` their attribute indices, -1 = padding.

    Returns:
        ``(n, K, 4 * h * w)`` float pulls, one per attribute index in the batch (zeros where a row has none of that
        attribute's contrasts), and the ``(n, K)`` mask of the rows that have them.
    """
    n, width = contrast_groups.shape
    changed = unet(
        noisy.repeat_interleave(width, dim=0), timesteps.repeat_interleave(width), encoder_hidden_states=contrast_states
    ).sample
    return _group_pulls(described.float().flatten(1), changed.float().view(n, width, -1), contrast_groups)


def text_attribute_pulls(
    described_summary: torch.Tensor, contrast_states: torch.Tensor, contrast_groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stated attribute's pull in the *text encoder's output*: ``b_k = m(tau(c2)) - mean m(tau(c2 with
    attribute k changed))``, ``m`` the mean over the sequence positions (the UNet's cross-attention reads the states
    as a set, so a summary that ignores where a word sits).

    Args:
        described_summary: ``(n, D)`` ``m(tau(c2))`` of the identity rows; contrast_states / contrast_groups: as
            :func:`attribute_pulls`.

    Returns:
        ``(n, K, D)`` float pulls and the ``(n, K)`` mask of the rows that have them, as :func:`attribute_pulls`.
    """
    n, width = contrast_groups.shape
    changed = contrast_states.float().mean(dim=1).view(n, width, -1)
    return _group_pulls(described_summary, changed, contrast_groups)


def _group_pulls(
    described: torch.Tensor, changed: torch.Tensor, contrast_groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``described - mean(changed of attribute k)`` per row and attribute index in the batch, ``(n, K, D)``, zeros
    where a row has none of that attribute's contrasts; and the ``(n, K)`` mask of the rows that have them.
    ``described`` is ``(n, D)``, ``changed`` ``(n, J, D)``, ``contrast_groups`` ``(n, J)`` (-1 = padding)."""
    pulls, present = [], []
    for group in contrast_groups[contrast_groups >= 0].unique().tolist():
        members = (contrast_groups == group).float()  # (n, J)
        mean_changed = (members[..., None] * changed).sum(dim=1) / members.sum(dim=1, keepdim=True).clamp_min(1)
        has = members.sum(dim=1) > 0
        pulls.append((described - mean_changed) * has[:, None])
        present.append(has)
    return torch.stack(pulls, dim=1), torch.stack(present, dim=1)


def attribute_shares(prediction: torch.Tensor, described: torch.Tensor, pulls: torch.Tensor, present: torch.Tensor):
    """``s_k`` of :func:`apl_loss`'s ``attribute_hold`` for every row and attribute present, flattened: the share
    ``<prediction - described, a_k> / ||a_k||^2`` of each pull (from :func:`attribute_pulls`) that the prefixed
    prediction ``(n, 4, h, w)`` loses against ``eps(c2)``."""
    lost = (prediction.float() - described.float()).flatten(1)  # (n, 4 h w), or (n, D) for text pulls
    shares = (pulls * lost[:, None]).sum(dim=-1) / pulls.square().sum(dim=-1).clamp_min(1e-12)  # (n, K)
    return shares.T[present.T]  # attribute by attribute, as the loss has always averaged them


def without_pulls(direction: torch.Tensor, pulls: torch.Tensor) -> torch.Tensor:
    """``direction`` ``(n, 4, h, w)`` minus its least-squares part in the span of each row's attribute pulls
    ``(n, K, 4 * h * w)``: the part of the name's direction that changes no stated attribute (to first order).

    >>> d = torch.tensor([[[[3.0, 4.0]]]])                     # (1, 1, 1, 2)
    >>> without_pulls(d, torch.tensor([[[1.0, 0.0]]])).round(decimals=4)  # the first coordinate is a pull: it goes
    tensor([[[[0., 4.]]]])
    """
    flat = direction.float().flatten(1)[..., None]  # (n, D, 1)
    gram = pulls @ pulls.transpose(1, 2)  # (n, K, K); an absent attribute's zero pull gets a zero coefficient
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(gram + ridge * eye, pulls @ flat)  # (n, K, 1)
    return (flat - pulls.transpose(1, 2) @ coefficients).view_as(direction).to(direction.dtype)


def preservation_gap(text_encoder: PeftModel, ids: torch.Tensor, prefixed_states: torch.Tensor) -> torch.Tensor:
    """``mean ||tau([AP] + c)[m+1:] - tau_m(c)[1:L-m]||^2``: how far the prefix moves the states of prompts ``c``
    (ids ``(B, L)``, their prefixed states ``(B, L, D)``), against the plain encoder with the prompt at the positions
    the prefix puts it (``1+m..L-1``). Only the prompt's own positions count: the prefix's rows are the same for every
    prompt, the empty one included, and a prompt position is what the prefix can change. Where the adapter hides its
    rows (``hide_prefix_rows``) the prompt's rows are already at ``1..L-m-1`` of the states."""
    config = text_encoder.active_peft_config
    m = config.num_virtual_tokens
    span = ids.shape[1] - m - 1
    start = 1 if getattr(config, "hide_prefix_rows", False) else m + 1
    with torch.no_grad(), text_encoder.disable_adapter():
        plain = text_encoder(ids, position_ids=shifted_position_ids(ids, m))[0][:, 1 : 1 + span]
    return (prefixed_states[:, start : start + span].float() - plain.float()).square().mean()


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``z_t`` ``(B, C, h, w)`` from ``z0`` ``(B, C, h, w)``, noise of the same shape and ``t`` ``(B,)``."""
    return scheduler.add_noise(latents, noise, timesteps)


def apl_loss(
    unet,
    text_encoder: PeftModel,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    c1_ids: torch.Tensor,
    c2_ids: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_space: Literal["eps", "v"] = "eps",
    alphas_cumprod: torch.Tensor | None = None,
    push: float = 0.0,
    push_ids: torch.Tensor | None = None,
    boost: float = 0.0,
    empty_ids: torch.Tensor | None = None,
    text_match: float = 0.0,
    direction: float = 0.0,
    guidance_relative: float = 0.0,
    attribute_hold: float = 0.0,
    push_without_attributes: bool = False,
    contrast_ids: torch.Tensor | None = None,
    contrast_groups: torch.Tensor | None = None,
    text_attribute_hold: float = 0.0,
    text_preserve: float = 0.0,
    text_direction: float = 0.0,
) -> torch.Tensor:
    """The APL loss of one batch (a scalar).

    Args:
        unet: the frozen ``UNet2DConditionModel``.
        text_encoder: the text encoder with the APL adapter (a ``PeftModel``); its
            ``disable_adapter()`` gives the plain encoder for the target.
        noisy: ``z_t``, ``(B, 4, h, w)``.
        timesteps: ``(B,)`` integer timesteps.
        c1_ids: ``(B, 77)`` token ids of the prompts the prefix is added to.
        c2_ids: ``(B, 77)`` token ids of the target prompts (encoded without the prefix).
        encode: how to run the prefixed encoder, e.g. the Accelerate/DDP-wrapped model; defaults to
            ``text_encoder`` itself. It must return the hidden states first (as ``CLIPTextModel``).
        push: ``eta`` of a target pushed away from the plain prompt, ``eps(c2) - eta (eps(c1) - eps(c2))`` (ESD's
            negative guidance; 0 = the paper). Zero for preservation pairs, whose ``c1`` is ``c2``.
        push_ids: ``(B, 77)`` ids of the prompts the push moves away from, in place of ``c1`` (e.g. the name
            followed by its description, which holds the described attributes out of the push direction).
        boost: ``beta`` of identity targets moved further along their description, ``+ beta (eps(c2) - eps(''))``
            (0 = the paper); needs ``empty_ids``, the ``(1, 77)`` ids of the empty prompt.
        text_match: ``lambda`` of a term on the text encoder's output alone, ``lambda * mean ||tau([AP] + c1) -
            tau(c2)||^2`` over the identity rows (0 = the paper): it asks the prefixed name to *encode* like its
            description, which no UNet is needed to judge (beyond the paper).
        direction: ``lambda`` of a term on the name's own direction, ``lambda * mean (r - r*)^2`` over the identity rows
            (0 = the paper): ``r = <eps([AP] + c1) - eps(c2), d> / ||d||^2`` is the share of the name's direction
            ``d = eps(c1) - eps(c2)`` (``c1`` or ``push_ids``) that the prefixed prediction keeps, ``r* = -push`` the
            share its target keeps. Per row it is a ratio, so a step at large t (small ``d``) counts as much as one at
            small t: the eps loss lets the prefix keep most of ``d`` there, and CFG then multiplies it (beyond the
            paper).
        guidance_relative: ``lambda`` of a term on the whole identity error measured against the description's own
            guidance, ``lambda * mean ||eps([AP] + c1) - target||^2 / ||eps(c2) - eps('')||^2`` over the identity rows
            (0 = the paper; needs ``empty_ids``). ``direction`` holds only the error *along* ``d``; across it the
            error stays about half as large as the description's guidance at every t, and CFG multiplies it into
            another coarse look. A ratio per row, so large t counts as much as small t (beyond the paper).
        attribute_hold: ``lambda`` of a term that keeps each stated attribute's pull, ``lambda * mean_k s_k^2`` over
            the identity rows and their attributes (0 = the paper): ``a_k = eps(c2) - mean eps(c2 with attribute k
            changed)`` is attribute k's own pull and ``s_k = <eps([AP] + c1) - eps(c2), a_k> / ||a_k||^2`` the part
            of it the prefixed prediction loses (0 = all kept). Needs ``contrast_ids`` ``(B, J, 77)``, the
            descriptions with one attribute changed, and ``contrast_groups`` ``(B, J)``, their attribute's index (-1 =
            padding); beyond the paper.
        push_without_attributes: push (and ``direction``) along the name's direction with each stated attribute's
            pull ``a_k`` projected out, ``d' = d - sum_k c_k a_k`` (least squares), so the target moves away from the
            name without moving its attributes. Needs ``contrast_ids`` / ``contrast_groups`` as ``attribute_hold``
            does; beyond the paper.
        text_attribute_hold: ``lambda`` of ``attribute_hold``'s term measured in the text encoder's output instead of
            the UNet's prediction: ``b_k = m(tau(c2)) - mean m(tau(c2 with attribute k changed))`` (``m`` the mean over
            positions, :func:`text_attribute_pulls`) and ``s_k = <m(tau([AP] + c1)) - m(tau(c2)), b_k> / ||b_k||^2``.
            What the encoder writes, every UNet that shares it reads: the UNet-side hold keeps an attribute only as
            the training UNet reads it. Needs ``contrast_ids`` / ``contrast_groups``; beyond the paper.
        text_preserve: ``lambda`` of a term that keeps prompts without a name where they were *in the text encoder's
            output*: ``lambda * mean ||tau([AP] + c)[m+1:] - tau_m(c)[1:L-m]||^2`` over the preservation rows
            (``c1 == c2``), ``tau_m`` the plain encoder with the prompt at the positions the prefix moves it to
            (``1+m..``), so the term is 0 for a prefix nobody attends to and the shift itself costs nothing (0 = the
            paper). The eps loss keeps a scene only as the training UNet reads it, one timestep a step; what the
            encoder writes every UNet sharing it reads (beyond the paper).
        text_direction: ``lambda`` of ``direction``'s term measured in the text encoder's output instead of the
            UNet's prediction: ``d = m(tau(c1)) - m(tau(c2))`` (``c1`` or ``push_ids``; ``m`` the mean over positions,
            as ``text_attribute_hold``), its attribute pulls ``b_k`` projected out with ``push_without_attributes``,
            and ``lambda * mean (r + push)^2`` with ``r = <m(tau([AP] + c1)) - m(tau(c2)), d> / ||d||^2``. A UNet
            taught a name after the prefix was trained (DreamBooth) reads the name only through what the encoder
            writes, so the share of the name's direction the *encoder* keeps is what decides whether that name falls
            there (measured); beyond the paper.
        loss_space: ``"eps"`` (the paper) or ``"v"``: each element's squared difference divided by
            ``alpha_bar_t`` (the noise scheduler's ``alphas_cumprod`` at its timestep, which ``"v"`` needs).

    Example:

    ```python
    >>> import torch
    >>> from peft import get_peft_model
    >>> from apl_adapter import APLConfig
    >>> from apl_adapter.testing import tiny_sd_pipeline
    >>> from apl_adapter.training.objective import apl_loss
    >>> pipe = tiny_sd_pipeline()
    >>> encoder = get_peft_model(pipe.text_encoder, APLConfig(num_virtual_tokens=4))
    >>> ids = pipe.tokenizer(["a photo of Ann Lee"], padding="max_length", return_tensors="pt").input_ids
    >>> empty = pipe.tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    >>> loss = apl_loss(pipe.unet, encoder, torch.randn(1, 4, 8, 8), torch.tensor([500]), ids, empty)
    >>> loss.backward()   # only the prefix gets a gradient
    >>> encoder.base_model.model.embeddings.apl_prefix["default"].grad.shape
    torch.Size([4, 32])

    ```
    """
    with torch.no_grad(), text_encoder.disable_adapter():
        target_states = text_encoder(c2_ids)[0]
        target = unet(noisy, timesteps, encoder_hidden_states=target_states).sample
        identity = ~(c1_ids == c2_ids).all(dim=1)  # preservation pairs (c1 == c2) keep the plain target
        name_direction = guidance = pulls = None
        described = target[identity]  # eps(c2) of the identity rows, before any push (a copy)
        text_hold = text_name = described_summary = None
        if (text_attribute_hold or text_direction) and bool(identity.any()):
            described_summary = target_states[identity].float().mean(dim=1)  # m(tau(c2)), both text terms read it
        if (attribute_hold or push_without_attributes or text_attribute_hold) and bool(identity.any()):
            if contrast_ids is None or contrast_groups is None or contrast_ids.shape[1] == 0:
                raise ValueError(
                    "attribute_hold, push_without_attributes and text_attribute_hold need contrast_ids and "
                    "contrast_groups (the data's c2_contrasts)"
                )
            row_groups = contrast_groups[identity].to(c1_ids.device)
            # encoded once for both holds (the plain encoder: this block runs with the adapter off)
            contrast_states = text_encoder(contrast_ids[identity].to(c1_ids.device).flatten(0, 1))[0]
            if described_summary is not None and (text_attribute_hold or push_without_attributes):
                text_hold = (described_summary, *text_attribute_pulls(described_summary, contrast_states, row_groups))
            if attribute_hold or push_without_attributes:
                pulls = attribute_pulls(
                    unet, noisy[identity], timesteps[identity], described, contrast_states, row_groups
                )
        source_states = None
        if (push or direction or text_direction) and bool(identity.any()):
            source = (c1_ids if push_ids is None else push_ids.to(c1_ids.device))[identity]
            source_states = text_encoder(source)[0]
        if text_direction and source_states is not None and described_summary is not None:
            text_name = source_states.float().mean(dim=1) - described_summary
            if push_without_attributes and text_hold is not None:
                text_name = without_pulls(text_name, text_hold[1])
        if (push or boost or direction or guidance_relative) and bool(identity.any()):
            noisy_id, t_id = noisy[identity], timesteps[identity]
            moved = described.clone()
            if (push or direction) and source_states is not None:
                plain = unet(noisy_id, t_id, encoder_hidden_states=source_states).sample
                name_direction = plain - described
                if push_without_attributes and pulls is not None:
                    name_direction = without_pulls(name_direction, pulls[0])
            if push and name_direction is not None:
                moved -= push * name_direction
            if boost or guidance_relative:
                if empty_ids is None:
                    raise ValueError("boost and guidance_relative need empty_ids, the token ids of the empty prompt")
                empty_states = text_encoder(empty_ids.to(c1_ids.device))[0].expand(len(t_id), -1, -1)
                unconditional = unet(noisy_id, t_id, encoder_hidden_states=empty_states).sample
                guidance = described - unconditional
                moved += boost * guidance
            target[identity] = moved
    prefixed_states = (encode or text_encoder)(c1_ids)[0]
    prediction = unet(noisy, timesteps, encoder_hidden_states=prefixed_states).sample
    if loss_space == "eps":
        loss = F.mse_loss(prediction.float(), target.float())
    elif loss_space == "v" and alphas_cumprod is not None:
        per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
        alpha_bar = alphas_cumprod.to(per_sample.device, torch.float32)[timesteps.long()]
        loss = (per_sample / alpha_bar).mean()
    else:
        raise ValueError("loss_space must be 'eps', or 'v' with the noise scheduler's alphas_cumprod")
    if text_match and bool(identity.any()):
        gap = (prefixed_states[identity].float() - target_states[identity].float()).square().mean()
        loss = loss + text_match * gap
    if direction and name_direction is not None:
        # target = described - push * d, so the target's share of d is -push
        excess = name_share(prediction[identity] - target[identity], name_direction)  # r - r*
        loss = loss + direction * excess.square().mean()
    if attribute_hold and pulls is not None:
        shares = attribute_shares(prediction[identity], described, *pulls)
        loss = loss + attribute_hold * shares.square().mean()
    if described_summary is not None:  # a text term is on: m(tau([AP] + c1)) of the identity rows, once
        summary = prefixed_states[identity].float().mean(dim=1)
        if text_attribute_hold and text_hold is not None:
            shares = attribute_shares(summary, *text_hold)  # (m(tau(c2)), pulls, present)
            loss = loss + text_attribute_hold * shares.square().mean()
        if text_name is not None:
            # the target's summary is m(tau(c2)), whose share of d is 0; the push asks for -push, as ``direction`` does
            kept = name_share(summary - described_summary, text_name)
            loss = loss + text_direction * (kept + push).square().mean()
    if text_preserve and not bool(identity.all()):
        loss = loss + text_preserve * preservation_gap(text_encoder, c1_ids[~identity], prefixed_states[~identity])
    if guidance_relative and guidance is not None:
        error = (prediction[identity] - target[identity]).float().flatten(1).square().sum(dim=1)
        scale = guidance.float().flatten(1).square().sum(dim=1).clamp_min(1e-12)
        loss = loss + guidance_relative * (error / scale).mean()
    return loss
