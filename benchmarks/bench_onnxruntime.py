"""onnxruntime vs PyTorch eager on the CPU: one text encoding with the APL prefix, one UNet step.

Real-size Stable Diffusion 1.5 configs with random weights (CLIP ViT-L/14 text tower with a
baked m=10 prefix; the 859 M-parameter UNet at 512x512, i.e. 64x64 latents, batch 2 as under
classifier-free guidance). Both backends run side by side in this one process with the same
thread count; each number is the median of ``--repeats`` interleaved runs after one warm-up, and the
outputs are compared (max abs error) so a fast wrong graph cannot pass unnoticed.

    python benchmarks/bench_onnxruntime.py                        # text encoder and UNet
    python benchmarks/bench_onnxruntime.py --models text_encoder --repeats 20

The ONNX files are exported once into ``--cache-dir`` (TorchScript exporter: minutes, not tens
of minutes, for the UNet) and reused.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def interleaved_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function; runs alternate, so load from other processes hits both alike."""
    for fn in fns:
        fn()  # warm-up: allocations, ORT graph optimisation
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def text_encoder_case(cache: Path):
    from apl_export.modules import CLIPTextEncoderGraph
    from apl_export.specs import ShapeRanges, text_encoder_spec
    from peft import get_peft_model
    from transformers import CLIPTextModel

    from apl_adapter import APLConfig
    from apl_adapter.testing import sd15_text_config
    from apl_adapter.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(CLIPTextModel(sd15_text_config()).eval(), APLConfig()).eval()
    prefix = model.get_base_model().embeddings.apl_prefix["default"].detach()
    graph = CLIPTextEncoderGraph(model.get_base_model(), prefix=prefix)
    spec = text_encoder_spec("text_encoder", 768, "pooler_output", 768, ShapeRanges())
    ids = load_clip_tokenizer()(["a photo of Ann Lee"], padding="max_length", max_length=77, return_tensors="pt")
    ids = ids.input_ids
    feed = {"input_ids": ids.numpy().astype(np.int32)}

    def torch_run():
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.numpy()

    return "text encoding (B=1, APL baked)", graph, spec, (torch.from_numpy(feed["input_ids"]),), feed, torch_run


def unet_case(cache: Path):
    from apl_export.modules import UNetGraph
    from apl_export.specs import ShapeRanges, unet_spec
    from bench_export_unet import sd15_unet

    torch.manual_seed(0)
    graph = UNetGraph(sd15_unet())
    spec = unet_spec(768, 8, ShapeRanges())
    example = (torch.randn(2, 4, 64, 64), torch.tensor([999.0]), torch.randn(2, 77, 768))
    feed = {t.name: v.numpy() for t, v in zip(spec.inputs, example)}

    def torch_run():
        with torch.no_grad():
            return graph(*example).numpy()

    return "UNet step (2x4x64x64, SD 1.5)", graph, spec, example, feed, torch_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["text_encoder", "unet"], choices=["text_encoder", "unet"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for both torch and onnxruntime")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/apl-bench-onnx"))
    args = parser.parse_args()

    import onnxruntime as ort
    from apl_export.onnx_export import export_model

    torch.set_num_threads(args.threads)
    cases = {"text_encoder": text_encoder_case, "unet": unet_case}
    for name in args.models:
        title, graph, spec, example, feed, torch_run = cases[name](args.cache_dir)
        path = args.cache_dir / name / "model.onnx"
        if not path.exists():
            start = time.perf_counter()
            export_model(graph, example, spec, path, exporter="torchscript", progress=lambda s: None)
            print(f"[{name}] exported to {path} in {time.perf_counter() - start:.0f} s", flush=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def ort_run(session=session, feed=feed):
            return session.run(None, feed)[0]

        error = float(np.abs(ort_run() - torch_run()).max())
        t_torch, t_ort = interleaved_medians([torch_run, ort_run], args.repeats)
        print(
            f"{title}: PyTorch eager {t_torch * 1e3:.1f} ms, onnxruntime {t_ort * 1e3:.1f} ms, "
            f"speedup x{t_torch / t_ort:.2f} (median of {args.repeats}, {args.threads} threads), "
            f"max abs error {error:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
