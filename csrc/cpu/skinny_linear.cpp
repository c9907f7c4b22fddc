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

#include "simd.h"

namespace gptfast {
namespace {

// Dot products of MB (1 or 2) rows of x (ldx apart) with four weight rows (ldw apart, K floats
// each): o[r * 4 + j] = x_r . w_j.
template <int MB>
GPTFAST_INLINE void tile_4xMB(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t ldw,
                              int64_t K, float* o) {
  const float* x0 = x;
  const float* x1 = x + (MB > 1 ? ldx : 0);
  const float* w0 = w;
  const float* w1 = w + ldw;
  const float* w2 = w + 2 * ldw;
  const float* w3 = w + 3 * ldw;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t k = 0; k < K; ++k) {
    const float u0 = w0[k], u1 = w1[k], u2 = w2[k], u3 = w3[k];
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

// Columns [n0, n1) of out (M, N) for all M rows.
GPTFAST_CLONES
void skinny_range_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                      int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[8];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nb = std::min<int64_t>(4, n1 - n);  // weight rows in this tile
    const float* wt = w + n * ldw;
    if (nb < 4) {
      // 1..3 rows left (only at the end of a range): one row at a time (a tile of 4 would read
      // past the weight), with the row stride 0 so that the tile's four rows are all this row.
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t m = 0; m < M; ++m) {
          tile_4xMB<1>(x + m * ldx, ldx, wt + j * ldw, 0, K, o);
          out[m * N + n + j] = bias ? o[0] + bias[n + j] : o[0];
        }
      }
      continue;
    }
    float bias_t[4];
    for (int j = 0; j < 4; ++j) bias_t[j] = bias ? bias[n + j] : 0.f;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      tile_4xMB<2>(x + m * ldx, ldx, wt, ldw, K, o);
      for (int j = 0; j < 4; ++j) {
        out[m * N + n + j] = o[j] + bias_t[j];
        out[(m + 1) * N + n + j] = o[4 + j] + bias_t[j];
      }
    }
    if (m < M) {
      tile_4xMB<1>(x + m * ldx, ldx, wt, ldw, K, o);
      for (int j = 0; j < 4; ++j) out[m * N + n + j] = o[j] + bias_t[j];
    }
  }
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
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
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

at::Tensor skinny_linear(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_) {
  check_inputs(x_, weight_, bias_);
  const at::Tensor x = rows_unit_stride(x_);
  const at::Tensor weight = rows_unit_stride(weight_);
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (x.scalar_type() == at::kFloat) {
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
