"""Prefix attention and the prefix K/V cache, timed side by side (medians of interleaved repeats).

1. Kernel: ``torch.ops.apl.prefix_attention`` vs ``torch.cat`` + SDPA with the equivalent mask, at CLIP shapes
   (12 heads of 64, prefix = BOS + 10 vectors = 11 positions, 66 prompt positions). Goal: >= 1.0x (speed-up).
2. Encoder: the real-size SD 1.5 text encoder config (768 wide, 12 layers, 12 heads, MLP 3072, random weights) with
   an APL prefix of 10: ``CachedPrefixEncoder`` vs the full prefixed encoder (the PEFT model). Goal: <= 0.9x time.

    python benchmarks/bench_prefix_attention.py [--repeats 10] [--threads N]  # --threads 1: steadier when shared
    python benchmarks/bench_prefix_attention.py --device cuda  # the CUDA kernel (needs a CUDA build of the extension)

On CUDA every timed call runs the variant ``--inner`` times and then synchronizes, so the median is of device time
per call and not of launch latency alone; fp16 joins the dtypes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

HEADS, HEAD_DIM, PREFIX, PROMPT = 12, 64, 11, 66


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, device: str = "cpu", inner: int = 1
) -> dict[str, float]:
    """Median seconds per call; the variants alternate inside each repeat so load changes hit them alike.

    On CUDA each sample is ``inner`` calls followed by a synchronize, divided by ``inner``.
    """
    cuda = torch.device(device).type == "cuda"
    inner = inner if cuda else 1

    def sample(fn: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / inner

    for fn in fns.values():
        for _ in range(warmup):
            sample(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(sample(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_kernel(batch: int, dtype: torch.dtype, repeats: int, device: str = "cpu", inner: int = 1) -> None:
    from apl_adapter.ops import has_fused_kernel, prefix_attention_reference

    if not has_fused_kernel(device):
        raise SystemExit(f"apl_adapter._C has no {device} kernel: build it with `python setup.py build_ext --inplace`")
    g = torch.Generator().manual_seed(0)
    # Projections come out (B, L, H, D); attention sees them as (B, H, L, D) views, as the encoder does.
    q, k, v = (
        torch.randn(batch, PROMPT, HEADS, HEAD_DIM, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)
    )
    k_prefix, v_prefix = (torch.randn(1, HEADS, PREFIX, HEAD_DIM, generator=g).to(device, dtype) for _ in range(2))
    fused = torch.ops.apl.prefix_attention
    result = interleaved_medians(
        {
            "concat+SDPA": lambda: prefix_attention_reference(q, k, v, k_prefix, v_prefix, causal=True),
            "fused": lambda: fused(q, k, v, k_prefix, v_prefix, True),
        },
        repeats,
        device=device,
        inner=inner,
    )
    err = (
        (
            fused(q, k, v, k_prefix, v_prefix, True).float()
            - prefix_attention_reference(q, k, v, k_prefix, v_prefix).float()
        )
        .abs()
        .max()
    )
    speedup = result["concat+SDPA"] / result["fused"]
    print(
        f"kernel  {device:4s} B={batch:<3d} {str(dtype).removeprefix('torch.'):8s}"
        f" concat+SDPA {result['concat+SDPA'] * 1e3:7.3f} ms"
        f"  fused {result['fused'] * 1e3:7.3f} ms  speed-up {speedup:4.2f}x (goal >= 1.0)  max|diff| {err:.1e}"
    )


def bench_encoder(batch: int, repeats: int, layers: int, device: str = "cpu", inner: int = 1) -> None:
    from peft import get_peft_model
    from transformers import CLIPTextModel

    from apl_adapter import APLConfig
    from apl_adapter.testing import sd15_text_config
    from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder

    torch.manual_seed(0)
    config = sd15_text_config()
    config.num_hidden_layers = layers
    full = get_peft_model(CLIPTextModel(config).eval(), APLConfig(num_virtual_tokens=10)).to(device)
    cached = CachedPrefixEncoder.from_adapter(full)
    cached_reference = CachedPrefixEncoder.from_adapter(full, use_kernel=False)
    ids = torch.full((batch, 77), 49407)
    ids[:, 0] = 49406
    ids[:, 1:9] = torch.randint(0, 49406, (batch, 8), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with torch.inference_mode():
        err = (cached(ids).last_hidden_state - full(input_ids=ids).last_hidden_state).abs().max()
        result = interleaved_medians(
            {
                "full": lambda: full(input_ids=ids),
                "cached": lambda: cached(ids),
                "cached (PyTorch attention)": lambda: cached_reference(ids),
            },
            repeats,
            device=device,
            inner=inner,
        )
    ratio = result["cached"] / result["full"]
    ratio_ref = result["cached (PyTorch attention)"] / result["full"]
    print(
        f"encoder {device:4s} B={batch:<3d} full {result['full'] * 1e3:7.2f} ms"
        f"  cached {result['cached'] * 1e3:7.2f} ms"
        f"  time ratio {ratio:4.2f}x (goal <= 0.9)  [cached with PyTorch attention: {ratio_ref:4.2f}x]"
        f"  max|diff| {err:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="encoder repeats; the kernel gets 4x as many")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--layers", type=int, default=12, help="text encoder layers (12 = SD 1.5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--inner", type=int, default=20, help="calls per timed sample on CUDA (default: 20)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    cuda = torch.device(args.device).type == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, median of {args.repeats} interleaved repeats")
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if cuda else (torch.float32, torch.bfloat16)
    batches = (1, 8, 64) if cuda else (1, 8)
    with torch.inference_mode():
        for batch in batches:
            for dtype in dtypes:
                bench_kernel(batch, dtype, args.repeats * 4, args.device, args.inner)
    for batch in batches:
        bench_encoder(batch, args.repeats, args.layers, args.device, args.inner)


if __name__ == "__main__":
    main()
