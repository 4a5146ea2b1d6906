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
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Case:
    """One timed comparison: the module to export, its spec and example inputs, the ORT feed, the eager call."""

    title: str
    graph: torch.nn.Module
    spec: object
    example: tuple[torch.Tensor, ...]
    feed: dict[str, np.ndarray]
    torch_run: Callable[[], np.ndarray]


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


def text_encoder_case():
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
    spec = text_encoder_spec("text_encoder", 768, "pooler_output", 768, ShapeRanges().resolved(512))
    ids = load_clip_tokenizer()(["a photo of Ann Lee"], padding="max_length", max_length=77, return_tensors="pt")
    ids = ids.input_ids
    feed = {"input_ids": ids.numpy().astype(np.int32)}

    def torch_run():
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.numpy()

    return Case("text encoding (B=1, APL baked)", graph, spec, (torch.from_numpy(feed["input_ids"]),), feed, torch_run)


def unet_case():
    from apl_export.modules import UNetGraph
    from apl_export.specs import ShapeRanges, unet_spec
    from bench_export_unet import sd15_unet

    torch.manual_seed(0)
    graph = UNetGraph(sd15_unet())
    spec = unet_spec(768, 8, ShapeRanges().resolved(512))
    example = (torch.randn(2, 4, 64, 64), torch.tensor([999.0]), torch.randn(2, 77, 768))
    feed = {t.name: v.numpy() for t, v in zip(spec.inputs, example)}

    def torch_run():
        with torch.no_grad():
            return graph(*example).numpy()

    return Case("UNet step (2x4x64x64, SD 1.5)", graph, spec, example, feed, torch_run)


CASES = {"text_encoder": text_encoder_case, "unet": unet_case}


def export_case(name: str, path: Path) -> None:
    """Build the case's model (same seed as the timed one) and export it to ``path`` (TorchScript exporter)."""
    from apl_export.onnx_export import export_model

    case = CASES[name]()
    export_model(case.graph, case.example, case.spec, path, exporter="torchscript", progress=print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["text_encoder", "unet"], choices=["text_encoder", "unet"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for both torch and onnxruntime")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/apl-bench-onnx"))
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    for name in args.models:
        path = args.cache_dir / name / "model.onnx"
        if not path.exists():
            start = time.perf_counter()
            # A child process exports, so its peak memory is given back before anything is timed here.
            child = multiprocessing.get_context("spawn").Process(target=export_case, args=(name, path))
            child.start()
            child.join()
            if child.exitcode != 0 or not path.exists():
                raise SystemExit(f"[{name}] export failed (exit {child.exitcode})")
            print(f"[{name}] exported to {path} in {time.perf_counter() - start:.0f} s", flush=True)
        case = CASES[name]()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def ort_run(session=session, feed=case.feed):
            return session.run(None, feed)[0]

        error = float(np.abs(ort_run() - case.torch_run()).max())
        t_torch, t_ort = interleaved_medians([case.torch_run, ort_run], args.repeats)
        print(
            f"{case.title}: PyTorch eager {t_torch * 1e3:.1f} ms, onnxruntime {t_ort * 1e3:.1f} ms, "
            f"speedup x{t_torch / t_ort:.2f} (median of {args.repeats}, {args.threads} threads), "
            f"max abs error {error:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
