"""Validation after export, fatal on failure: checker, I/O names and shapes, onnxruntime vs PyTorch.

Values are compared with polygraphy's :class:`Comparator` (one runner for onnxruntime, one for
the PyTorch module) on several feeds: random and real inputs at the optimization-profile shapes.
Tolerances are absolute, on the maximum error over every element; each exported model has its own
(:mod:`.exported_models`). The PyTorch side always runs in fp32.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .errors import ValidationError
from .specs import ModelSpec


class TorchRunner(BaseRunner):
    """A polygraphy runner for a PyTorch module on the CPU (polygraphy's own ``PytRunner`` needs CUDA)."""

    def __init__(self, module: torch.nn.Module, spec: ModelSpec, name: str = "pytorch") -> None:
        super().__init__(name=name, prefix="pytorch-runner")
        self.module = module
        self.spec = spec

    def activate_impl(self) -> None:
        self.module.eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for tensor in self.spec.inputs:
            meta.add(tensor.name, tensor.dtype, tensor.dims)
        return meta

    def infer_impl(self, feed_dict):
        inputs = [torch.from_numpy(np.ascontiguousarray(feed_dict[t.name])) for t in self.spec.inputs]
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(*inputs)
        self.inference_time = time.perf_counter() - start
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return OrderedDict((n, o.float().contiguous().numpy()) for n, o in zip(self.spec.output_names, outputs))

    def deactivate_impl(self) -> None:
        pass


@dataclass
class ValidationReport:
    """What was checked for one model; ``max_abs_error`` per output over all feeds."""

    name: str
    atol: float
    feeds: int
    max_abs_error: dict[str, float]
    method: str = "onnxruntime vs PyTorch"
    note: str | None = None

    def as_dict(self) -> dict:
        out = {"method": self.method, "atol": self.atol, "feeds": self.feeds, "max_abs_error": self.max_abs_error}
        return out if self.note is None else {**out, "note": self.note}


def check_structure(path: Path, spec: ModelSpec) -> None:
    """``onnx.checker`` on the file (path-based, so external data works), then I/O names and dtypes."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise ValidationError(f"{path}: onnx.checker failed: {err}") from err
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    for kind, actual, expected in (("inputs", inputs, spec.inputs), ("outputs", model.graph.output, spec.outputs)):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ValidationError(f"{path}: {kind} are {names}, expected {[t.name for t in expected]}.")
        for value, tensor in zip(actual, expected):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            if dtype != tensor.dtype:
                raise ValidationError(f"{path}: {kind[:-1]} {value.name} is {dtype}, expected {tensor.dtype}.")


def check_finite(path: Path, name: str, outputs: dict[str, np.ndarray]) -> None:
    """Fail on NaN / Inf in an output, by name: an error of NaN would otherwise read as 0 in a running max."""
    for source, values in outputs.items():
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise ValidationError(
                f"{path}: output {name} from {source} has {bad} non-finite values (NaN/Inf) of {np.size(values)}; "
                "the model overflows on the validation inputs. Check the adapter (apl-adapter inspect) and drop "
                "--fp16 if the overflow is in half precision."
            )


def compare_with_torch(
    path: Path,
    module: torch.nn.Module,
    spec: ModelSpec,
    feeds: Sequence[dict[str, np.ndarray]],
    atol: float,
    progress: Callable[[str], None] = print,
) -> ValidationReport:
    """Run ``feeds`` through onnxruntime and ``module``; fail unless shapes match and max |diff| <= ``atol``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # polygraphy prints every feed at INFO

    ort_runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name="onnxruntime")
    torch_runner = TorchRunner(module, spec)
    results = Comparator.run([torch_runner, ort_runner], data_loader=list(feeds))
    # Shapes first, with a message that names the output; then values.
    worst: dict[str, float] = {}
    for torch_out, ort_out in zip(results[torch_runner.name], results[ort_runner.name]):
        for name in spec.output_names:
            if name not in ort_out:
                raise ValidationError(f"{path}: onnxruntime gave no output {name!r} (got {list(ort_out.keys())}).")
            expected, actual = torch_out[name], ort_out[name]
            if tuple(actual.shape) != tuple(expected.shape):
                raise ValidationError(
                    f"{path}: output {name} has shape {tuple(actual.shape)}, PyTorch gives {tuple(expected.shape)}."
                )
            check_finite(path, name, {"PyTorch": expected, "onnxruntime": actual})
            error = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
            worst[name] = max(worst.get(name, 0.0), error)
    compare = CompareFunc.simple(atol=atol, rtol=0.0, check_error_stat="max", check_shapes=True)
    accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    if not bool(accuracy) or any(not np.isfinite(e) or e > atol for e in worst.values()):
        raise ValidationError(
            f"{path}: onnxruntime differs from PyTorch beyond atol={atol:g}: max abs error "
            + ", ".join(f"{k}={v:.3g}" for k, v in worst.items())
            + ". Re-export with --exporter dynamo, or check for unsupported ops."
        )
    progress(f"  {spec.name}: onnxruntime vs PyTorch, {len(feeds)} feeds, max abs error {max(worst.values()):.2e}")
    return ValidationReport(spec.name, atol, len(feeds), worst)


def run_onnx_reference(path: Path, feed: dict[str, np.ndarray], spec: ModelSpec, new_ops: list) -> dict:
    """The ONNX file run by :class:`onnx.reference.ReferenceEvaluator` (custom nodes from ``new_ops``)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path), new_ops=new_ops)
    outputs = evaluator.run(None, {t.name: feed[t.name] for t in spec.inputs})
    return dict(zip(spec.output_names, outputs))


def compare_custom_op_graph(
    path: Path,
    graph: torch.nn.Module,
    reference: torch.nn.Module,
    spec: ModelSpec,
    feeds: Sequence[dict[str, np.ndarray]],
    atol: float,
    new_ops: list,
    note: str,
    progress: Callable[[str], None] = print,
) -> ValidationReport:
    """For graphs onnxruntime cannot run (custom nodes): two checks against the ``reference`` module, same feeds,
    shapes and max-abs-error rule as :func:`compare_with_torch`:

    * ``onnx``: the exported file, run by onnx's ``ReferenceEvaluator`` with ``new_ops`` implementing the custom nodes;
    * ``torch``: the PyTorch ``graph`` that was exported (the path a TensorRT plugin's kernel takes).
    """
    worst: dict[str, float] = {}
    for feed in feeds:
        expected = TorchRunner(reference, spec).infer_impl(feed)
        candidates = {
            "onnx": run_onnx_reference(path, feed, spec, new_ops),
            "torch": TorchRunner(graph, spec).infer_impl(feed),
        }
        for source, outputs in candidates.items():
            for name in spec.output_names:
                actual = np.asarray(outputs[name])
                if tuple(actual.shape) != tuple(expected[name].shape):
                    raise ValidationError(
                        f"{path}: output {name} ({source}) has shape {tuple(actual.shape)}, the reference gives "
                        f"{tuple(expected[name].shape)}."
                    )
                check_finite(path, name, {"the reference": expected[name], source: actual})
                error = float(np.max(np.abs(actual.astype(np.float64) - expected[name].astype(np.float64)), initial=0))
                key = f"{name}/{source}"
                worst[key] = max(worst.get(key, 0.0), error)
    if any(not np.isfinite(e) or e > atol for e in worst.values()):
        raise ValidationError(
            f"{path}: the exported graph differs from the reference beyond atol={atol:g}: max abs error "
            + ", ".join(f"{k}={v:.3g}" for k, v in worst.items())
            + ". Export with --text-encoder standard."
        )
    progress(f"  {spec.name}: ONNX reference evaluator and exported PyTorch graph vs reference, {len(feeds)} feeds, "
             f"max abs error {max(worst.values()):.2e}")  # fmt: skip
    method = "onnx.reference.ReferenceEvaluator (custom node in NumPy) and exported PyTorch graph vs reference"
    return ValidationReport(spec.name, atol, len(feeds), worst, method=method, note=note)
