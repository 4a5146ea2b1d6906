"""The TensorRT plugin for ``apl::PrefixAttention`` nodes, written with TensorRT's Python plugin API
(``IPluginV3`` + ``IPluginCreatorV3One``, the only kind TensorRT-RTX imports); works with ``tensorrt`` and with the
TensorRT-RTX bindings.

TensorRT's ONNX parser imports the node as a plugin when a creator named ``PrefixAttention`` (namespace ``apl``,
version ``1``) is registered: :func:`register_plugin` registers one. At run time (GPU) its ``enqueue`` runs the CUDA
kernel of ``apl_adapter._C`` on TensorRT's stream, so the process that deserializes the engine must call
:func:`register_plugin` first.
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

from ..errors import ExportError
from .onnx_op import OP_DOMAIN, OP_NAME, OP_VERSION


def _tensor_from_pointer(pointer: int, desc, trt: ModuleType) -> torch.Tensor:
    """A torch CUDA tensor over TensorRT's buffer (no copy), through the CUDA array interface."""
    shape = tuple(desc.dims)
    storage, view = {
        trt.DataType.FLOAT: ("<f4", None),
        trt.DataType.HALF: ("<f2", None),
        trt.DataType.BF16: ("<i2", torch.bfloat16),  # the interface has no bf16 code: read bits, view as bf16
    }[desc.type]

    interface = {"shape": shape, "typestr": storage, "data": (int(pointer), False), "version": 3}
    tensor = torch.as_tensor(SimpleNamespace(__cuda_array_interface__=interface), device="cuda")
    return tensor.view(view) if view is not None else tensor


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The plugin and creator classes for one TensorRT module (``tensorrt`` or the TensorRT-RTX bindings)."""
    supported = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)

    class PrefixAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """Inputs q, k, v ``(B, H, L, D)``, k_prefix, v_prefix ``(1 or B, H, P, D)``; output like q."""

        def __init__(self, causal: int = 1, scale: float = 0.0, log: list[str] | None = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = OP_NAME, OP_DOMAIN, OP_VERSION
            self.num_outputs = 1
            self.causal, self.scale = int(causal), float(scale)
            # Builder callbacks seen, shared by clones (the CPU-side check reports them).
            self.callbacks: list[str] = [] if log is None else log

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return PrefixAttentionPlugin(self.causal, self.scale, self.callbacks)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(
                [
                    trt.PluginField("causal", np.array([self.causal], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("scale", np.array([self.scale], np.float32), trt.PluginFieldType.FLOAT32),
                ]
            )

        def get_output_data_types(self, input_types):
            self.callbacks.append("get_output_data_types")
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            self.callbacks.append("get_output_shapes")
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            self.callbacks.append("supports_format_combination")
            desc = in_out[pos].desc
            return (
                desc.format == trt.TensorFormat.LINEAR
                and desc.type in supported
                and desc.type == in_out[0].desc.type  # one storage type for all five inputs and the output
            )

        def configure_plugin(self, inputs, outputs):
            self.callbacks.append("configure_plugin")

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            # GPU only (not run on this project's CPU machines): the CUDA kernel of apl_adapter._C on TRT's stream.
            from apl_adapter.ops import has_fused_kernel

            if not has_fused_kernel("cuda"):
                raise RuntimeError("apl_adapter._C was built without CUDA; rebuild it with a CUDA torch")
            tensors = [_tensor_from_pointer(p, d, trt) for p, d in zip(inputs, input_desc)]
            out = _tensor_from_pointer(outputs[0], output_desc[0], trt)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                result = torch.ops.apl.prefix_attention(*tensors, bool(self.causal), self.scale or None)
                out.copy_(result)  # the kernel writes (B, L, H, D)-strided memory; TensorRT wants q's layout

    class PrefixAttentionPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = OP_NAME, OP_DOMAIN, OP_VERSION
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField("causal", np.array([1], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("scale", np.array([0.0], np.float32), trt.PluginFieldType.FLOAT32),
                ]
            )
            self.created: list[PrefixAttentionPlugin] = []

        def create_plugin(self, name, fields, phase):
            values = {f.name: np.asarray(f.data).reshape(-1)[0] for f in fields}
            plugin = PrefixAttentionPlugin(int(values.get("causal", 1)), float(values.get("scale", 0.0)))
            self.created.append(plugin)  # TensorRT holds raw pointers: keep the Python objects alive
            return plugin

    return PrefixAttentionPlugin, PrefixAttentionPluginCreator


_CREATORS: dict[str, object] = {}


def register_plugin(trt: ModuleType):
    """Register the ``apl::PrefixAttention`` creator with ``trt``'s plugin registry (once per module); returns it."""
    if trt.__name__ not in _CREATORS:
        _, creator_cls = plugin_classes(trt)
        creator = creator_cls()
        if not trt.get_plugin_registry().register_creator(creator, OP_DOMAIN):
            raise ExportError(f"TensorRT refused to register the {OP_DOMAIN}::{OP_NAME} plugin creator")
        _CREATORS[trt.__name__] = creator
    return _CREATORS[trt.__name__]
