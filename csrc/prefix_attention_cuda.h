// Torch-free entry point of the CUDA kernel: the torch binding (prefix_attention_cuda_binding.cpp) and a TensorRT
// plugin can both call it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "prefix_attention.h"

namespace apl {

// Launches one thread per query row on `stream`; instantiated for float, __half and __nv_bfloat16.
template <typename T>
cudaError_t launch_prefix_attention(const PrefixAttentionParams<T>& params, cudaStream_t stream);

}  // namespace apl
