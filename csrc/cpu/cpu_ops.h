// The CPU ops' C++ entry points (the functions registered with the dispatcher), for kernels that
// call other ops directly: the fused decode step (decode_step.cpp) runs a whole forward with no
// Python and no dispatcher in between. Each checks its inputs as when called through torch.ops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace gptfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd);

// exact: the exact (erf) GELU instead of the tanh approximation (see gelu_mlp.cpp).
std::tuple<at::Tensor, at::Tensor> gelu_mlp_fwd(const at::Tensor& x, const at::Tensor& w_fc,
                                                const c10::optional<at::Tensor>& b_fc, const at::Tensor& w_proj,
                                                const c10::optional<at::Tensor>& b_proj, bool exact);
// Also takes bf16 weights with fp32 x (weight-only bf16; fp32 math).
at::Tensor gelu_mlp_infer(const at::Tensor& x, const at::Tensor& w_fc, const c10::optional<at::Tensor>& b_fc,
                          const at::Tensor& w_proj, const c10::optional<at::Tensor>& b_proj, bool exact);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_bwd(const at::Tensor& dy,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& w_fc,
                                                                                    const at::Tensor& w_proj,
                                                                                    const at::Tensor& pre,
                                                                                    bool exact);

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_lens, double scale);

}  // namespace gptfast
