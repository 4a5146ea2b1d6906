"""Drive the CUDA prefix-attention kernel over its edge shapes, for NVIDIA's compute-sanitizer to watch.

Every head-dimension path (64, 128 and the generic one), empty and per-batch prefixes, fewer and more queries than
keys (rows that see no key), strided views and the three storage types; each launch is synchronized so a fault is
pinned to its shape. The numbers are not checked here (tests/test_cuda_paths.py does that): this is for memory
errors.

    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/cuda_sanitize.py
    compute-sanitizer --tool initcheck --error-exitcode 9 python tools/cuda_sanitize.py
"""

from __future__ import annotations

import itertools
import sys

import torch

from apl_adapter import ops

# (batch, heads, q_len, kv_len, prefix_len, prefix_batch)
SHAPES = [
    (1, 1, 1, 1, 0, 1),
    (3, 5, 7, 7, 11, 1),
    (2, 12, 66, 66, 11, 2),
    (2, 2, 5, 9, 3, 1),
    (1, 3, 130, 130, 1, 1),
    (1, 2, 9, 4, 0, 1),  # more queries than keys, no prefix: the first rows see no key (zeros)
]
HEAD_DIMS = [64, 128, 40, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def main() -> int:
    if not torch.cuda.is_available() or not ops.has_fused_kernel("cuda"):
        print("cuda_sanitize: needs a CUDA device and a CUDA build of apl_adapter._C", file=sys.stderr)
        return 1
    launches = 0
    for (batch, heads, q_len, kv_len, prefix_len, prefix_batch), head_dim, dtype, causal in itertools.product(
        SHAPES, HEAD_DIMS, DTYPES, (True, False)
    ):
        # (B, L, H, D) projections viewed as (B, H, L, D), as the encoder hands them over.
        q = torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(batch, kv_len, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in "kv")
        k_prefix, v_prefix = (
            torch.randn(prefix_batch, heads, prefix_len, head_dim, device="cuda", dtype=dtype) for _ in "kv"
        )
        out = torch.ops.apl.prefix_attention(q, k, v, k_prefix, v_prefix, causal)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), (batch, heads, q_len, kv_len, prefix_len, head_dim, dtype, causal)
        launches += 1
    print(f"cuda_sanitize: {launches} launches finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
