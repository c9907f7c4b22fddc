// Skinny linear (small M) on CPU, shared by skinny_linear.cpp (the op) and gelu_mlp.cpp (its
// small-M forward). See skinny_linear.cpp for the algorithm.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace gptfast {

// Up to this many rows, the skinny kernel beats ATen's addmm (MKL sgemm) on this project's CPU:
// measured 768->{768, 2304, 3072}, 3072->768 and 768->50257 (see skinny_linear.cpp). Callers
// that choose between the two paths use it (gelu_mlp's forward; the engine's decode step reads
// the same number through gptfast.ops.native.SKINNY_MAX_M).
constexpr int64_t kSkinnyMaxM = 16;

// out (M, N) = x (M, K) @ w (N, K)^T (+ bias (N,)), fp32. x rows are ldx apart, w rows ldw apart
// (both with inner stride 1); out is contiguous (M, N). Parallel over N; `epilogue(n0, n1)`, if
// given, runs on the thread that computed columns [n0, n1) of every row, right after it did
// (the columns are still in its cache).
void skinny_linear_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                       int64_t M, int64_t N, int64_t K,
                       const std::function<void(int64_t, int64_t)>& epilogue = nullptr);

// The same with bf16 weights (raw bits, w rows ldw elements apart) and fp32 x / bias / out: each
// weight element is widened to fp32 exactly and every product accumulates in fp32 (weight-only bf16:
// half the bytes streamed per call, the arithmetic of the fp32 kernel). Opt-in exception: with
// GPTFAST_BF16_DOT=1 on a CPU with avx512_bf16, x is rounded to bf16 and the products use
// vdpbf16ps (faster at M >= 8, error up to 2^-8 of sum |x w|; see skinny_linear.cpp).
void skinny_linear_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K,
                         const std::function<void(int64_t, int64_t)>& epilogue = nullptr);

// Whether GPTFAST_BF16_DOT=1 asks for the bf16 dot products and this CPU has avx512_bf16 (read at
// each call). With it, bf16-weight products run through vdpbf16ps for ANY number of rows: the
// skinny kernel then also serves the prompt pass (many rows), about 2x an fp32 GEMM on the widened
// weight (measured: benchmarks/results/cpu/bf16_dot_prompt.txt).
bool bf16_dot_enabled();

// The op: checks its inputs (errors name `op`), returns x @ weight^T + bias as a new (M, N) tensor.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace gptfast
