// torch.ops.apl.prefix_attention for CUDA tensors: checks, output allocation and the launch on torch's current stream.
// Built only where setup.py compiles the CUDA sources (APL_WITH_CUDA); an empty file otherwise.
#if defined(APL_WITH_CUDA)

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "prefix_attention_cuda.h"
#include "prefix_attention_torch.h"

namespace apl {
namespace {

template <typename TorchT, typename CudaT>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_prefix,
            const at::Tensor& v_prefix, at::Tensor& out, bool causal, std::optional<double> scale) {
  const auto params = make_params<TorchT>(q, k, v, k_prefix, v_prefix, out, causal, scale);
  const cudaError_t err =
      launch_prefix_attention<CudaT>(reinterpret_params<CudaT>(params), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "prefix_attention CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor prefix_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& k_prefix_in, const at::Tensor& v_prefix_in, bool causal,
                                 std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor k_prefix = unit_last_stride(k_prefix_in), v_prefix = unit_last_stride(v_prefix_in);
  at::Tensor out = check_and_allocate(q, k, v, k_prefix, v_prefix);
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat:
      launch<float, float>(q, k, v, k_prefix, v_prefix, out, causal, scale);
      break;
    case at::kHalf:
      launch<at::Half, __half>(q, k, v, k_prefix, v_prefix, out, causal, scale);
      break;
    case at::kBFloat16:
      launch<at::BFloat16, __nv_bfloat16>(q, k, v, k_prefix, v_prefix, out, causal, scale);
      break;
    default:
      TORCH_CHECK(false, "prefix_attention on CUDA supports float32, float16 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CUDA, m) { m.impl("prefix_attention", &prefix_attention_cuda); }

}  // namespace apl

#endif  // APL_WITH_CUDA
