// CPU launcher: one prefix_attention_compute_row() call per (batch, head, query row), rows split across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "prefix_attention_torch.h"

namespace apl {
namespace {

// The row math is plain C++; compiled once per x86-64 level (AVX-512, AVX2, baseline) and picked at load time, the
// fp32 reductions over head_dim use the widest vectors the machine has without -march=native in the build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define APL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define APL_CPU_CLONES
#endif

template <typename T, int D>
APL_CPU_CLONES void run_row_range(const PrefixAttentionParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) prefix_attention_compute_row<T, D>(p, row);
}

template <typename T, int D>
void run_rows(const PrefixAttentionParams<T>& p) {
  const int64_t rows = p.batch * p.heads * p.q_len;
  // A row costs about (prefix_len + kv_len) * head_dim * 4 flops: a few dozen rows make a worthwhile task.
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) { run_row_range<T, D>(p, begin, end); });
}

at::Tensor prefix_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& k_prefix_in, const at::Tensor& v_prefix_in, bool causal,
                                std::optional<double> scale) {
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor k_prefix = unit_last_stride(k_prefix_in), v_prefix = unit_last_stride(v_prefix_in);
  at::Tensor out = check_and_allocate(q, k, v, k_prefix, v_prefix);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_attention_cpu", [&] {
    const auto params = make_params<scalar_t>(q, k, v, k_prefix, v_prefix, out, causal, scale);
    dispatch_head_dim(params.head_dim, [&]<int D>() { run_rows<scalar_t, D>(params); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CPU, m) { m.impl("prefix_attention", &prefix_attention_cpu); }

}  // namespace apl
