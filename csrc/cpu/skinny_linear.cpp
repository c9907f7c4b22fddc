// Linear for a few rows on CPU: y = x w^T + b with x (M, K), w (N, K) (nn.Linear layout), M small.
//
// Batched decoding multiplies a handful of activation rows (one per sequence) by every weight
// matrix. That is memory bound: each weight should be streamed from DRAM exactly once per call,
// and the arithmetic (M dot products per weight row) hidden under the stream. ATen's addmm (MKL
// sgemm on this CPU) does not manage that for 2 <= M <= 16: it packs / blocks for large GEMMs
// and, for (8, 768) x (768, 50257), took ~38 ms where streaming the 154 MB weight takes ~10 ms.
//
// Algorithm (fp32 x; weights fp32, or bf16 = weight-only bf16 with fp32 math):
// - Parallel over N (at::parallel_for): each thread owns one contiguous range of weight rows, so
//   it streams its part of the weight sequentially and writes its own columns of y; no reductions
//   across threads.
// - Within a range, four weight rows at a time (4 x K floats: 12 KB for K = 768, stays in L1) are
//   combined with every row of x, two rows at a time: one pass over K computes the 4 x 2 dot
//   products in 8 independent 8-lane FMA chains (enough to hide the FMA latency; per 8 FMAs the
//   loop loads 4 weight and 2 x vectors). Four weight rows in flight are four concurrent DRAM
//   streams: measured on this CPU, that streams ~1.5x faster than two rows x four x rows. x (M x K
//   floats, 24 KB for M = 8) stays in L1 / L2 across all weight rows, so the weight is read from
//   memory once whatever M is.
// - Software prefetch, PF_ROWS weight rows ahead, one per cache line of each row (see tile_4xMB).
//   Without it the stream fell behind DRAM as soon as the arithmetic per byte grew: GPT-2's head
//   (768 -> 50257, 2 threads) took 9.2 / 10.0 / 13.5 / 20.3 ms at M = 2 / 4 / 8 / 16 against
//   6.7 at M = 1; with it 6.7 / 7.0 / 8.5 / 13.2 (M = 1 unchanged at the bandwidth). The bf16
//   tile, which also widens every element, went from 6.2 to 3.9 ms at M = 1 (fp32: 6.4-6.7).
// - bf16 weights: each element is widened to fp32 exactly (a 16-bit shift; one vpmovzxwd + one
//   shift per 8 elements on AVX2) and accumulated in fp32, so y equals x @ w.float().T up to the
//   summation order, with half the bytes streamed.
// - Bias is added when the dot products are stored. An optional epilogue runs on each thread's
//   column range right after it is computed (gelu_mlp uses it to apply GELU while the
//   pre-activation is still in cache).
// fp64 (gradcheck-style tests): plain loops, accumulating in double.
#include "skinny_linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace gptfast {
namespace {

// A weight element as fp32. bf16 is the top half of an fp32 (same exponent), so widening is a
// 16-bit shift: exact, and cheap on any x86-64 (no avx512_bf16 needed).
GPTFAST_INLINE float wload(float v) { return v; }
GPTFAST_INLINE float wload(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Eight weight elements as fp32 lanes.
GPTFAST_INLINE Vf vload_w(const float* p) { return vload(p); }
GPTFAST_INLINE Vf vload_w(const uint16_t* p) {
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

// Software prefetch distance, in weight rows ahead of the tile (measured on this project's Zen 3
// VM, GPT-2 head 768 -> 50257, 2 threads; bf16 M = 1: 6.2 ms without, 4.4 / 4.1 / 3.9 ms at 4 / 8
// / 16 rows; fp32 M = 8: see the header comment). Out-of-range prefetches (past a thread's range
// or the matrix) are harmless: a prefetch never faults.
#ifndef GPTFAST_PF_ROWS
#define GPTFAST_PF_ROWS 16
#endif

// Dot products of MB (1 or 2) rows of x (ldx apart) with four weight rows (ldw apart, K elements
// each, fp32 or bf16 bits): o[r * 4 + j] = x_r . w_j, accumulated in fp32 with 4 x MB independent
// 8-lane FMA chains. Per cache line of each weight row, the line PF_ROWS rows further on is
// prefetched: the hardware prefetchers alone keep too few lines in flight once the arithmetic per
// byte grows (bf16 widening; two x rows), and the stream then runs well below the DRAM bandwidth.
// The K % 8 tail is scalar.
template <int MB, typename W>
GPTFAST_INLINE void tile_4xMB(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw,
                              int64_t K, float* o) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per 64-byte line: 16 fp32, 32 bf16
  const float* x1 = x + (MB > 1 ? ldx : 0);
  Vf a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  auto step = [&](int64_t k) GPTFAST_INLINE_LAMBDA {
    const Vf u0 = vload_w(w + k), u1 = vload_w(w + ldw + k), u2 = vload_w(w + 2 * ldw + k),
             u3 = vload_w(w + 3 * ldw + k);
    const Vf p = vload(x + k);
    a0 += p * u0;
    a1 += p * u1;
    a2 += p * u2;
    a3 += p * u3;
    if constexpr (MB > 1) {
      const Vf q = vload(x1 + k);
      b0 += q * u0;
      b1 += q * u1;
      b2 += q * u2;
      b3 += q * u3;
    }
  };
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (GPTFAST_PF_ROWS + j) * ldw + k, 0, 3);
    for (int64_t kk = k; kk < k + kLine; kk += 8) step(kk);
  }
  for (; k + 8 <= K; k += 8) step(k);
  float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
  for (; k < K; ++k) {
    for (int j = 0; j < 4; ++j) {
      const float u = wload(w[j * ldw + k]);
      s[j] += x[k] * u;
      if constexpr (MB > 1) s[4 + j] += x1[k] * u;
    }
  }
  for (int j = 0; j < 4 * MB; ++j) o[j] = s[j];
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

namespace {

// Parallel over the N weight rows (see the header comment); W picks the multi-versioned range kernel.
template <typename W>
void skinny_parallel(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
                     int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  if (M <= 0 || N <= 0) return;
  at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
    if constexpr (std::is_same_v<W, float>) {
      skinny_range_f32(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    } else {
      skinny_range_bf16w(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    }
    if (epilogue) epilogue(n0, n1);
  });
}

}  // namespace

void skinny_linear_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                       int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  skinny_parallel(x, ldx, w, ldw, bias, out, M, N, K, epilogue);
}

void skinny_linear_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  skinny_parallel(x, ldx, w, ldw, bias, out, M, N, K, epilogue);
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
