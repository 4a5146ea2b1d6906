"""The fused prefix attention in exported graphs: the ONNX custom node ``apl::PrefixAttention`` and its TensorRT plugin.

The "fast" text encoder (:class:`FastCLIPTextEncoderGraph`) bakes the APL prefix as per-layer keys/values computed
once (:class:`apl_adapter.tuners.apl.prefixed_encoder.PrefixedCLIPEncoder`, which the prefix cache runs too) and runs
only the prompt positions; each layer's attention is one ``torch.ops.apl.prefix_attention`` call, exported as an
``apl::PrefixAttention`` node.

One module per idea:

- :mod:`.onnx_op`: the ONNX node (schema, export translation, NumPy implementation for onnx's reference evaluator);
- :mod:`.fast_encoder`: the fast text encoder graph;
- :mod:`.plugin`: the TensorRT plugin and creator (Python plugin API), :func:`register_plugin`;
- :mod:`.check_build` (``python -m apl_export.trt_plugin --check-build``): build an engine with the plugin.

Loading TensorRT, and TensorRT-RTX's loader-path workaround for plugin nodes (:func:`plugin_process_env`), live in
:mod:`apl_export.tensorrt_loader`, which the engine builder shares.

``apl-export --text-encoder fast`` exports this graph as ``text_encoder``, validates it with
:func:`onnx_reference_ops` (onnxruntime cannot run the node), and with ``--trt`` builds its engine in a child process
with :func:`plugin_process_env` (``python -m apl_export.engines --plugin-build``).

What has been checked where: on this project's CPU machines, TensorRT-RTX parses the exported graph and builds a
serialized engine with the plugin (the builder calls the plugin's shape, type and format callbacks); ``enqueue``
needs a GPU and has not run here.

Example (builds in a child process, as the loader path must be set before TensorRT loads):

```python
>>> import subprocess, sys
>>> from apl_export.trt_plugin import plugin_process_env
>>> cmd = [sys.executable, "-m", "apl_export.trt_plugin", "--check-build"]
>>> subprocess.run(cmd, env=plugin_process_env(), check=True)  # doctest: +SKIP
```
"""

from ..tensorrt_loader import plugin_process_env, tensorrt_rtx_library_dir
from .check_build import build_engine
from .fast_encoder import FastCLIPTextEncoderGraph, make_fast_text_encoder
from .onnx_op import (
    OP_DOMAIN,
    OP_NAME,
    OP_VERSION,
    onnx_reference_ops,
    onnx_translation_table,
    prefix_attention_numpy,
    register_onnx_schema,
)
from .plugin import plugin_classes, register_plugin

__all__ = [
    "OP_DOMAIN",
    "OP_NAME",
    "OP_VERSION",
    "FastCLIPTextEncoderGraph",
    "build_engine",
    "make_fast_text_encoder",
    "onnx_reference_ops",
    "onnx_translation_table",
    "plugin_classes",
    "plugin_process_env",
    "prefix_attention_numpy",
    "register_onnx_schema",
    "register_plugin",
    "tensorrt_rtx_library_dir",
]
