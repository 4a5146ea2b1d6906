// The torch.ops.apl namespace: operator schemas only. Kernels register their dispatch keys in their own files
// (prefix_attention_cpu.cpp, prefix_attention_cuda.cu).
#include <torch/extension.h>

TORCH_LIBRARY(apl, m) {
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor k_prefix, Tensor v_prefix, bool causal=True, "
      "float? scale=None) -> Tensor");
}

// Importing apl_adapter._C registers the operators above; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "apl_adapter fused kernels (see torch.ops.apl)"; }
