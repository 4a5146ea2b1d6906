"""Compile check of the CUDA kernels (``make cuda-check``): every ``csrc/*.cu`` is compiled with nvcc for sm_80 and
sm_90. The .cu sources include no torch header (the torch CPU wheel ships no c10/cuda headers), so the check needs the
CUDA toolkit only. Nothing runs: this machine class has no GPU, so the check proves only that the device code (the
shared row math of ``csrc/prefix_attention.h`` included) compiles for both architectures and every storage type.

Exits 0 with a message when nvcc is absent; any compile error fails it.

    python tools/cuda_check.py            # all csrc/*.cu, sm_80 + sm_90
    python tools/cuda_check.py --arch 90  # one architecture
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("80", "90")


def nvcc_command(source: Path, output: Path, archs: tuple[str, ...]) -> list[str]:
    """The nvcc line of a CUDAExtension build for this source, minus the link step."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [
        "nvcc",
        "-c",
        str(source),
        "-o",
        str(output),
        *gencode,
        f"-I{CSRC}",
        "-std=c++20",
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-Xcompiler=-fPIC",
        # Same half/bf16 operator switches as torch's own CUDA extension builds.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="SM architecture, e.g. 80 (repeatable; default 80 and 90)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or DEFAULT_ARCHS)

    if shutil.which("nvcc") is None:
        print("cuda-check: nvcc not found on PATH; skipping the CUDA compile check (the CPU kernel is unaffected).")
        return 0
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        print("cuda-check: no csrc/*.cu sources")
        return 1
    failed = 0
    with tempfile.TemporaryDirectory(prefix="apl-cuda-check-") as tmp:
        for source in sources:
            start = time.perf_counter()
            cmd = nvcc_command(source, Path(tmp) / (source.stem + ".o"), archs)
            result = subprocess.run(cmd, capture_output=True, text=True)
            took = time.perf_counter() - start
            if result.returncode != 0:
                failed += 1
                print(f"cuda-check: FAILED {source.relative_to(ROOT)} for sm_{'/sm_'.join(archs)} ({took:.0f} s)")
                print(result.stderr[-6000:], file=sys.stderr)
            else:
                print(f"cuda-check: ok {source.relative_to(ROOT)} for sm_{'/sm_'.join(archs)} ({took:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
