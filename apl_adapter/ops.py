"""``prefix_attention``: attention over a cached prefix plus the request's own keys, without concatenating them.

The fused kernel lives in ``csrc/`` and registers ``torch.ops.apl.prefix_attention`` (CPU always, CUDA where the
extension was built with a CUDA torch). Without the extension, or when autograd must flow through the op (the kernel
is inference-only), :func:`prefix_attention` runs :func:`prefix_attention_reference`, the same math in PyTorch.

Shapes (the diffusers/SDPA convention):

- ``q``: ``(B, H, Lq, D)``; ``k``, ``v``: ``(B, H, Lk, D)``
- ``k_prefix``, ``v_prefix``: ``(B, H, P, D)`` or ``(1, H, P, D)`` - a prefix shared by the whole batch is read
  in place, never copied per batch entry. ``P`` may be 0.
- returns ``(B, H, Lq, D)`` in ``q``'s dtype.

``causal`` masks request keys only, aligned bottom-right (query ``i`` sees key ``j`` when
``j <= i + Lk - Lq``); every query sees every prefix key. That is the CLIP text encoder's causal mask seen from
positions ``P..P+Lq-1`` when the prefix holds positions ``0..P-1``.

Example:

```python
>>> import torch
>>> from apl_adapter.ops import prefix_attention, prefix_attention_reference
>>> q, k, v = (torch.randn(2, 12, 66, 64) for _ in range(3))
>>> k_prefix, v_prefix = (torch.randn(1, 12, 11, 64) for _ in range(2))
>>> out = prefix_attention(q, k, v, k_prefix, v_prefix, causal=True)
>>> out.shape
torch.Size([2, 12, 66, 64])
>>> bool((out - prefix_attention_reference(q, k, v, k_prefix, v_prefix, causal=True)).abs().max() < 1e-5)
True

```
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

__all__ = ["has_fused_kernel", "prefix_attention", "prefix_attention_reference"]

_FALLBACK_WARNED = False


def _load_extension() -> bool:
    try:
        # The compiled extension has no stub (it exports no Python names): mypy cannot see it.
        from . import _C  # type: ignore[attr-defined]  # noqa: F401  (importing registers torch.ops.apl.*)
    except ImportError:
        return False
    return hasattr(torch.ops.apl, "prefix_attention")


_HAS_EXTENSION = _load_extension()


def has_fused_kernel(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch.ops.apl.prefix_attention`` has a kernel for ``device``'s type (CPU or CUDA)."""
    if not _HAS_EXTENSION:
        return False
    return _has_kernel_for("CUDA" if torch.device(device).type == "cuda" else "CPU")


@functools.cache
def _has_kernel_for(dispatch_key: str) -> bool:
    # Asked once per layer per call: the dispatcher lookup is cached (kernels register at import, never later).
    return torch._C._dispatch_has_kernel_for_dispatch_key("apl::prefix_attention", dispatch_key)


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """The PyTorch definition of :func:`prefix_attention`: SDPA over ``[k_prefix ; k]`` and ``[v_prefix ; v]``.

    Differentiable; computes in ``q``'s dtype like SDPA does. Also the fallback when the extension is absent.
    """
    batch, _, q_len, _ = q.shape
    kv_len, prefix_len = k.shape[2], k_prefix.shape[2]
    keys = torch.cat([k_prefix.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prefix.expand(batch, -1, -1, -1), v], dim=2)
    mask = None
    if causal:
        rows = torch.arange(q_len, device=q.device)[:, None]
        cols = torch.arange(kv_len, device=q.device)[None, :]
        request = cols <= rows + (kv_len - q_len)
        mask = torch.cat([torch.ones(q_len, prefix_len, dtype=torch.bool, device=q.device), request], dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over the prefix keys and its own keys, fused when the kernel is available.

    The output is laid out ``(B, Lq, H, D)`` in memory, so ``out.transpose(1, 2).reshape(B, Lq, H * D)`` is free.
    Uses the reference (with a one-time warning) when the extension is missing for the device; uses it silently when
    gradients are needed, since the fused kernel has no backward.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_prefix, v_prefix))
    if needs_grad:
        return prefix_attention_reference(q, k, v, k_prefix, v_prefix, causal=causal, scale=scale)
    if not has_fused_kernel(q.device):
        _warn_fallback(q.device)
        return prefix_attention_reference(q, k, v, k_prefix, v_prefix, causal=causal, scale=scale)
    return torch.ops.apl.prefix_attention(q, k, v, k_prefix, v_prefix, causal, scale)


def _warn_fallback(device: torch.device) -> None:
    global _FALLBACK_WARNED
    if _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED = True
    why = "apl_adapter._C is not built" if not _HAS_EXTENSION else f"it was built without {device.type} support"
    warnings.warn(
        f"prefix_attention: using the PyTorch reference because {why} (build it with "
        "`python setup.py build_ext --inplace`). Results are the same; only speed differs.",
        RuntimeWarning,
        stacklevel=3,
    )


if _HAS_EXTENSION:

    @torch.library.register_fake("apl::prefix_attention")
    def _prefix_attention_fake(q, k, v, k_prefix, v_prefix, causal=True, scale=None):
        batch, heads, q_len, head_dim = q.shape
        return q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
