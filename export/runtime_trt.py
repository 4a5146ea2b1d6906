"""Generate images from an ``apl-export`` folder's TensorRT engines (needs a CUDA GPU).

The runtime owns its buffers, as TensorRT demo/Diffusion does: each engine gets device buffers
sized for its profile's max shapes, bound once with ``set_tensor_address``; a call copies inputs
into views of them, runs ``execute_async_v3`` on one CUDA stream, and returns views of the
outputs. All engines share one device-memory block for activations (they run one after
another on the same stream). With ``cuda_graphs=True`` each engine's launch is captured once per
input-shape signature and replayed.

The engines must be deserialized by the library that built them: the manifest names it
(``tensorrt`` or TensorRT-RTX). A ``--text-encoder fast`` export holds ``apl::PrefixAttention`` plugin nodes: the
plugin is registered (:func:`apl_export.trt_plugin.register_plugin`) before any engine is deserialized.

```python
>>> from apl_export.runtime_trt import TRTAPLPipeline
>>> pipe = TRTAPLPipeline.from_pretrained("sd15-apl-trt", cuda_graphs=True)  # doctest: +SKIP
>>> images = pipe("a photo of Ann Lee", generator=torch.Generator().manual_seed(0)).images  # doctest: +SKIP
```
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from .errors import ExportError
from .runtime_base import APLPipelineBase
from .tensorrt_loader import load_tensorrt

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                 "BOOL": torch.bool}  # fmt: skip


class TRTEngine:
    """One deserialized engine, its execution context and its pre-allocated I/O buffers."""

    def __init__(self, trt: ModuleType, runtime, path: Path, device: torch.device) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"Could not deserialize {path}: built for another GPU or TensorRT version? Rebuild it.")
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # activations come from the pipeline's shared block
            self.context = self.engine.create_execution_context(strategy.USER_MANAGED)
        else:
            self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.buffers = self._allocate(device)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    @property
    def device_memory_size(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def _allocate(self, device: torch.device) -> dict[str, torch.Tensor]:
        # Max shapes: inputs from profile 0, outputs from the context with every input at its max.
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(self.engine.get_tensor_profile_shape(name, 0)[2]))
        buffers = {}
        for name in self.names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            buffers[name] = torch.empty(max(1, _numel(shape)), dtype=dtype, device=device)
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    def infer(self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream, cuda_graphs: bool) -> dict:
        signature = []
        for name in self.inputs:
            value = inputs[name]
            self.context.set_input_shape(name, tuple(value.shape))
            view = self.buffers[name][: value.numel()].view(value.shape)
            view.copy_(value.to(view.dtype), non_blocking=True)
            signature.append(tuple(value.shape))
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = self.buffers[name][: _numel(shape)].view(shape)
        key = tuple(signature)
        if cuda_graphs and key in self.graphs:
            self.graphs[key].replay()
        else:
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError("TensorRT execute_async_v3 failed; see the TensorRT log above.")
            if cuda_graphs:  # the first run at a shape warms up; capture it for the next calls
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.context.execute_async_v3(stream.cuda_stream)
                self.graphs[key] = graph
        return outputs


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


class TRTAPLPipeline(APLPipelineBase):
    """The denoising loop of :class:`APLPipelineBase` on TensorRT engines (``<folder>/engines``)."""

    def __init__(self, folder: str | Path, cuda_graphs: bool = False, device: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise ExportError("The TensorRT runtime needs a CUDA GPU; use ORTAPLPipeline on a CPU-only machine.")
        super().__init__(folder)
        engines = self.manifest.get("engines")
        if not engines:
            raise ExportError(f"{self.folder} has no TensorRT engines; export with --trt.")
        module = engines["builder"].split()[0]
        self.trt = load_tensorrt(prefer=module)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graphs = cuda_graphs
        if self.manifest.get("text_encoder_variant") == "fast" or any(
            info.get("plugins") for info in engines["models"].values()
        ):
            from .trt_plugin.plugin import register_plugin

            register_plugin(self.trt)  # the fast text encoder's apl::PrefixAttention nodes: before deserializing
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines = {
            name: TRTEngine(self.trt, self.runtime, self.folder / info["path"], self.device)
            for name, info in engines["models"].items()
        }
        # One activation block for all engines: they run one at a time on self.stream.
        size = max(e.device_memory_size for e in self.engines.values())
        self.shared_memory = torch.empty(max(1, size), dtype=torch.uint8, device=self.device)
        for engine in self.engines.values():
            if hasattr(engine.context, "device_memory"):
                engine.context.device_memory = self.shared_memory.data_ptr()

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> TRTAPLPipeline:
        return cls(folder, **kwargs)

    def infer(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.cuda.stream(self.stream):
            gpu_inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            outputs = self.engines[name].infer(gpu_inputs, self.stream, self.cuda_graphs)
            self.stream.synchronize()
        # The loop of APLPipelineBase runs the scheduler on the CPU tensors it created.
        return {k: v.float().cpu() for k, v in outputs.items()}
