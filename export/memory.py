"""How much memory an export stage needs, read before anything big is loaded, and a clear stop where it does not fit.

Real SD3 / FLUX components are large (T5 v1.1 XXL: 4.76 B parameters, 19 GB in fp32; FLUX.1's transformer 11.9 B,
48 GB), so each stage estimates its peak from the weights' sizes and compares it with what the machine has
(``MemAvailable``), naming the model, both figures and what to do, instead of being killed half way:

- **ONNX export + validation** (:func:`export_need_bytes`): every component held in fp32 (the PyTorch reference the
  graphs are checked against) plus :data:`EXPORT_COPIES` more copies of the largest one: the exporter's ONNX proto,
  the cleaned proto and the onnxruntime session that validates it. SD 1.5 by the same rule: 4.3 GB of fp32
  weights + 3 x 3.4 GB (UNet) = 14.6 GB, against 13.3-13.4 GiB (14.3 GB) measured
  (``benchmarks/bench_export_unet.py``).
- **TensorRT engine build** (:func:`engine_need_bytes`): the parsed network's weights and the engine being built,
  :data:`ENGINE_COPIES` x the ONNX weights (fp16 ONNX halves it). An estimate, not a measurement at real size.

Parameter counts come from the ``*.safetensors`` headers of each component folder (shapes and dtypes; no tensor is
read), so the check runs before the pipeline is loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError, InsufficientMemoryError

GIB = 2**30
EXPORT_COPIES = 3
ENGINE_COPIES = 2
FP32_BYTES = 4


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where it cannot be read: the checks then pass)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def safetensors_parameters(folder: Path) -> int:
    """The number of parameters in the ``*.safetensors`` files of ``folder`` (from their headers only)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError) as err:
            raise ExportError(f"{path} is not a readable safetensors file ({err}); re-save the pipeline.") from err
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    return total


@dataclass(frozen=True)
class ComponentSizes:
    """Parameter counts of a pipeline's components, ``{folder name: parameters}`` (those with weights)."""

    parameters: dict[str, int]

    @classmethod
    def read(cls, model_dir: Path, components: tuple[str, ...]) -> ComponentSizes:
        return cls(
            {name: safetensors_parameters(model_dir / name) for name in components if (model_dir / name).is_dir()}
        )

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.parameters.items(), key=lambda item: item[1], default=("nothing", 0))

    def describe(self) -> str:
        """``"transformer 2.03 B, text_encoder_3 4.76 B ..."`` (largest first)."""
        ordered = sorted(self.parameters.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {_count(n)}" for name, n in ordered)


def export_need_bytes(sizes: ComponentSizes) -> int:
    """Peak of ONNX export + validation: every component in fp32 plus :data:`EXPORT_COPIES` of the largest."""
    return FP32_BYTES * (sum(sizes.parameters.values()) + EXPORT_COPIES * sizes.largest[1])


def engine_need_bytes(onnx_weight_bytes: int) -> int:
    """Peak of one TensorRT engine build from ONNX weights of ``onnx_weight_bytes``."""
    return ENGINE_COPIES * onnx_weight_bytes


def check_fits(need: int, what: str, advice: str, have: int | None = None) -> None:
    """Raise :class:`InsufficientMemoryError` naming ``what``, the memory needed and available, and ``advice``, when
    ``need`` exceeds the available memory (``have``, else :func:`available_memory`)."""
    have = available_memory() if have is None else have
    if have is not None and need > have:
        raise InsufficientMemoryError(
            f"{what} needs about {need / GIB:.1f} GiB of memory, but this machine has {have / GIB:.1f} GiB available. "
            f"{advice}"
        )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
