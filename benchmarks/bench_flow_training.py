"""Memory and time of one apl-train step on real-size SD3-medium and FLUX.1-dev configs, random weights, on the CPU.

What a step is: the training loop's own step (``apl_adapter.training.flow_loop``): the target (every adapter off, no
grad), the prefixed prediction through the pipeline's ``encode_prompt`` and transformer, backward into the prefixes of
every text encoder, one Adam step. Batch 1, 256 px (32 x 32 latents), the pipelines' T5 windows (SD3 256, FLUX 512).

The full models do not fit a ~14 GB budget beside other work (SD3-medium with T5-XXL is ~15 GB in bf16, FLUX.1-dev
~24 GB; SD3-medium alone on an idle machine: ``--runs 24,24``, 17.6 GiB peak), so each model is measured with its
real widths and fewer blocks, and extrapolated linearly: every run varies the transformer's blocks (SD3: joint
blocks; FLUX: 1 double + 2 single blocks per unit, the 19 : 38 ratio) and T5's layers, and a least-squares fit
``peak = base + a * transformer_units + b * t5_layers`` is read at the full depth (SD3: 24 and 24; FLUX: 19 units
and 24). The CLIP encoders are always full. Parameter counts of the full models are exact (built on the meta
device).

    python benchmarks/bench_flow_training.py                    # both models, the default runs, a table
    python benchmarks/bench_flow_training.py --models sd3 --runs 1,1 2,1 1,2 --dtype fp32

Each run is a fresh process (peak RSS is per process); ``--child`` is that process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

MODELS = ("sd3", "flux")
FULL_DEPTH = {"sd3": (24, 24), "flux": (19, 24)}  # (transformer units, T5 layers)
WINDOW = {"sd3": 256, "flux": 512}
DEFAULT_RUNS = ((1, 1), (2, 1), (4, 1), (1, 2), (1, 4))
GIB = 2**30


def t5_xxl(layers: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, dropout_rate=0.0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def build(model: str, units: int, t5_layers: int):
    """The pipeline with real widths and ``units`` transformer units / ``t5_layers`` T5 layers (random weights)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )  # fmt: skip
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from apl_adapter.testing import tiny_t5_tokenizer
    from apl_adapter.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer

    def clip_l(projection: bool):
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()

    def clip_g():
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config).eval()

    # a T5 tokenizer built offline: its ids (< 256) are valid in T5-XXL's 32128-row table
    if model == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=units, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=192,
        ).eval()  # fmt: skip
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
            text_encoder=clip_l(True), tokenizer=load_clip_tokenizer(), text_encoder_2=clip_g(),
            tokenizer_2=load_clip_tokenizer(pad_token="!"), text_encoder_3=t5_xxl(t5_layers),
            tokenizer_3=tiny_t5_tokenizer(),
        )  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=units, num_single_layers=2 * units, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=clip_l(False), tokenizer=load_clip_tokenizer(), text_encoder_2=t5_xxl(t5_layers),
        tokenizer_2=tiny_t5_tokenizer(),
    )  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """The process's peak RSS since start, or since :func:`reset_peak` (Linux ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Start the peak RSS afresh (Linux: ``5`` to ``clear_refs``), so the step's peak is not the build's."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def child(model: str, units: int, t5_layers: int, dtype: str, resolution: int) -> dict:
    """One run: build, a warm-up step, two timed steps (the faster is reported); sizes in bytes."""
    from peft import get_peft_model

    from apl_adapter import APLConfig
    from apl_adapter.families import FLUX, SD3
    from apl_adapter.training.flow_loop import freeze
    from apl_adapter.training.flow_models import FlowModel
    from apl_adapter.training.flow_objective import flow_apl_loss, flow_noisy_latents
    from apl_adapter.tuners.apl.model import prefix_parameters

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)  # built in place: no fp32 copy
    started = time.perf_counter()
    pipe = freeze(build(model, units, t5_layers))
    torch.set_default_dtype(torch.float32)
    built_s = time.perf_counter() - started
    family = SD3 if model == "sd3" else FLUX
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                  for p in m.parameters())  # fmt: skip
    adapters = [get_peft_model(getattr(pipe, a), APLConfig(num_virtual_tokens=10)).eval() for a in family.encoders]
    prefixes = [p for a in adapters for p in prefix_parameters(a).values()]
    flow = FlowModel.of(pipe, family, WINDOW[model], None)
    optimizer = torch.optim.Adam(prefixes, lr=1e-3)
    side = resolution // 8
    latents = torch.randn(1, 16, side, side, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    sigmas = torch.tensor([0.6])
    noisy = flow_noisy_latents(latents, torch.randn_like(latents), sigmas)
    rss_before, build_peak = rss_bytes(), peak_bytes()
    reset_peak()
    times = []
    for _ in range(3):  # a warm-up step, then the faster of two (the 2 cores are shared with other work)
        start = time.perf_counter()
        loss = flow_apl_loss(flow.encode, flow.denoise, adapters, noisy, sigmas, sigmas * 1000,
                             ["a photo of Ann Lee"], ["a photo of a woman"])  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    assert torch.isfinite(loss), loss
    return {
        "model": model, "units": units, "t5_layers": t5_layers, "dtype": dtype, "resolution": resolution,
        "weights": weights, "rss_before_step": rss_before, "build_peak": build_peak, "peak": peak_bytes(),
        "step_s": min(times[1:]), "first_step_s": times[0], "build_s": built_s,
        "prefix_numbers": sum(p.numel() for p in prefixes), "threads": torch.get_num_threads(),
    }  # fmt: skip


def full_parameters(model: str) -> int:
    """Exact parameter count of the full model (meta device: nothing allocated)."""
    with torch.device("meta"):
        pipe = build(model, *FULL_DEPTH[model])
    return sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())


def fit(rows: list[dict], key: str, model: str) -> tuple[np.ndarray, float]:
    """Least squares ``key = c0 + c1 * units + c2 * t5_layers``; the coefficients and the value at full depth."""
    design = np.array([[1.0, r["units"], r["t5_layers"]] for r in rows])
    values = np.array([float(r[key]) for r in rows])
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    return coefficients, float(coefficients @ np.array([1.0, *FULL_DEPTH[model]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--runs", nargs="+", default=[f"{u},{t}" for u, t in DEFAULT_RUNS],
                        help="transformer units,T5 layers per run")  # fmt: skip
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--json", help="also write every run and the fits here")
    parser.add_argument("--child", nargs=2, type=int, metavar=("UNITS", "T5_LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.models[0], *args.child, args.dtype, args.resolution)))
        return
    report = {}
    for model in args.models:
        rows = []
        for run in args.runs:
            units, t5_layers = (int(x) for x in run.split(","))
            command = [sys.executable, __file__, "--child", str(units), str(t5_layers), "--models", model,
                       "--dtype", args.dtype, "--resolution", str(args.resolution)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{model} {run} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model} units={units} t5={t5_layers}: weights {r['weights'] / GIB:.2f} GiB, peak RSS "
                  f"{r['peak'] / GIB:.2f} GiB (step adds {(r['peak'] - r['rss_before_step']) / GIB:.2f}), "
                  f"step {r['step_s']:.1f} s", flush=True)  # fmt: skip
        for r in rows:
            r["step_extra"] = r["peak"] - r["rss_before_step"]
        peak_fit, peak_full = fit(rows, "peak", model)
        extra_fit, extra_full = fit(rows, "step_extra", model)
        time_fit, time_full = fit(rows, "step_s", model)
        parameters = full_parameters(model)
        bytes_per = 2 if args.dtype == "bf16" else 4
        report[model] = {
            "runs": rows, "full_parameters": parameters, "full_weights_gib": parameters * bytes_per / GIB,
            "peak_fit_gib": (peak_fit / GIB).tolist(), "peak_full_gib": peak_full / GIB,
            "step_extra_fit_gib": (extra_fit / GIB).tolist(), "step_extra_full_gib": extra_full / GIB,
            "step_time_fit_s": time_fit.tolist(), "step_time_full_s": time_full,
        }  # fmt: skip
        units, layers = FULL_DEPTH[model]
        print(
            f"{model} full ({units} units, {layers} T5 layers): {parameters / 1e9:.2f} B parameters = "
            f"{parameters * bytes_per / GIB:.1f} GiB {args.dtype}; peak = {peak_fit[0] / GIB:.2f} + "
            f"{peak_fit[1] / GIB:.3f} x units + {peak_fit[2] / GIB:.3f} x T5 layers GiB -> {peak_full / GIB:.1f} GiB; "
            f"the step's own memory -> {extra_full / GIB:.2f} GiB; step time = {time_fit[0]:.1f} + "
            f"{time_fit[1]:.2f} x units + {time_fit[2]:.2f} x T5 layers s -> {time_full:.0f} s",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
