"""Export time and peak memory of the real-size Stable Diffusion 1.5 UNet (random weights) to ONNX.

Each exporter runs in its own child process, so its peak resident memory (``ru_maxrss``) is its
own. The child builds the UNet (859 M parameters, 3.4 GB fp32), exports it through
``apl_export.onnx_export.export_model`` (torch export -> cleanup -> external data, since it is
over 2 GB), runs ``onnx.checker`` on the file and, with ``--validate``, compares one onnxruntime
step at 64x64 latents with PyTorch (atol 1e-3).

    python benchmarks/bench_export_unet.py                       # dynamo (the default exporter)
    python benchmarks/bench_export_unet.py --exporters dynamo torchscript --validate

Prints one line per exporter: export seconds, peak RSS in GiB up to the end of the export
(``peak_rss_export_GiB``) and over the whole child including validation (``peak_rss_GiB``), files.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sd15_unet():
    """UNet2DConditionModel with Stable Diffusion 1.5's config (diffusers' defaults are SD 1.x's)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def child(exporter: str, out: Path, validate: bool) -> dict:
    import numpy as np
    import onnx
    import torch
    from apl_export.modules import UNetGraph
    from apl_export.onnx_export import export_model, model_files
    from apl_export.specs import ShapeRange, ShapeRanges, unet_spec
    from apl_export.validate import check_structure, compare_with_torch

    torch.manual_seed(0)
    start = time.perf_counter()
    graph = UNetGraph(sd15_unet())
    build_s = time.perf_counter() - start
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    spec = unet_spec(768, 8, ShapeRanges(batch=ShapeRange(1, 1, 4)).resolved(512))
    example = (torch.randn(2, 4, 64, 64), torch.tensor([999.0]), torch.randn(2, 77, 768))
    path = out / "unet" / "model.onnx"
    start = time.perf_counter()
    export_model(graph, example, spec, path, exporter=exporter, progress=lambda s: print(s, flush=True))
    export_s = time.perf_counter() - start
    rss_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak so far: model + export
    start = time.perf_counter()
    check_structure(path, spec)
    check_s = time.perf_counter() - start
    result = {
        "exporter": exporter,
        "parameters_M": sum(p.numel() for p in graph.parameters()) / 1e6,
        "build_model_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "checker_s": round(check_s, 1),
        "rss_after_model_GiB": round(rss_model, 2),
        "peak_rss_export_GiB": round(rss_export, 2),
        "files": {p.name: round(p.stat().st_size / 2**30, 3) for p in model_files(path)},
        "graph_nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
    }
    if validate:
        feed = {k.name: v.numpy() for k, v in zip(spec.inputs, example)}
        start = time.perf_counter()
        report = compare_with_torch(path, graph, spec, [feed], atol=1e-3, progress=lambda s: print(s, flush=True))
        result["validate_s"] = round(time.perf_counter() - start, 1)
        result["max_abs_error"] = float(np.max(list(report.max_abs_error.values())))
    result["peak_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exporters", nargs="+", default=["dynamo"], choices=["dynamo", "torchscript"])
    parser.add_argument("--validate", action="store_true", help="also compare one onnxruntime step with PyTorch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.out), args.validate)), flush=True)
        return
    for exporter in args.exporters:
        with tempfile.TemporaryDirectory(prefix="bench-unet-", dir="/tmp") as tmp:
            cmd = [sys.executable, __file__, "--child", exporter, "--out", tmp]
            cmd += ["--validate"] if args.validate else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{exporter}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            print(f"SD 1.5 UNet ({result['parameters_M']:.0f} M params), exporter={exporter}: " + json.dumps(result))


if __name__ == "__main__":
    main()
