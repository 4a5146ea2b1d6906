// Prefix attention: the per-row math, shared by the C++ CPU kernel, the CUDA kernel and the TensorRT plugin.
//
//   out[b,h,i] = softmax([q k_prefix^T | q k^T (causal)] * scale) [v_prefix ; v]
//
// computed without the concatenated key/value tensor: one online softmax runs over the prefix keys, then over the
// visible request keys. Keys are taken in blocks of kKeyBlock so the running maximum is corrected once per block,
// not once per key. Everything accumulates in fp32 whatever the storage type T (float, c10::Half, c10::BFloat16).
//
// This header has no torch dependency: launchers fill a PrefixAttentionParams<T> and call
// prefix_attention_compute_row() once per (batch, head, query row).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define APL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define APL_HOST_DEVICE inline __attribute__((always_inline))
#endif

// `omp simd` lets the host compiler vectorize the fp32 reductions over the head dimension (it may not reorder float
// sums on its own). nvcc gets nothing: one CUDA thread owns one row.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define APL_SIMD_SUM(...)
#define APL_SIMD_MAX(var)
#define APL_SIMD
#else
#define APL_PRAGMA(...) _Pragma(#__VA_ARGS__)
#define APL_SIMD_SUM(...) APL_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define APL_SIMD_MAX(var) APL_PRAGMA(omp simd reduction(max : var))
#define APL_SIMD APL_PRAGMA(omp simd)
#endif

namespace apl {

// Keys scored per online-softmax step.
constexpr int kKeyBlock = 16;
// Largest head dimension of the generic (runtime head dim) path; 64 and 128 get their own instantiations.
constexpr int kMaxHeadDim = 256;

// Pointers and element strides of a (batch, heads, length, head_dim) tensor with a unit stride on head_dim.
template <typename T>
struct TensorView4 {
  T* data;
  int64_t batch_stride;  // 0 for a tensor shared by the whole batch (the prefix): no per-batch copy
  int64_t head_stride;
  int64_t row_stride;
};

template <typename T>
struct PrefixAttentionParams {
  TensorView4<const T> q, k, v, k_prefix, v_prefix;
  TensorView4<T> out;
  int64_t batch, heads, q_len, kv_len, prefix_len, head_dim;
  float scale;
  bool causal;  // bottom-right aligned: query i sees request keys j <= i + (kv_len - q_len), and every prefix key
};

// Storage <-> fp32. Host types (float, c10::Half, c10::BFloat16) convert by cast; the CUDA types use intrinsics, which
// work whatever __CUDA_NO_HALF_CONVERSIONS__-style switches the build sets.
template <typename T>
APL_HOST_DEVICE float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
APL_HOST_DEVICE T from_float(float x) {
  return static_cast<T>(x);
}
#if defined(__CUDACC__)
template <>
APL_HOST_DEVICE float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
APL_HOST_DEVICE __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
APL_HOST_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
APL_HOST_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
#endif

// The same parameter block over another storage type of identical bits (c10::Half -> __half for the CUDA launcher).
template <typename To, typename From>
PrefixAttentionParams<To> reinterpret_params(const PrefixAttentionParams<From>& p) {
  static_assert(sizeof(To) == sizeof(From), "storage types must have the same size");
  auto view = [](const TensorView4<const From>& t) {
    return TensorView4<const To>{reinterpret_cast<const To*>(t.data), t.batch_stride, t.head_stride, t.row_stride};
  };
  PrefixAttentionParams<To> r;
  r.q = view(p.q);
  r.k = view(p.k);
  r.v = view(p.v);
  r.k_prefix = view(p.k_prefix);
  r.v_prefix = view(p.v_prefix);
  r.out = {reinterpret_cast<To*>(p.out.data), p.out.batch_stride, p.out.head_stride, p.out.row_stride};
  r.batch = p.batch;
  r.heads = p.heads;
  r.q_len = p.q_len;
  r.kv_len = p.kv_len;
  r.prefix_len = p.prefix_len;
  r.head_dim = p.head_dim;
  r.scale = p.scale;
  r.causal = p.causal;
  return r;
}

// exp(x) for x <= 0 (softmax arguments: score - running max), relative error < 2e-7; exp(-inf) = 0.
// On the host it is a polynomial the compiler vectorizes inside the `omp simd` loops (libm's expf is a scalar call,
// and one per key was the CPU kernel's largest cost); CUDA has its own fast exp.
APL_HOST_DEVICE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38, still a normal float; the result underflows only below that
  const float n = __builtin_floorf(x * 1.44269504f + 0.5f);  // x = n ln2 + r, |r| <= ln2 / 2
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts: exact n * ln2_hi
  // Taylor to degree 6 on |r| <= 0.347: truncation below 1.2e-7 relative.
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// Running state of one row's online softmax: max and sum of exp(score - max); the fp32 accumulator lives beside it.
struct OnlineSoftmax {
  float max_score;
  float sum_exp;
};

// Folds keys [0, n_keys) of one key range into (state, acc). `qf` is the query row, already multiplied by scale.
template <typename T, int D>
APL_HOST_DEVICE void accumulate_key_range(const float* qf, const T* keys, int64_t key_stride, const T* values,
                                          int64_t value_stride, int64_t n_keys, int d, OnlineSoftmax& state,
                                          float* acc) {
  float scores[kKeyBlock];
  for (int64_t start = 0; start < n_keys; start += kKeyBlock) {
    const int count = static_cast<int>(n_keys - start < kKeyBlock ? n_keys - start : kKeyBlock);
    // Four keys per pass: four independent dot products hide the latency of each one's reduction.
    int j = 0;
    for (; j + 4 <= count; j += 4) {
      const T* k0 = keys + (start + j) * key_stride;
      const T* k1 = k0 + key_stride;
      const T* k2 = k1 + key_stride;
      const T* k3 = k2 + key_stride;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      APL_SIMD_SUM(s0, s1, s2, s3)
      for (int c = 0; c < d; ++c) {
        s0 += qf[c] * to_float(k0[c]);
        s1 += qf[c] * to_float(k1[c]);
        s2 += qf[c] * to_float(k2[c]);
        s3 += qf[c] * to_float(k3[c]);
      }
      scores[j] = s0;
      scores[j + 1] = s1;
      scores[j + 2] = s2;
      scores[j + 3] = s3;
    }
    for (; j < count; ++j) {
      const T* key = keys + (start + j) * key_stride;
      float s = 0.f;
      APL_SIMD_SUM(s)
      for (int c = 0; c < d; ++c) s += qf[c] * to_float(key[c]);
      scores[j] = s;
    }
    float block_max = -INFINITY;
    APL_SIMD_MAX(block_max)
    for (int i = 0; i < count; ++i) block_max = scores[i] > block_max ? scores[i] : block_max;
    const float new_max = block_max > state.max_score ? block_max : state.max_score;
    // First block: max_score is -inf, so the correction is (about) 0 and scales an accumulator that is still 0.
    const float correction = exp_nonpositive(state.max_score - new_max);
    float block_sum = 0.f;
    APL_SIMD_SUM(block_sum)
    for (int i = 0; i < count; ++i) {
      scores[i] = exp_nonpositive(scores[i] - new_max);
      block_sum += scores[i];
    }
    state.sum_exp = state.sum_exp * correction + block_sum;
    APL_SIMD
    for (int c = 0; c < d; ++c) acc[c] *= correction;
    for (int i = 0; i < count; ++i) {
      const float p = scores[i];
      const T* value = values + (start + i) * value_stride;
      APL_SIMD
      for (int c = 0; c < d; ++c) acc[c] += p * to_float(value[c]);
    }
    state.max_score = new_max;
  }
}

// One output row (b, h, i) for flat row index  row = (b * heads + h) * q_len + i.
// D > 0 fixes the head dimension at compile time; D == 0 reads it from params (at most kMaxHeadDim).
template <typename T, int D>
APL_HOST_DEVICE void prefix_attention_compute_row(const PrefixAttentionParams<T>& p, int64_t row) {
  constexpr int kWidth = D > 0 ? D : kMaxHeadDim;
  const int d = D > 0 ? D : static_cast<int>(p.head_dim);
  const int64_t i = row % p.q_len;
  const int64_t h = (row / p.q_len) % p.heads;
  const int64_t b = row / (p.q_len * p.heads);

  const T* q = p.q.data + b * p.q.batch_stride + h * p.q.head_stride + i * p.q.row_stride;
  float qf[kWidth];
  float acc[kWidth];
  for (int c = 0; c < d; ++c) {
    qf[c] = to_float(q[c]) * p.scale;
    acc[c] = 0.f;
  }
  OnlineSoftmax state{-INFINITY, 0.f};

  const int64_t prefix_offset = b * p.k_prefix.batch_stride + h * p.k_prefix.head_stride;
  const int64_t prefix_value_offset = b * p.v_prefix.batch_stride + h * p.v_prefix.head_stride;
  accumulate_key_range<T, D>(qf, p.k_prefix.data + prefix_offset, p.k_prefix.row_stride,
                             p.v_prefix.data + prefix_value_offset, p.v_prefix.row_stride, p.prefix_len, d, state,
                             acc);

  int64_t visible = p.kv_len;
  if (p.causal) {
    const int64_t last = i + 1 + (p.kv_len - p.q_len);
    visible = last < 0 ? 0 : (last < p.kv_len ? last : p.kv_len);
  }
  const int64_t kv_offset = b * p.k.batch_stride + h * p.k.head_stride;
  const int64_t v_offset = b * p.v.batch_stride + h * p.v.head_stride;
  accumulate_key_range<T, D>(qf, p.k.data + kv_offset, p.k.row_stride, p.v.data + v_offset, p.v.row_stride, visible, d,
                             state, acc);

  // A row that sees no key at all (only possible with an empty prefix and a causal offset) writes zeros.
  const float inv_sum = state.sum_exp > 0.f ? 1.f / state.sum_exp : 0.f;
  T* out = p.out.data + b * p.out.batch_stride + h * p.out.head_stride + i * p.out.row_stride;
  for (int c = 0; c < d; ++c) out[c] = from_float<T>(acc[c] * inv_sum);
}

}  // namespace apl
