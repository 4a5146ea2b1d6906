// CUDA kernel: one thread per (batch, head, query row), each running prefix_attention_compute_row() with fp32
// accumulators. Rows of one (batch, head) sit in neighbouring threads, so their key/value reads share cache lines.
// Correctness-first: a row-per-thread design keeps the math identical to the CPU kernel. It is compiled for
// sm_80/sm_90 by tools/cuda_check.py (make test) and ran on an H100 (make gpu-check; figures in docs/kernels.md).
//
// No torch include here: the file builds with the CUDA toolkit alone (the torch CPU wheel ships no c10/cuda headers).
#include "prefix_attention_cuda.h"

namespace apl {
namespace {

constexpr int kThreadsPerBlock = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kThreadsPerBlock) prefix_attention_kernel(const PrefixAttentionParams<T> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x;
  if (row < p.batch * p.heads * p.q_len) prefix_attention_compute_row<T, D>(p, row);
}

}  // namespace

template <typename T>
cudaError_t launch_prefix_attention(const PrefixAttentionParams<T>& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.q_len;
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + kThreadsPerBlock - 1) / kThreadsPerBlock));
  switch (p.head_dim) {
    case 64:
      prefix_attention_kernel<T, 64><<<grid, kThreadsPerBlock, 0, stream>>>(p);
      break;
    case 128:
      prefix_attention_kernel<T, 128><<<grid, kThreadsPerBlock, 0, stream>>>(p);
      break;
    default:
      prefix_attention_kernel<T, 0><<<grid, kThreadsPerBlock, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template cudaError_t launch_prefix_attention<float>(const PrefixAttentionParams<float>&, cudaStream_t);
template cudaError_t launch_prefix_attention<__half>(const PrefixAttentionParams<__half>&, cudaStream_t);
template cudaError_t launch_prefix_attention<__nv_bfloat16>(const PrefixAttentionParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace apl
