// Torch-side glue shared by the CPU and CUDA launchers: input checks, the output layout, and the parameter block the
// kernel math (prefix_attention.h) reads.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "prefix_attention.h"

namespace apl {

// Checks shapes, dtypes and devices; returns the output tensor, laid out (B, Lq, H, D) in memory and viewed as
// (B, H, Lq, D), so the caller's transpose(1, 2).reshape(B, Lq, H * D) costs no copy.
inline at::Tensor check_and_allocate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& k_prefix, const at::Tensor& v_prefix) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefix_attention: q, k, v must be (B, H, L, D)");
  TORCH_CHECK(k_prefix.dim() == 4 && v_prefix.dim() == 4, "prefix_attention: k_prefix, v_prefix must be (B or 1, H, P, D)");
  const auto batch = q.size(0), heads = q.size(1), q_len = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes(), "prefix_attention: k and v differ in shape: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(0) == batch && k.size(1) == heads && k.size(3) == head_dim,
              "prefix_attention: k must be (B, H, Lk, D) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k_prefix.sizes() == v_prefix.sizes(), "prefix_attention: k_prefix and v_prefix differ in shape");
  TORCH_CHECK(k_prefix.size(0) == batch || k_prefix.size(0) == 1,
              "prefix_attention: the prefix batch must be 1 (shared) or B, got ", k_prefix.size(0));
  TORCH_CHECK(k_prefix.size(1) == heads && k_prefix.size(3) == head_dim,
              "prefix_attention: k_prefix must be (B or 1, H, P, D), got ", k_prefix.sizes());
  TORCH_CHECK(head_dim <= kMaxHeadDim, "prefix_attention: head_dim > ", kMaxHeadDim, " is not supported");
  for (const at::Tensor* t : {&k, &v, &k_prefix, &v_prefix}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "prefix_attention: all inputs must share q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "prefix_attention: all inputs must be on q's device");
  }
  return at::empty({batch, q_len, heads, head_dim}, q.options()).transpose(1, 2);
}

// The kernel needs a unit stride on head_dim only; anything else is copied once.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

template <typename T>
TensorView4<const T> view_of(const at::Tensor& t) {
  // A shared prefix (batch 1) gets batch stride 0: every batch entry reads the same memory.
  return {t.const_data_ptr<T>(), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
PrefixAttentionParams<T> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& k_prefix, const at::Tensor& v_prefix, at::Tensor& out,
                                     bool causal, std::optional<double> scale) {
  PrefixAttentionParams<T> p;
  p.q = view_of<T>(q);
  p.k = view_of<T>(k);
  p.v = view_of<T>(v);
  p.k_prefix = view_of<T>(k_prefix);
  p.v_prefix = view_of<T>(v_prefix);
  p.out = {out.mutable_data_ptr<T>(), out.stride(0), out.stride(1), out.stride(2)};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.q_len = q.size(2);
  p.kv_len = k.size(2);
  p.prefix_len = k_prefix.size(2);
  p.head_dim = q.size(3);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  p.causal = causal;
  return p;
}

// Calls fn.template operator()<D>() with the head dimension as a compile-time constant where one is instantiated.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  switch (head_dim) {
    case 64:
      fn.template operator()<64>();
      break;
    case 128:
      fn.template operator()<128>();
      break;
    default:
      fn.template operator()<0>();
  }
}

}  // namespace apl
