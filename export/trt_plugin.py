"""The fused prefix attention in exported graphs: the ONNX custom node ``apl::PrefixAttention`` and its TensorRT plugin.

The "fast" text encoder (:class:`FastCLIPTextEncoderGraph`) bakes the APL prefix as per-layer keys/values computed
once (:class:`apl_adapter.prefix_cache.CachedPrefixEncoder`) and runs only the prompt positions; each layer's
attention is one ``torch.ops.apl.prefix_attention`` call, exported as an ``apl::PrefixAttention`` node (opset
domain ``apl``, version 1; attributes ``causal``, ``scale``, ``plugin_namespace="apl"``, ``plugin_version="1"``).

TensorRT's ONNX parser imports that node as a plugin when a creator named ``PrefixAttention`` (namespace ``apl``,
version ``1``) is registered: :func:`register_plugin` registers one written with TensorRT's Python plugin API
(``IPluginV3`` + ``IPluginCreatorV3One``, the only kind TensorRT-RTX imports). It works with ``tensorrt`` and with
the TensorRT-RTX bindings. At run time (GPU) its ``enqueue`` runs the CUDA kernel of ``apl_adapter._C`` on
TensorRT's stream, so the process that deserializes the engine must call :func:`register_plugin` first.

``apl-export --text-encoder fast`` exports this graph as ``text_encoder`` (``TEXT_ENCODER_VARIANTS["fast"]``),
validates it with :func:`onnx_reference_ops` (onnxruntime cannot run the node), and with ``--trt`` builds its engine
in a child process with :func:`plugin_process_env` (``python -m apl_export.engines --plugin-build``).

What has been checked where: on this project's CPU machines, TensorRT-RTX parses the exported graph and builds a
serialized engine with the plugin (the builder calls the plugin's shape, type and format callbacks); ``enqueue``
needs a GPU and has not run here.

TensorRT-RTX 1.7's ONNX parser ``dlopen``s ``libtensorrt_rtx.so`` (unversioned) for plugin nodes, and the wheel
ships only ``libtensorrt_rtx.so.1``: :func:`plugin_process_env` gives the environment (``LD_LIBRARY_PATH`` with a
symlink) a builder process needs; without it the parser aborts the process (see :mod:`apl_export.tensorrt_loader`).

Example (builds in a child process, as the loader path must be set before TensorRT loads):

```python
>>> import subprocess, sys
>>> from apl_export.trt_plugin import plugin_process_env
>>> cmd = [sys.executable, "-m", "apl_export.trt_plugin", "--check-build"]
>>> subprocess.run(cmd, env=plugin_process_env(), check=True)  # doctest: +SKIP
```
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import torch
from torch import nn

from apl_adapter.model import PrefixWeights

from .errors import ExportError
from .modules import BakedPrefixStateGraph
from .tensorrt_loader import load_tensorrt
from .tensorrt_loader import plugin_process_env as plugin_process_env  # public here too: how plugin engines build

OP_DOMAIN = "apl"
OP_NAME = "PrefixAttention"
OP_VERSION = "1"
_ONNX_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


# ----------------------------------------------------------------------------------------------------------------
# ONNX: the custom node
# ----------------------------------------------------------------------------------------------------------------


def register_onnx_schema() -> None:
    """Declare ``apl::PrefixAttention`` to onnx (once), so onnxscript and the checker know its signature."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_NAME, OP_DOMAIN):
        return
    attr = OpSchema.Attribute
    schema = OpSchema(
        OP_NAME,
        OP_DOMAIN,
        1,
        doc="softmax([q k_prefix^T | q k^T (causal, bottom-right)] * scale) [v_prefix ; v]; see apl_adapter.ops",
        inputs=[OpSchema.FormalParameter(name, "T") for name in ("q", "k", "v", "k_prefix", "v_prefix")],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", _ONNX_TYPES, "storage type; the kernel accumulates in fp32")],
        attributes=[
            attr("causal", OpSchema.AttrType.INT, "1: request keys masked causally (bottom-right)"),
            attr("scale", OpSchema.AttrType.FLOAT, "softmax scale; 0 means 1/sqrt(head_dim)"),
            attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace (apl)"),
            attr("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version (1)"),
        ],
    )
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the op becomes one custom node."""
    from onnxscript.values import Opset

    register_onnx_schema()
    opset = Opset(OP_DOMAIN, 1)

    def prefix_attention_onnx(q, k, v, k_prefix, v_prefix, causal: bool = True, scale: float | None = None):
        return opset.PrefixAttention(
            q,
            k,
            v,
            k_prefix,
            v_prefix,
            causal=int(causal),
            scale=float(scale or 0.0),
            plugin_namespace=OP_DOMAIN,
            plugin_version=OP_VERSION,
        )

    return {torch.ops.apl.prefix_attention.default: prefix_attention_onnx}


def prefix_attention_numpy(q, k, v, k_prefix, v_prefix, causal: int = 1, scale: float = 0.0) -> np.ndarray:
    """``apl::PrefixAttention`` in NumPy (float64 accumulation), from the op's definition: softmax over the prefix
    keys (unmasked) and the request keys (causal, bottom-right aligned), times ``[v_prefix ; v]``."""
    batch, _, length, dim = q.shape
    k_all = np.concatenate([np.broadcast_to(k_prefix, (batch, *k_prefix.shape[1:])), k], axis=2).astype(np.float64)
    v_all = np.concatenate([np.broadcast_to(v_prefix, (batch, *v_prefix.shape[1:])), v], axis=2).astype(np.float64)
    scores = (q.astype(np.float64) @ np.swapaxes(k_all, -1, -2)) * (scale or 1.0 / np.sqrt(dim))
    if causal:
        keys = k.shape[2]  # bottom-right: query i sees request keys j <= i + keys - length
        masked = np.arange(keys)[None, :] > np.arange(length)[:, None] + (keys - length)
        scores[..., k_all.shape[2] - keys :][..., masked] = -np.inf
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v_all).astype(q.dtype)


def onnx_reference_ops() -> list[type]:
    """``new_ops`` for :class:`onnx.reference.ReferenceEvaluator`: runs exported graphs holding the custom node."""
    from onnx.reference.op_run import OpRun

    class PrefixAttention(OpRun):
        op_domain = OP_DOMAIN

        def _run(self, q, k, v, k_prefix, v_prefix, causal=1, scale=0.0, plugin_namespace=None, plugin_version=None):
            return (prefix_attention_numpy(q, k, v, k_prefix, v_prefix, int(causal), float(scale)),)

    return [PrefixAttention]


class FastCLIPTextEncoderGraph(BakedPrefixStateGraph):
    """CLIP text encoder with a baked APL prefix whose K/V are graph constants; int32 ``input_ids`` ``(B, 77)``.

    Same outputs as ``apl_export.modules.CLIPTextEncoderGraph`` with a baked prefix: ``last_hidden_state``
    ``(B, 77, D)`` and ``pooler_output`` ``(B, D)`` (``text_embeds`` for ``CLIPTextModelWithProjection``), but only
    positions ``m+1..76`` are computed; attention is ``torch.ops.apl.prefix_attention`` (exported as
    ``apl::PrefixAttention``). A deep prefix's per-layer rows are part of those constants.
    """

    def __init__(self, text_encoder: nn.Module, prefix: torch.Tensor | PrefixWeights) -> None:
        super().__init__(text_encoder, prefix, use_kernel=True)


def make_fast_text_encoder(
    clip: nn.Module, prefix: torch.Tensor | PrefixWeights | None, prefix_as_input: bool, m: int
) -> nn.Module:
    """Entry for ``apl_export.exporter.TEXT_ENCODER_VARIANTS["fast"]`` (same arguments as the standard graph)."""
    if prefix_as_input or prefix is None:
        raise ExportError(
            "The fast text encoder bakes the prefix's keys and values into the graph; it needs a baked prefix "
            "(not --prefix-input, and only for the prefixed encoder). Use the standard variant otherwise."
        )
    return FastCLIPTextEncoderGraph(clip, prefix)


# ----------------------------------------------------------------------------------------------------------------
# TensorRT: the plugin (Python plugin API, IPluginV3 / IPluginCreatorV3One)
# ----------------------------------------------------------------------------------------------------------------


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


def build_engine(trt: ModuleType, onnx_bytes: bytes, max_batch: int = 4) -> tuple[bytes, list[str]]:
    """Parse ONNX holding ``apl::PrefixAttention`` nodes and build a serialized engine; returns it and the plugin
    callbacks the builder made. A dynamic leading (batch) dimension gets one profile ``1..max_batch``."""
    creator = register_plugin(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if any(-1 in tuple(t.shape) for t in inputs):
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            shape = tuple(tensor.shape)
            rest = shape[1:]
            profile.set_shape(tensor.name, (1, *rest), (1, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    callbacks = sorted({c for plugin in creator.created for c in plugin.callbacks})
    return bytes(engine), callbacks


def _check_build(argv: list[str] | None = None) -> int:
    """CLI: build an engine from a one-node ``apl::PrefixAttention`` graph (or a given ONNX file); print JSON."""
    import onnx
    from onnx import TensorProto, helper

    parser = argparse.ArgumentParser(description="Build a TensorRT engine containing the apl::PrefixAttention plugin")
    parser.add_argument("--check-build", action="store_true", help="build and report (the only action)")
    parser.add_argument("--onnx", type=Path, help="an ONNX file with apl::PrefixAttention nodes (default: one node)")
    parser.add_argument("--module", default=None, help="TensorRT module (default: as apl_export.tensorrt_loader picks)")
    args = parser.parse_args(argv)
    trt = load_tensorrt(args.module)
    if args.onnx:
        model = onnx.load(str(args.onnx))
    else:
        q_shape, prefix_shape = [2, 12, 66, 64], [1, 12, 11, 64]
        shapes = {"q": q_shape, "k": q_shape, "v": q_shape, "k_prefix": prefix_shape, "v_prefix": prefix_shape}
        node = helper.make_node(
            OP_NAME, list(shapes), ["out"], domain=OP_DOMAIN, causal=1, scale=0.0,
            plugin_namespace=OP_DOMAIN, plugin_version=OP_VERSION,
        )  # fmt: skip
        graph = helper.make_graph(
            [node],
            "prefix_attention",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, q_shape)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(OP_DOMAIN, 1)])
    engine, callbacks = build_engine(trt, model.SerializeToString())
    nodes = sum(n.op_type == OP_NAME and n.domain == OP_DOMAIN for n in model.graph.node)
    print(
        json.dumps({"module": trt.__name__, "plugin_nodes": nodes, "engine_bytes": len(engine), "callbacks": callbacks})
    )
    return 0


if __name__ == "__main__":
    sys.exit(_check_build())
