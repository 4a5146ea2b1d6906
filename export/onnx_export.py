"""PyTorch module -> cleaned, optionally fp16, ONNX file: one function per stage.

Stages for each model: ``torch.onnx.export`` (dynamo by default, TorchScript tracing as a
faster option) -> graph cleanup (polygraphy constant folding, onnx-graphsurgeon cleanup and
topological sort) -> fp16 conversion (optional) -> I/O dims named from the :class:`ModelSpec`
-> save, with the weights in one external-data file ``model.onnx_data`` when they pass 2 GB
(protobuf's limit).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx
import torch

from .errors import ExportError
from .specs import ModelSpec

Exporter = Literal["dynamo", "torchscript"]
MIN_OPSET = 18  # the dynamo exporter's UNet fails onnx.checker at 17
DEFAULT_OPSET = 19  # TensorRT demo/Diffusion's choice
PROTOBUF_LIMIT = 2**31 - 1
# Keep a margin below protobuf's limit for the graph itself (node attributes, names).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx_data"

log = logging.getLogger(__name__)


def export_model(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    spec: ModelSpec,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "dynamo",
    fp16: bool = False,
    progress: Callable[[str], None] = log.info,
    custom_translation_table: dict | None = None,
) -> Path:
    """Export ``module`` to ``path`` (``.../model.onnx``) following ``spec``; returns ``path``.

    ``example_inputs`` must match ``spec.inputs`` in order; their dynamic dims should be > 1 so
    the exporter does not specialise them. ``custom_translation_table`` (dynamo only) maps custom torch ops to
    ONNX functions, e.g. :func:`apl_export.trt_plugin.onnx_translation_table`.
    """
    if custom_translation_table and exporter != "dynamo":
        raise ExportError(f"{spec.name}: custom ONNX ops need the dynamo exporter, not {exporter!r}.")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the exported UNet needs opset >= {MIN_OPSET}; use 18 or 19.")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".raw-", dir=path.parent))
    try:
        progress(f"  {spec.name}: torch.onnx.export ({exporter}, opset {opset})")
        raw = _torch_export(
            module, example_inputs, spec, scratch / "model.onnx", opset, exporter, custom_translation_table
        )
        model = onnx.load(str(raw), load_external_data=True)
        progress(f"  {spec.name}: graph cleanup (constant folding, dead-node removal)")
        model = clean_graph(model)
        if fp16:
            progress(f"  {spec.name}: fp16 conversion (fp32 I/O kept, casts at the boundary)")
            model = convert_to_fp16(model)
        name_io_dims(model, spec)
        save_model(model, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _torch_export(
    module, example_inputs, spec: ModelSpec, path: Path, opset: int, exporter: Exporter, translation: dict | None = None
) -> Path:
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches; validation checks the result
        if exporter == "torchscript":
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                dynamo=False,
            )
        elif exporter == "dynamo":
            dynamic = {
                t.name: ({i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.dims) if isinstance(d, str)} or None)
                for t in spec.inputs
            }
            program = torch.onnx.export(
                module,
                example_inputs,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                verbose=False,
                custom_translation_table=translation or None,
            )
            program.save(str(path), external_data=_initializer_bytes(program.model_proto) > EXTERNAL_DATA_THRESHOLD)
        else:
            raise ExportError(f"Unknown exporter {exporter!r}: use 'dynamo' or 'torchscript'.")
    return path


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes
    return total


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold (polygraphy, below the protobuf limit) then drop dead nodes and sort (graphsurgeon).

    Models over 2 GB skip folding: polygraphy and onnxruntime need a serialized proto to fold.
    """
    import onnx_graphsurgeon as gs

    if _initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        import onnxruntime
        from polygraphy.backend.onnx import fold_constants
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.WARNING
        onnxruntime.set_default_logger_severity(3)  # folding runs ORT, which warns about every unfused node
        model = fold_constants(model, num_passes=2, error_ok=True, allow_onnxruntime_shape_inference=True)
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=False)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations to fp16; inputs and outputs stay fp32, so callers need not change."""
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Shape inference needs a serialized proto: skip it past protobuf's limit.
    big = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big)
    # The converter appends the boundary casts at the end of the node list: sort again.
    return gs.export_onnx(gs.import_onnx(model).toposort(), do_type_check=False)


def name_io_dims(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Give every graph input/output the dims of ``spec`` (``batch``, ``latent_height``...), and check names."""
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    pairs = (("inputs", graph_inputs, spec.inputs), ("outputs", model.graph.output, spec.outputs))
    for kind, actual, expected in pairs:
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ExportError(f"{spec.name}: exported {kind} are {names}, expected {[t.name for t in expected]}.")
        for value, tensor in zip(actual, expected):
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for d in tensor.dims:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model``; weights go to ``model.onnx_data`` next to it when the file would pass 2 GB."""
    for stale in (path, path.with_name(EXTERNAL_DATA_NAME)):
        stale.unlink(missing_ok=True)
    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )


def model_files(path: Path) -> list[Path]:
    """``model.onnx`` and its external-data file if any: what must be copied together."""
    data = path.with_name(EXTERNAL_DATA_NAME)
    return [path, data] if data.exists() else [path]
