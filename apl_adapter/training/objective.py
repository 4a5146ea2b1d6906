"""The APL objective (REFERENCE.md section 1).

For an image latent ``z0``, a timestep ``t`` and noise ``n``, with ``z_t = add_noise(z0, n, t)``::

    L = || eps(z_t, t, tau([AP] + c1)) - stopgrad(eps(z_t, t, tau(c2))) ||^2      (mean over elements)

``tau`` is the frozen text encoder, ``[AP]`` the learned prefix, ``eps`` the frozen UNet. The
target uses the *same* encoder with the adapter switched off, under ``torch.no_grad()``, so
nothing of it is stored for backward. There is no true-noise term: the prefixed prompt is pulled
toward what the model already does for ``c2`` (an anonymous description, or the unchanged
caption for preservation pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import PeftModel


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
    prefixed_states = (encode or text_encoder)(c1_ids)[0]
    prediction = unet(noisy, timesteps, encoder_hidden_states=prefixed_states).sample
    return F.mse_loss(prediction.float(), target.float())
