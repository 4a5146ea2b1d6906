"""Cost of the APL prefix: prefixed vs plain forward of a real-size SD 1.5 text encoder (random weights).

Both variants run on the same module (the adapter toggled with ``disable_adapter()``),
interleaved repeat by repeat so machine noise hits both alike; the ratio is of medians.

    python benchmarks/bench_prefix_overhead.py [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from transformers import CLIPTextModel

from apl_adapter import APLConfig, load_clip_tokenizer
from apl_adapter.testing import sd15_text_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_peft_model(CLIPTextModel(sd15_text_config()), APLConfig()).eval()
    tokenizer = load_clip_tokenizer()
    prompts = ["a photo of Ann Lee", "a close-up portrait of a smiling person in a garden, 35mm"]
    print(
        f"SD 1.5 text encoder (768 wide, 12 layers), m=10, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>5} {'plain ms':>10} {'prefixed ms':>12} {'prefixed/plain':>15}")
    for batch in args.batches:
        ids = tokenizer((prompts * batch)[:batch], padding="max_length", max_length=77, return_tensors="pt").input_ids
        plain, prefixed = [], []
        with torch.inference_mode():
            for _ in range(2):  # warm-up
                model(input_ids=ids)
            for _ in range(args.repeats):
                with model.disable_adapter():
                    start = time.perf_counter()
                    model(input_ids=ids)
                    plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                model(input_ids=ids)
                prefixed.append(time.perf_counter() - start)
        p, q = statistics.median(plain), statistics.median(prefixed)
        print(f"{batch:>5} {p * 1e3:>10.1f} {q * 1e3:>12.1f} {q / p:>15.3f}")


if __name__ == "__main__":
    main()
