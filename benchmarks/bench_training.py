"""APL training step time and peak memory: the world model and a real-size SD 1.5 (random weights, small resolution).

The VAE is not in the step: training encodes every image once up front (cached latents).

Each configuration runs in its own subprocess so its peak memory (peak RSS on CPU, peak
allocated on CUDA) is its own. Two variants per model:

- ``apl``: this project's step - frozen UNet/encoder with ``requires_grad=False``, target under
  ``torch.no_grad()``, gradient only for the prefix;
- ``grads-everywhere``: the same loss, but every frozen weight keeps ``requires_grad=True`` (as the
  authors' code does; only the prefix is in the optimizer), so autograd stores and computes what
  it never uses.

Prints one table (medians over the timed steps, one run) and the ratio between the variants.

    python benchmarks/bench_training.py                     # world + sd15 at 128 px, batch 1
    python benchmarks/bench_training.py --models world --batch 16
    python benchmarks/bench_training.py --models sd15 --resolution 256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def sd15_unet(sample_size: int):
    """The real-size SD 1.5 UNet config (860 M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def build(model: str, resolution: int):
    """``(text_encoder, unet, latent_side, description)`` for a model name."""
    from transformers import CLIPTextModel

    from apl_adapter.testing import sd15_text_config

    if model == "sd15":
        latent = resolution // 8
        return CLIPTextModel(sd15_text_config()), sd15_unet(latent), latent, f"SD 1.5 config, {resolution} px"
    # the world's architecture with fresh weights: step time and memory do not depend on the trained values
    from apl_adapter.world.models import world_text_encoder, world_unet

    unet = world_unet()
    side = unet.config.sample_size * 2  # the world VAE downsamples 2x
    return world_text_encoder(), unet, unet.config.sample_size, f"world base architecture, {side} px"


def measure(model: str, variant: str, resolution: int, batch: int, steps: int, warmup: int) -> dict:
    from peft import get_peft_model

    from apl_adapter import APLConfig
    from apl_adapter.training.objective import apl_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder, unet, latent, description = build(model, resolution)
    encoder = get_peft_model(text_encoder, APLConfig(num_virtual_tokens=10)).to(device)
    unet = unet.to(device).eval()
    unet.requires_grad_(variant == "grads-everywhere")
    if variant == "grads-everywhere":
        encoder.base_model.model.requires_grad_(True)
    prefix = encoder.base_model.model.embeddings.apl_prefix["default"]
    optimizer = torch.optim.Adam([prefix], lr=1e-3)
    ids = torch.randint(0, 49406, (batch, 77), device=device)
    ids[:, 0], ids[:, 20:] = 49406, 49407
    times = []
    for step in range(warmup + steps):
        noisy = torch.randn(batch, 4, latent, latent, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = apl_loss(unet, encoder, noisy, t, ids, ids.flip(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "model": description,
        "variant": variant,
        "device": device.type,
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6
        + sum(p.numel() for p in text_encoder.parameters()) / 1e6,
        "batch": batch,
        "step_s": statistics.median(times),
        "peak_mib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="world,sd15", help="Comma list of: world, sd15.")
    parser.add_argument("--variants", default="apl,grads-everywhere", help="Comma list of: apl, grads-everywhere.")
    parser.add_argument("--resolution", type=int, default=128, help="Image side for sd15 (latents are 1/8).")
    parser.add_argument("--batch", type=int, default=1, help="Batch size (the paper: 1).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (median reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._one:  # child process: one configuration
        model, variant = args._one.split(":")
        print(json.dumps(measure(model, variant, args.resolution, args.batch, args.steps, args.warmup)))
        return 0
    rows = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            child = [sys.executable, __file__, "--_one", f"{model}:{variant}", "--resolution", str(args.resolution)]
            child += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.threads:
                child += ["--threads", str(args.threads)]
            done = subprocess.run(child, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"measured {model} {variant}", file=sys.stderr)
    print(f"\nAPL training step (median of {args.steps} steps after {args.warmup} warm-up), batch {args.batch}\n")
    print("| model | variant | device | params (M) | step (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['variant']} | {row['device']} | {row['params_m']:.1f} | {row['step_s']:.3f} "
            f"| {row['peak_mib']:.0f} |"
        )
    by_key = {(r["model"], r["variant"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, theirs = by_key.get((model, "apl")), by_key.get((model, "grads-everywhere"))
        if ours and theirs:
            print(
                f"\n{model}: grads-everywhere / apl = {theirs['step_s'] / ours['step_s']:.2f}x step time, "
                f"{theirs['peak_mib'] / ours['peak_mib']:.2f}x peak memory"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
