// Linear for a few rows on CPU: y = x w^T + b with x (M, K), w (N, K) (nn.Linear layout), M small.
//
// Batched decoding multiplies a handful of activation rows (one per sequence) by every weight
// matrix. That is memory bound: each weight should be streamed from DRAM exactly once per call,
// and the arithmetic (M dot products per weight row) hidden under the stream. ATen's addmm (MKL
// sgemm on this CPU) does not manage that for 2 <= M <= 16: it packs / blocks for large GEMMs
// and, for (8, 768) x (768, 50257), took ~38 ms where streaming the 154 MB weight takes ~10 ms.
//
// Algorithm (fp32):
// - Parallel over N (at::parallel_for): each thread owns one contiguous range of weight rows, so
//   it streams its part of the weight sequentially (hardware prefetchers like that) and writes its
//   own columns of y; no reductions across threads.
// - Within a range, four weight rows at a time (4 x K floats: 12 KB for K = 768, stays in L1) are
//   combined with every row of x, two rows at a time: one pass over K computes the 4 x 2 dot
//   products with 8 independent `#pragma omp simd` reduction accumulators (8 vector chains keep
//   both FMA pipes busy despite the FMA latency; per 8 FMAs the loop loads 4 weight and 2 x
//   vectors). Four weight rows in flight are four concurrent DRAM streams: measured on this CPU,
//   that streams ~1.5x faster than two rows x four x rows (head at M = 8: 12.8 vs 20 ms). x (M x K
//   floats, 24 KB for M = 8) stays in L1 / L2 across all weight rows, so the weight is read from
//   memory once whatever M is.
// - Bias is added when the dot products are stored. An optional epilogue runs on each thread's
//   column range right after it is computed (gelu_mlp uses it to apply GELU while the
//   pre-activation is still in cache).
// fp64 (gradcheck-style tests): plain loops, accumulating in double.
#include "skinny_linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace gptfast {
namespace {

// A weight element as fp32. bf16 is the top half of an fp32 (same exponent), so widening is a
// 16-bit shift: exact, and it vectorises (zero-extend + shift) on any x86-64, no avx512_bf16 needed.
GPTFAST_INLINE float wload(float v) { return v; }
GPTFAST_INLINE float wload(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Dot products of MB (1 or 2) rows of x (ldx apart) with four weight rows (ldw apart, K elements
// each, fp32 or bf16 bits): o[r * 4 + j] = x_r . w_j, accumulated in fp32.
template <int MB, typename W>
GPTFAST_INLINE void tile_4xMB(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw,
                              int64_t K, float* o) {
  const float* x0 = x;
  const float* x1 = x + (MB > 1 ? ldx : 0);
  const W* w0 = w;
  const W* w1 = w + ldw;
  const W* w2 = w + 2 * ldw;
  const W* w3 = w + 3 * ldw;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t k = 0; k < K; ++k) {
    const float u0 = wload(w0[k]), u1 = wload(w1[k]), u2 = wload(w2[k]), u3 = wload(w3[k]);
    const float p = x0[k];
    a0 += p * u0;
    a1 += p * u1;
    a2 += p * u2;
    a3 += p * u3;
    if constexpr (MB > 1) {
      const float q = x1[k];
      b0 += q * u0;
      b1 += q * u1;
      b2 += q * u2;
      b3 += q * u3;
    }
  }
  o[0] = a0;
  o[1] = a1;
  o[2] = a2;
  o[3] = a3;
  if constexpr (MB > 1) {
    o[4] = b0;
    o[5] = b1;
    o[6] = b2;
    o[7] = b3;
  }
}

// The bf16 tile with explicit 8-lane vectors: GCC leaves the generic template's widening loads
// (`wload` under `omp simd`) scalar, which made the bf16 kernel compute bound (measured: no faster
// than fp32). Eight bf16 -> zero-extend to 32 bits -> shift -> eight fp32 lanes, then the same
// 4 x MB FMA chains; the K % 8 tail is scalar.
GPTFAST_INLINE Vf vload_bf16(const uint16_t* p) {
#if defined(__AVX2__)
  // One vpmovzxwd ymm + one shift (GCC lowers the generic version below to two 128-bit halves).
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<Vf>(_mm256_castsi256_ps(u));
#else
  typedef uint16_t Vh __attribute__((vector_size(16)));
  typedef uint32_t Vu __attribute__((vector_size(32)));
  Vh h;
  std::memcpy(&h, p, sizeof h);
  const Vu u = __builtin_convertvector(h, Vu) << 16;
  Vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

#ifndef GPTFAST_PF_ROWS
#define GPTFAST_PF_ROWS 16
#endif
#ifndef GPTFAST_PF_LOC
#define GPTFAST_PF_LOC 3
#endif

template <>
GPTFAST_INLINE void tile_4xMB<1, uint16_t>(const float* __restrict x, int64_t, const uint16_t* __restrict w,
                                           int64_t ldw, int64_t K, float* o) {
  Vf a0{}, a1{}, a2{}, a3{};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (GPTFAST_PF_ROWS + j) * ldw + k, 0, GPTFAST_PF_LOC);
    for (int kk = k; kk < k + 32; kk += 8) {
      const Vf p = vload(x + kk);
      a0 += p * vload_bf16(w + kk);
      a1 += p * vload_bf16(w + ldw + kk);
      a2 += p * vload_bf16(w + 2 * ldw + kk);
      a3 += p * vload_bf16(w + 3 * ldw + kk);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const Vf p = vload(x + k);
    a0 += p * vload_bf16(w + k);
    a1 += p * vload_bf16(w + ldw + k);
    a2 += p * vload_bf16(w + 2 * ldw + k);
    a3 += p * vload_bf16(w + 3 * ldw + k);
  }
  float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
  for (; k < K; ++k)
    for (int j = 0; j < 4; ++j) s[j] += x[k] * wload(w[j * ldw + k]);
  for (int j = 0; j < 4; ++j) o[j] = s[j];
}

template <>
GPTFAST_INLINE void tile_4xMB<2, uint16_t>(const float* __restrict x, int64_t ldx, const uint16_t* __restrict w,
                                           int64_t ldw, int64_t K, float* o) {
  const float* x1 = x + ldx;
  Vf a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (GPTFAST_PF_ROWS + j) * ldw + k, 0, GPTFAST_PF_LOC);
    for (int kk = k; kk < k + 32; kk += 8) {
      const Vf u0 = vload_bf16(w + kk), u1 = vload_bf16(w + ldw + kk), u2 = vload_bf16(w + 2 * ldw + kk),
               u3 = vload_bf16(w + 3 * ldw + kk);
      const Vf p = vload(x + kk), q = vload(x1 + kk);
      a0 += p * u0;
      a1 += p * u1;
      a2 += p * u2;
      a3 += p * u3;
      b0 += q * u0;
      b1 += q * u1;
      b2 += q * u2;
      b3 += q * u3;
    }
  }
  for (; k + 8 <= K; k += 8) {
    const Vf u0 = vload_bf16(w + k), u1 = vload_bf16(w + ldw + k), u2 = vload_bf16(w + 2 * ldw + k),
             u3 = vload_bf16(w + 3 * ldw + k);
    const Vf p = vload(x + k), q = vload(x1 + k);
    a0 += p * u0;
    a1 += p * u1;
    a2 += p * u2;
    a3 += p * u3;
    b0 += q * u0;
    b1 += q * u1;
    b2 += q * u2;
    b3 += q * u3;
  }
  float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
  for (; k < K; ++k) {
    for (int j = 0; j < 4; ++j) {
      const float u = wload(w[j * ldw + k]);
      s[j] += x[k] * u;
      s[4 + j] += x1[k] * u;
    }
  }
  for (int j = 0; j < 8; ++j) o[j] = s[j];
}

// Columns [n0, n1) of out (M, N) for all M rows.
template <typename W>
GPTFAST_INLINE void skinny_range(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out,
                                 int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[8];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nb = std::min<int64_t>(4, n1 - n);  // weight rows in this tile
    const W* wt = w + n * ldw;
    if (nb < 4) {
      // 1..3 rows left (only at the end of a range): one row at a time (a tile of 4 would read
      // past the weight), with the row stride 0 so that the tile's four rows are all this row.
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t m = 0; m < M; ++m) {
          tile_4xMB<1, W>(x + m * ldx, ldx, wt + j * ldw, 0, K, o);
          out[m * N + n + j] = bias ? o[0] + bias[n + j] : o[0];
        }
      }
      continue;
    }
    float bias_t[4];
    for (int j = 0; j < 4; ++j) bias_t[j] = bias ? bias[n + j] : 0.f;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      tile_4xMB<2, W>(x + m * ldx, ldx, wt, ldw, K, o);
      for (int j = 0; j < 4; ++j) {
        out[m * N + n + j] = o[j] + bias_t[j];
        out[(m + 1) * N + n + j] = o[4 + j] + bias_t[j];
      }
    }
    if (m < M) {
      tile_4xMB<1, W>(x + m * ldx, ldx, wt, ldw, K, o);
      for (int j = 0; j < 4; ++j) out[m * N + n + j] = o[j] + bias_t[j];
    }
  }
}

GPTFAST_CLONES
void skinny_range_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                      int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  skinny_range<float>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}

GPTFAST_CLONES
void skinny_range_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                        int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  skinny_range<uint16_t>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}

void skinny_f64(const double* x, int64_t ldx, const double* w, int64_t ldw, const double* bias, double* out,
                int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * w[n * ldw + k];
      out[m * N + n] = bias ? s + bias[n] : s;
    }
  }
}

// Weight rows per task: enough work (>= ~64K multiply-adds) to be worth a thread, and even so
// that the pairs of the tile do not straddle two threads' ranges needlessly.
int64_t grain_rows(int64_t M, int64_t K) {
  const int64_t g = (int64_t{1} << 16) / std::max<int64_t>(1, M * K);
  return std::max<int64_t>(8, (g + 7) / 8 * 8);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "skinny_linear";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() ||
                  (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16),
              op, ": weight must have x's dtype ", x.scalar_type(),
              " (or bfloat16 with float32 x: bf16 weights, fp32 math), got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape (N, ", x.size(1), ") to match x ",
              x.sizes(), ", got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got device ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), "), got ", bias->sizes());
  }
}

// A 2-D view with inner stride 1 (any row stride) as is; anything else copied contiguous.
at::Tensor rows_unit_stride(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

}  // namespace

void skinny_linear_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                       int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  if (M <= 0 || N <= 0) return;
  at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
    skinny_range_f32(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    if (epilogue) epilogue(n0, n1);
  });
}

void skinny_linear_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  if (M <= 0 || N <= 0) return;
  at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
    skinny_range_bf16w(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    if (epilogue) epilogue(n0, n1);
  });
}

at::Tensor skinny_linear(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_) {
  check_inputs(x_, weight_, bias_);
  const at::Tensor x = rows_unit_stride(x_);
  const at::Tensor weight = rows_unit_stride(weight_);
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (weight.scalar_type() == at::kBFloat16) {
    skinny_linear_bf16w(x.data_ptr<float>(), x.stride(0), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
                        weight.stride(0), bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), M,
                        N, K);
  } else if (x.scalar_type() == at::kFloat) {
    skinny_linear_f32(x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(), weight.stride(0),
                      bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K);
  } else {
    const double* xp = x.data_ptr<double>();
    const double* wp = weight.data_ptr<double>();
    const double* bp = bias.defined() ? bias.data_ptr<double>() : nullptr;
    double* op = out.data_ptr<double>();
    const int64_t ldx = x.stride(0), ldw = weight.stride(0);
    at::parallel_for(0, N, grain_rows(M, K),
                     [&](int64_t n0, int64_t n1) { skinny_f64(xp, ldx, wp, ldw, bp, op, M, N, K, n0, n1); });
  }
  return out;
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("skinny_linear", &gptfast::skinny_linear); }
