"""Check that TensorRT builds an engine holding ``apl::PrefixAttention`` nodes with the plugin (no GPU needed).

``python -m apl_export.trt_plugin --check-build [--onnx FILE]`` parses a one-node graph (or the given ONNX file),
builds a serialized engine, and prints JSON: the module, the plugin nodes, the engine size and the plugin callbacks
the builder made. Run it in a process started with :func:`apl_export.tensorrt_loader.plugin_process_env`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

from ..errors import ExportError
from ..tensorrt_loader import load_tensorrt
from .onnx_op import OP_DOMAIN, OP_NAME, OP_VERSION
from .plugin import register_plugin


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


def one_node_model():
    """A graph of one ``apl::PrefixAttention`` node at SD 1.x text-encoder sizes (66 prompt rows, 11 prefix rows)."""
    from onnx import TensorProto, helper

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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(OP_DOMAIN, 1)])


def main(argv: list[str] | None = None) -> int:
    """CLI: build an engine from a one-node ``apl::PrefixAttention`` graph (or a given ONNX file); print JSON."""
    import onnx

    parser = argparse.ArgumentParser(description="Build a TensorRT engine containing the apl::PrefixAttention plugin")
    parser.add_argument("--check-build", action="store_true", help="build and report (the only action)")
    parser.add_argument("--onnx", type=Path, help="an ONNX file with apl::PrefixAttention nodes (default: one node)")
    parser.add_argument("--module", default=None, help="TensorRT module (default: as apl_export.tensorrt_loader picks)")
    args = parser.parse_args(argv)
    trt = load_tensorrt(args.module)
    model = onnx.load(str(args.onnx)) if args.onnx else one_node_model()
    engine, callbacks = build_engine(trt, model.SerializeToString())
    nodes = sum(n.op_type == OP_NAME and n.domain == OP_DOMAIN for n in model.graph.node)
    print(
        json.dumps({"module": trt.__name__, "plugin_nodes": nodes, "engine_bytes": len(engine), "callbacks": callbacks})
    )
    return 0
