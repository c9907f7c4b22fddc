// Linear with a quantized weight on CPU (issue #20; formats: gptfast/ops/quant.py), shared by
// quant_linear.cpp (the op) and decode_step.cpp (the fused decoding step). See quant_linear.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace gptfast {

// The op gptfast::quantized_linear: x (M, K) fp32 @ w^T (+ bias (N,) fp32) -> (M, N) fp32, w the
// dequantized weight of (qweight, scale, zero, bits, group_size); group_size 0 = per output
// channel (int8 only). act_int8 (int8 formats only): x quantized per row and 32-block to int8
// (llama.cpp's q8_0 activations) and integer dot products. Checks every input (errors name it).
at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias,
                            int64_t bits, int64_t group_size, bool act_int8);

// Rows `idx` (B,) int64 of the dequantized (V, C) matrix (qweight, scale, zero, bits, group_size) as a
// (B, C) fp32 tensor, bit for bit gptfast.ops.quant.dequantize_weight's values (QuantEmbedding).
at::Tensor quantized_embedding(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                               int64_t bits, int64_t group_size, const at::Tensor& idx);

}  // namespace gptfast
