"""The CUDA paths against their PyTorch references: the kernel on every layout the CPU kernel is tested on, and the
prefix K/V cache (shallow and deep prefixes) running it inside the text encoder.

All of it needs a CUDA device and a CUDA build of ``apl_adapter._C`` (``make gpu-check`` on a GPU machine); without a
device every test here is skipped. Tolerances: fp32 within 1e-5 of float64 SDPA (as on CPU); bf16 / fp16 within one
output rounding; whole encoders within 1e-4 of the same encoder run by PyTorch on the same device (twelve layers of
fp32 TF32-free matmuls, summed differently).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from apl_adapter import APLConfig, ops
from apl_adapter.testing import tiny_clip_text_model
from apl_adapter.tuners.apl.model import prefix_parameters
from apl_adapter.tuners.apl.prefix_cache import CachedPrefixEncoder

from .test_deep_prefix import _deep_model
from .test_prefix_attention import make_inputs, sdpa_on_concatenation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path tests need a CUDA device"),
]

ATOL_FP32 = 1e-5
ATOL_ENCODER = 1e-4


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 matmuls would put the references themselves ~1e-3 off; every comparison here is true fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def on_cuda(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cuda() for t in tensors]


def test_the_extension_has_a_cuda_kernel():
    assert ops.has_fused_kernel("cuda"), "apl_adapter._C was built without CUDA: rebuild it with a CUDA torch and nvcc"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("prefix_len", [0, 1, 11])
@pytest.mark.parametrize("length", [1, 7, 66])
def test_fp32_matches_sdpa_on_every_shape(causal, head_dim, prefix_len, length):
    """64 and 128 take the compile-time head_dim kernels, 40 the generic one; 3 x 5 x 66 rows end mid-block."""
    inputs = make_inputs(3, 5, length, length, prefix_len, head_dim, torch.float32, seed=length + prefix_len)
    out = torch.ops.apl.prefix_attention(*on_cuda(*inputs), causal)
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), sdpa_on_concatenation(*inputs, causal), atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_the_cpu_kernel(dtype):
    """Same storage type, same fp32 row math: the CUDA and CPU kernels agree to within one output rounding."""
    inputs = make_inputs(2, 3, 33, 33, 11, 64, dtype, seed=7)
    cpu = torch.ops.apl.prefix_attention(*inputs, True)
    cuda = torch.ops.apl.prefix_attention(*on_cuda(*inputs), True).cpu()
    rounding = 2**-8 if dtype == torch.bfloat16 else 2**-11
    torch.testing.assert_close(cuda.double(), cpu.double(), atol=2 * rounding, rtol=2 * rounding)


def test_rows_that_see_no_key_match_the_cpu_kernel():
    """More queries than keys, no prefix, causal: the first rows see nothing and are written as zeros."""
    inputs = make_inputs(2, 2, 9, 4, 0, 64, torch.float32, seed=4)
    cpu = torch.ops.apl.prefix_attention(*inputs, True)
    cuda = torch.ops.apl.prefix_attention(*on_cuda(*inputs), True).cpu()
    assert cpu[:, :, :5].abs().max() == 0
    torch.testing.assert_close(cuda, cpu, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_queries_fewer_than_keys_align_bottom_right(causal):
    inputs = make_inputs(2, 2, 5, 9, 3, 64, torch.float32, seed=5)
    out = torch.ops.apl.prefix_attention(*on_cuda(*inputs), causal).cpu()
    torch.testing.assert_close(out.double(), sdpa_on_concatenation(*inputs, causal), atol=ATOL_FP32, rtol=0)


def test_per_batch_and_expanded_prefixes():
    q, k, v, k_prefix, v_prefix = make_inputs(4, 2, 9, 9, 3, 64, torch.float32, shared_prefix=False, seed=1)
    reference = sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, True)
    q, k, v, k_prefix, v_prefix = on_cuda(q, k, v, k_prefix, v_prefix)
    out = torch.ops.apl.prefix_attention(q, k, v, k_prefix, v_prefix, True)
    torch.testing.assert_close(out.cpu().double(), reference, atol=ATOL_FP32, rtol=0)
    shared_k, shared_v = k_prefix[:1], v_prefix[:1]
    expanded = torch.ops.apl.prefix_attention(
        q, k, v, shared_k.expand(4, -1, -1, -1), shared_v.expand(4, -1, -1, -1), True
    )
    shared = torch.ops.apl.prefix_attention(q, k, v, shared_k, shared_v, True)
    torch.testing.assert_close(expanded, shared, atol=0, rtol=0)


def test_strided_projections_explicit_scale_and_free_output_reshape():
    batch, length, heads, head_dim = 2, 13, 3, 64
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=g).transpose(1, 2) for _ in range(3))
    k_prefix, v_prefix = (torch.randn(1, 4, heads, head_dim, generator=g).transpose(1, 2) for _ in range(2))
    out = torch.ops.apl.prefix_attention(*on_cuda(q, k, v, k_prefix, v_prefix), True, 0.3)
    assert out.transpose(1, 2).is_contiguous()
    reference = sdpa_on_concatenation(q, k, v, k_prefix, v_prefix, True, scale=0.3)
    torch.testing.assert_close(out.cpu().double(), reference, atol=ATOL_FP32, rtol=0)


def test_inputs_on_two_devices_are_refused():
    q, k, v, k_prefix, v_prefix = make_inputs(1, 2, 5, 5, 3, 64, torch.float32)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.apl.prefix_attention(q.cuda(), k.cuda(), v.cuda(), k_prefix, v_prefix, True)


def test_runs_on_the_current_stream():
    """The launch goes to torch's current stream: work queued on a side stream sees the inputs written there."""
    inputs = on_cuda(*make_inputs(2, 4, 66, 66, 11, 64, torch.float32, seed=2))
    expected = torch.ops.apl.prefix_attention(*inputs, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy: a launch on another stream would read q early
        q = inputs[0] * 1.0  # written on the side stream, read by the kernel launched there
        out = torch.ops.apl.prefix_attention(q, *inputs[1:], True)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# The prefix K/V cache on CUDA: the kernel inside a real (tiny) CLIP text encoder
# ------------------------------------------------------------------------------------------------------------------


def adapted_on_cuda(depth: str) -> torch.nn.Module:
    """head_dim 64 (one head of 64): the kernel's fast path. Deep rows moved off their start so they matter."""
    if depth == "deep":
        return _deep_model(m=4, hidden_size=64, heads=1).cuda()
    model = get_peft_model(tiny_clip_text_model(hidden_size=64, heads=1), APLConfig(num_virtual_tokens=4))
    return model.eval().cuda()


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_cached_encoder_on_cuda_matches_the_adapter(depth, prompt_ids):
    model = adapted_on_cuda(depth)
    ids = prompt_ids.cuda()
    fused = CachedPrefixEncoder.from_adapter(model, use_kernel=True)
    reference = CachedPrefixEncoder.from_adapter(model, use_kernel=False)
    with torch.no_grad():
        expected = model(input_ids=ids)
        for encoder in (fused, reference):
            out = encoder(ids)
            torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=ATOL_ENCODER, rtol=0)
            torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=ATOL_ENCODER, rtol=0)
        # The same weights on the CPU: the device changes the summation order only.
        cpu = model.cpu()(input_ids=prompt_ids).last_hidden_state
    torch.testing.assert_close(expected.last_hidden_state.cpu(), cpu, atol=ATOL_ENCODER, rtol=0)


def test_cached_encoder_in_half_precision_stays_near_fp32(prompt_ids):
    model = adapted_on_cuda("deep")
    ids = prompt_ids.cuda()
    with torch.no_grad():
        fp32 = model(input_ids=ids).last_hidden_state
        half = CachedPrefixEncoder.from_adapter(model.half())(ids).last_hidden_state
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), fp32, atol=2e-2, rtol=2e-2)


def test_gradients_on_cuda_reach_the_prefix_through_the_cache(prompt_ids):
    """With gradients on, the cache uses PyTorch attention (the kernel has no backward) and trains the prefix."""
    model = adapted_on_cuda("deep").train()
    encoder = CachedPrefixEncoder.from_adapter(model)
    encoder(prompt_ids.cuda()).last_hidden_state.square().mean().backward()
    grads = {name: p.grad for name, p in prefix_parameters(model).items()}
    for name, grad in grads.items():
        assert grad is not None and grad.is_cuda, name
        assert (grad.abs().sum(-1) > 0).all(), f"{name}: a prefix row got no gradient"


def test_apply_apl_on_a_cuda_pipeline_runs_the_full_encoder_by_default(tmp_path):
    """On CUDA the default skips the cache (measured slower there); use_prefix_cache=True runs it; same embeddings."""
    from apl_adapter.pipelines import apl_cached_encoders, apply_apl, remove_apl
    from apl_adapter.testing import tiny_sd_pipeline

    get_peft_model(tiny_clip_text_model(), APLConfig(init_seed=5)).save_pretrained(tmp_path / "adapter")
    pipe = tiny_sd_pipeline().to("cuda")
    embeds, calls = {}, {}
    for setting in (None, True):
        apply_apl(pipe, tmp_path / "adapter", use_prefix_cache=setting)
        (cached,) = apl_cached_encoders(pipe).values()
        seen = []
        hook = cached.register_forward_hook(lambda *args, seen=seen: seen.append(1))
        with torch.no_grad():
            embeds[setting], _ = pipe.encode_prompt("a photo of Ann Lee", "cuda", 1, True)
        hook.remove()
        calls[setting] = len(seen)
        remove_apl(pipe)
    assert calls == {None: 0, True: 1}
    torch.testing.assert_close(embeds[True], embeds[None], atol=ATOL_ENCODER, rtol=0)
