"""The fused prefix-attention kernel against SDPA on the concatenated keys/values.

The kernel (csrc/) must give softmax([q k_prefix^T | q k^T (causal)] * scale) [v_prefix ; v] without building the
concatenation. The reference here is torch's scaled_dot_product_attention on explicitly concatenated K/V with an
explicit boolean mask, computed in float64.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from apl_adapter import ops

FUSED = torch.ops.apl.prefix_attention if ops.has_fused_kernel("cpu") else None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel tests need a CUDA device")


def sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, causal, scale=None):
    """Independent reference: concatenate K/V, build the full boolean mask, SDPA in float64."""
    batch, _, q_len, _ = q.shape
    kv_len, prefix_len = k.shape[2], k_prefix.shape[2]
    keys = torch.cat([k_prefix.expand(batch, -1, -1, -1), k], dim=2).double()
    values = torch.cat([v_prefix.expand(batch, -1, -1, -1), v], dim=2).double()
    mask = causal_mask(q_len, kv_len, prefix_len) if causal else None
    return F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask, scale=scale)


def causal_mask(q_len, kv_len, prefix_len):
    """Every query sees the prefix; query i is request position i + (kv_len - q_len) and sees keys up to it."""
    mask = torch.ones(q_len, prefix_len + kv_len, dtype=torch.bool)
    for i in range(q_len):
        mask[i, prefix_len + i + (kv_len - q_len) + 1 :] = False
    return mask


def make_inputs(batch, heads, q_len, kv_len, prefix_len, head_dim, dtype, shared_prefix=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, heads, kv_len, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, heads, kv_len, head_dim, generator=g).to(dtype)
    prefix_batch = 1 if shared_prefix else batch
    k_prefix = torch.randn(prefix_batch, heads, prefix_len, head_dim, generator=g).to(dtype)
    v_prefix = torch.randn(prefix_batch, heads, prefix_len, head_dim, generator=g).to(dtype)
    return q, k, v, k_prefix, v_prefix


def test_extension_is_built():
    assert FUSED is not None, "apl_adapter._C is missing: run `python setup.py build_ext --inplace` (or make build)"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("prefix_len", [0, 1, 2, 11])
@pytest.mark.parametrize("length", [1, 7, 66])
def test_fp32_matches_sdpa_on_concatenation(causal, head_dim, prefix_len, length):
    inputs = make_inputs(3, 2, length, length, prefix_len, head_dim, torch.float32, seed=length + prefix_len)
    out = FUSED(*inputs, causal)
    ref = sdpa_on_concatenation(*inputs, causal)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_low_precision_accumulates_in_fp32(dtype, causal, head_dim):
    """bf16/fp16 storage, fp32 accumulation: within the output rounding, and no worse than SDPA run in that dtype."""
    inputs = make_inputs(2, 3, 33, 33, 11, head_dim, dtype, seed=head_dim)
    out = FUSED(*inputs, causal)
    assert out.dtype == dtype
    ref = sdpa_on_concatenation(*inputs, causal)
    err = (out.double() - ref).abs().max().item()
    # One rounding of an output of magnitude < 4 to 8 (bf16) or 11 (fp16) mantissa bits.
    assert err <= (4 * 2**-8 if dtype == torch.bfloat16 else 4 * 2**-11), err
    q, k, v, k_prefix, v_prefix = inputs
    native = F.scaled_dot_product_attention(
        q,
        torch.cat([k_prefix.expand(2, -1, -1, -1), k], 2),
        torch.cat([v_prefix.expand(2, -1, -1, -1), v], 2),
        attn_mask=causal_mask(33, 33, 11) if causal else None,
    )
    assert err <= (native.double() - ref).abs().max().item() + 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_queries_fewer_than_keys_align_bottom_right(causal):
    """Lq < Lk: the queries are the last Lq request positions (flash_attn_with_kvcache's convention)."""
    inputs = make_inputs(2, 2, 5, 9, 3, 64, torch.float32, seed=5)
    torch.testing.assert_close(
        FUSED(*inputs, causal).double(), sdpa_on_concatenation(*inputs, causal), atol=1e-5, rtol=0
    )


def test_per_batch_prefix_and_shared_prefix():
    """A (B, ...) prefix gives each entry its own prefix; a (1, ...) or stride-0 expanded prefix is read in place."""
    q, k, v, k_prefix, v_prefix = make_inputs(4, 2, 9, 9, 3, 64, torch.float32, shared_prefix=False, seed=1)
    torch.testing.assert_close(
        FUSED(q, k, v, k_prefix, v_prefix, True).double(),
        sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, True),
        atol=1e-5,
        rtol=0,
    )
    shared_k, shared_v = k_prefix[:1], v_prefix[:1]
    expanded = FUSED(q, k, v, shared_k.expand(4, -1, -1, -1), shared_v.expand(4, -1, -1, -1), True)
    assert shared_k.expand(4, -1, -1, -1).stride(0) == 0
    torch.testing.assert_close(expanded, FUSED(q, k, v, shared_k, shared_v, True), atol=0, rtol=0)
    # Entries of a shared prefix do not see each other's prefix: entry 0 alone gives the same row.
    torch.testing.assert_close(expanded[:1], FUSED(q[:1], k[:1], v[:1], shared_k, shared_v, True), atol=0, rtol=0)


def test_strided_inputs_and_free_output_reshape():
    """(B, L, H, D) projections viewed as (B, H, L, D) are read with their strides; the output reshapes for free."""
    batch, length, heads, head_dim = 2, 13, 3, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=g).transpose(1, 2) for _ in range(3))
    k_prefix, v_prefix = (torch.randn(1, 4, heads, head_dim, generator=g).transpose(1, 2) for _ in range(2))
    assert not q.is_contiguous()
    out = FUSED(q, k, v, k_prefix, v_prefix, True)
    torch.testing.assert_close(
        out.double(), sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, True), atol=1e-5, rtol=0
    )
    assert out.transpose(1, 2).is_contiguous()
    # A non-unit stride on head_dim is accepted too (copied once).
    q_odd = torch.randn(batch, heads, length, head_dim * 2, generator=g)[..., ::2]
    torch.testing.assert_close(
        FUSED(q_odd, k, v, k_prefix, v_prefix, False).double(),
        sdpa_on_concatenation(q_odd, k, v, k_prefix, v_prefix, False),
        atol=1e-5,
        rtol=0,
    )


def test_explicit_scale():
    inputs = make_inputs(1, 2, 6, 6, 2, 64, torch.float32, seed=9)
    torch.testing.assert_close(
        FUSED(*inputs, True, 0.3).double(), sdpa_on_concatenation(*inputs, True, scale=0.3), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "bad",
    [
        dict(k_prefix=torch.randn(1, 2, 3, 32)),  # head_dim mismatch
        dict(k_prefix=torch.randn(3, 2, 3, 64), v_prefix=torch.randn(3, 2, 3, 64)),  # prefix batch neither 1 nor B
        dict(k=torch.randn(2, 2, 5, 64).double()),  # dtype mismatch
        dict(v=torch.randn(2, 2, 4, 64)),  # k/v length mismatch
    ],
)
def test_bad_shapes_are_rejected(bad):
    q, k, v, k_prefix, v_prefix = make_inputs(2, 2, 5, 5, 3, 64, torch.float32)
    args = dict(q=q, k=k, v=v, k_prefix=k_prefix, v_prefix=v_prefix) | bad
    with pytest.raises(RuntimeError, match="prefix_attention"):
        FUSED(args["q"], args["k"], args["v"], args["k_prefix"], args["v_prefix"], True)


def test_public_function_uses_reference_for_autograd():
    """The kernel has no backward: with gradients the public function runs the (differentiable) reference."""
    q, k, v, k_prefix, v_prefix = (t.requires_grad_() for t in make_inputs(2, 2, 7, 7, 3, 64, torch.float64))
    out = ops.prefix_attention(q, k, v, k_prefix, v_prefix, causal=True)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, k_prefix, v_prefix)]
    for t in (q, k, v, k_prefix, v_prefix):
        t.grad = None
    sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, True).square().sum().backward()
    for got, t in zip(grads, (q, k, v, k_prefix, v_prefix)):
        torch.testing.assert_close(got, t.grad)


def test_fallback_warns_once_and_matches(monkeypatch):
    """Without the extension the public function warns once and still computes the same attention."""
    monkeypatch.setattr(ops, "_HAS_EXTENSION", False)
    monkeypatch.setattr(ops, "_FALLBACK_WARNED", False)
    inputs = make_inputs(2, 2, 7, 7, 3, 64, torch.float32)
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        out = ops.prefix_attention(*inputs, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.prefix_attention(*inputs, causal=True)  # no second warning
    torch.testing.assert_close(out.double(), sdpa_on_concatenation(*inputs, True), atol=1e-5, rtol=0)


def test_fake_kernel_gives_shape_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 12, 66, 64) for _ in range(3))
        k_prefix = v_prefix = torch.empty(1, 12, 11, 64)
        out = torch.ops.apl.prefix_attention(q, k, v, k_prefix, v_prefix, True)
    assert out.shape == (2, 12, 66, 64) and out.transpose(1, 2).is_contiguous()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_matches_sdpa_on_concatenation(dtype, head_dim, causal):
    assert ops.has_fused_kernel("cuda"), "the extension was built without CUDA; rebuild with a CUDA torch"
    inputs = [t.cuda() for t in make_inputs(3, 4, 66, 66, 11, head_dim, dtype, seed=head_dim)]
    out = torch.ops.apl.prefix_attention(*inputs, causal)
    ref = sdpa_on_concatenation(*[t.cpu() for t in inputs], causal)
    atol = 1e-5 if dtype == torch.float32 else (4 * 2**-8 if dtype == torch.bfloat16 else 4 * 2**-11)
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# The exported fast text encoder and its TensorRT plugin
# ------------------------------------------------------------------------------------------------------------------

HAS_TENSORRT_BUILDER = any(importlib.util.find_spec(m) for m in ("tensorrt_rtx_bindings", "tensorrt_rtx"))


def tiny_adapted_clip():
    from peft import get_peft_model

    from apl_adapter import APLConfig
    from apl_adapter.testing import tiny_clip_text_model

    peft_model = get_peft_model(tiny_clip_text_model(hidden_size=64, heads=1), APLConfig())
    return peft_model, peft_model.get_base_model()


def test_fast_text_encoder_graph_equals_full_encoder():
    from apl_export.trt_plugin import FastCLIPTextEncoderGraph

    peft_model, clip = tiny_adapted_clip()
    graph = FastCLIPTextEncoderGraph(clip, clip.embeddings.active_prefix).eval()
    ids = torch.full((3, 77), 49407, dtype=torch.int32)
    ids[:, 0] = 49406
    ids[:, 1:6] = torch.randint(0, 49406, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last_hidden, pooled = graph(ids)
        reference = peft_model(input_ids=ids.long())
    torch.testing.assert_close(last_hidden, reference.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, reference.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORRT_BUILDER, reason="no TensorRT builder installed (pip install 'apl-adapter[trt]')")
def test_fast_text_encoder_exports_plugin_nodes_and_trt_rtx_builds_an_engine(tmp_path):
    """ONNX export puts one apl::PrefixAttention node per layer; TensorRT-RTX (CPU) parses it with the Python plugin
    and builds a serialized engine, calling the plugin's shape/type/format callbacks. Nothing runs the engine here."""
    import onnx
    from apl_export.trt_plugin import FastCLIPTextEncoderGraph, onnx_translation_table, plugin_process_env

    _, clip = tiny_adapted_clip()
    graph = FastCLIPTextEncoderGraph(clip, clip.embeddings.active_prefix).eval()
    ids = torch.full((2, 77), 49407, dtype=torch.int32)
    ids[:, 0] = 49406
    path = tmp_path / "text_encoder_fast.onnx"
    program = torch.onnx.export(
        graph, (ids,), dynamo=True, custom_translation_table=onnx_translation_table(), opset_version=19, verbose=False
    )
    program.save(str(path))
    nodes = [n for n in onnx.load(str(path)).graph.node if n.domain == "apl"]
    assert [n.op_type for n in nodes] == ["PrefixAttention"] * clip.config.num_hidden_layers

    # A child process: the loader path for TensorRT-RTX's plugin import must be set before TensorRT loads.
    cmd = [sys.executable, "-m", "apl_export.trt_plugin", "--check-build", "--onnx", str(path)]
    result = subprocess.run(cmd, env=plugin_process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plugin_nodes"] == clip.config.num_hidden_layers
    assert report["engine_bytes"] > 0
    assert {"get_output_shapes", "supports_format_combination", "configure_plugin"} <= set(report["callbacks"])
