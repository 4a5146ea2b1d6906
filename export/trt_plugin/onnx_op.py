"""The ONNX custom node ``apl::PrefixAttention``: its schema, its export from ``torch.ops.apl.prefix_attention``, and
a NumPy implementation so onnx's ``ReferenceEvaluator`` can run graphs holding it (onnxruntime cannot).

Opset domain ``apl``, version 1; attributes ``causal``, ``scale``, ``plugin_namespace="apl"``, ``plugin_version="1"``
(the last two tell TensorRT's ONNX parser which plugin creator to use, see :mod:`.plugin`).
"""

from __future__ import annotations

import numpy as np
import torch

OP_DOMAIN = "apl"
OP_NAME = "PrefixAttention"
OP_VERSION = "1"
_ONNX_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


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
