// GPT-2's MLP on CPU: y = gelu(x w_fc^T + b_fc) w_proj^T + b_proj, gelu = the tanh approximation
// (GPT-2, HF gelu_new; the default) or, with exact = true, the exact erf GELU (torch.nn.GELU(),
// nanoGPT, HF "gelu"; erf from simd.h's erf_erfc, a vectorisable fit good to a few fp32 ulp).
//
// The matmuls go through ATen (BLAS: addmm with the bias folded in, nn.Linear's layouts), which
// no hand-written loop here would beat. What is ours is the elementwise part, fused:
// - forward: addmm writes pre = x w_fc^T + b_fc; one vectorised parallel pass reads pre and writes
//   h = gelu(pre). pre is returned (and saved for backward), h is not: saving only one (M, F)
//   activation halves what the MLP keeps alive between forward and backward.
// - inference (gelu_mlp_infer: nothing needs gradients): GELU in place on pre, so one (M, F)
//   buffer instead of two and no separate write of h through memory.
// - backward: dh = dy w_proj; one pass over (pre, dh) recomputes h = gelu(pre) (needed for
//   dw_proj = dy^T h), turns dh into dpre = dh * gelu'(pre) in place and accumulates db_fc's
//   column sums in per-chunk buffers: eager PyTorch spends a separate pass on each of these.
// - forward with few rows (M <= kSkinnyMaxM, fp32: batched decoding): both matmuls use the skinny
//   kernel (skinny_linear.cpp), which streams each weight once where addmm does not; b_fc is added
//   as pre is stored and GELU runs as its epilogue, on each thread's columns while they are in
//   cache. Same pre / y as the addmm path up to fp32 summation order.
// GELU's tanh uses a vectorisable exp (simd.h) instead of libm's scalar tanhf, the exact GELU a
// vectorisable erf (simd.h) instead of libm's erff (the loops vectorise only with
// -fno-trapping-math, see gptfast/_build.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_ops.h"
#include "simd.h"
#include "skinny_linear.h"

namespace gptfast {
namespace {

constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kBeta = 0.044715f;

GPTFAST_CLONES
void gelu_fwd_f32(const float* pre, float* h, int64_t n, bool exact) {
  if (exact) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float p = pre[i];
      float pdf;
      h[i] = p * normal_cdf(p, &pdf);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float p = pre[i];
    const float t = fast_tanh(kAlpha * (p + kBeta * p * p * p));
    h[i] = 0.5f * p * (1.0f + t);
  }
}

// Rows r0..r1 of (M, F): h = gelu(pre); dh *= gelu'(pre) (-> dpre); db_acc (F,) += column sums.
GPTFAST_CLONES
void gelu_bwd_rows_f32(const float* pre, float* dh, float* h, float* db_acc, int64_t r0, int64_t r1, int64_t F,
                       bool exact) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* pr = pre + r * F;
    float* dr = dh + r * F;
    float* hr = h + r * F;
    if (exact) {  // gelu = x Phi(x), gelu' = Phi(x) + x phi(x)
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        const float p = pr[j];
        float pdf;
        const float cdf = normal_cdf(p, &pdf);
        hr[j] = p * cdf;
        const float g = dr[j] * (cdf + p * pdf);
        dr[j] = g;
        db_acc[j] += g;
      }
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const float p = pr[j];
      // t = tanh(u) = 1 - 2r, e = exp(2u), r = 1 / (e + 1): fast_tanh's own steps, so h is the
      // forward's to the bit. 1 - t^2 = 4 e r^2 from e and r directly: 1 - t * t cancels where
      // |t| -> 1 (|p| >~ 3), which cost gelu' ~2.5x PyTorch's fp32 error there.
      const float e = fast_exp(2.0f * (kAlpha * (p + kBeta * p * p * p)));
      const float rr = 1.0f / (e + 1.0f);
      const float t = 1.0f - 2.0f * rr;
      hr[j] = 0.5f * p * (1.0f + t);
      const float d = 0.5f * (1.0f + t) + 2.0f * p * ((e * rr) * rr) * kAlpha * (1.0f + 3.0f * kBeta * p * p);
      const float g = dr[j] * d;
      dr[j] = g;
      db_acc[j] += g;
    }
  }
}

// fp64 (gradcheck): plain loops with std::tanh / std::erfc.
constexpr double kSqrtHalf64 = 0.70710678118654752440, kInvSqrt2Pi64 = 0.39894228040143267794;

void gelu_fwd_f64(const double* pre, double* h, int64_t n, bool exact) {
  const double a = std::sqrt(2.0 / M_PI), b = 0.044715;
  for (int64_t i = 0; i < n; ++i) {
    if (exact) {
      h[i] = pre[i] * 0.5 * std::erfc(-pre[i] * kSqrtHalf64);
      continue;
    }
    const double p = pre[i];
    h[i] = 0.5 * p * (1.0 + std::tanh(a * (p + b * p * p * p)));
  }
}

void gelu_bwd_rows_f64(const double* pre, double* dh, double* h, double* db_acc, int64_t r0, int64_t r1, int64_t F,
                       bool exact) {
  const double a = std::sqrt(2.0 / M_PI), b = 0.044715;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < F; ++j) {
      const double p = pre[r * F + j];
      if (exact) {
        const double cdf = 0.5 * std::erfc(-p * kSqrtHalf64);
        h[r * F + j] = p * cdf;
        const double g = dh[r * F + j] * (cdf + p * kInvSqrt2Pi64 * std::exp(-0.5 * p * p));
        dh[r * F + j] = g;
        db_acc[j] += g;
        continue;
      }
      const double t = std::tanh(a * (p + b * p * p * p));
      h[r * F + j] = 0.5 * p * (1.0 + t);
      const double g = dh[r * F + j] * (0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * a * (1.0 + 3.0 * b * p * p));
      dh[r * F + j] = g;
      db_acc[j] += g;
    }
  }
}

// bf16w: gelu_mlp_infer also takes bfloat16 weights with float32 x (weight-only bf16, fp32 math).
void check_2d(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op, bool bf16w = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  const bool bf16_ok = bf16w && x.scalar_type() == at::kFloat && t.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16_ok || t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              bf16w ? " (or bfloat16 with float32 x)" : "", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, C), got shape ", x.sizes());
}

void check_bias(const c10::optional<at::Tensor>& b, const char* name, int64_t n, const at::Tensor& x, const char* op) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", b->device());
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", b->scalar_type());
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", name, " must have shape (", n, "), got ", b->sizes());
}

// Shapes: x (M, C), w_fc (F, C), w_proj (C_out, F).
void check_weights(const at::Tensor& x, const at::Tensor& w_fc, const at::Tensor& w_proj, const char* op,
                   bool bf16w = false) {
  check_2d(w_fc, "w_fc", x, op, bf16w);
  check_2d(w_proj, "w_proj", x, op, bf16w);
  TORCH_CHECK(w_fc.scalar_type() == w_proj.scalar_type(), op, ": w_fc and w_proj must have the same dtype, got ",
              w_fc.scalar_type(), " and ", w_proj.scalar_type());
  TORCH_CHECK(w_fc.size(1) == x.size(1), op, ": w_fc must have shape (F, ", x.size(1), ") to match x ", x.sizes(),
              ", got ", w_fc.sizes());
  TORCH_CHECK(w_proj.size(1) == w_fc.size(0), op, ": w_proj must have shape (C_out, ", w_fc.size(0),
              ") to match w_fc ", w_fc.sizes(), ", got ", w_proj.sizes());
}

}  // namespace

// Few rows, fp32, weights with unit inner stride (nn.Linear's own; a transposed view would need a
// copy of the weight, so those keep the addmm path): see the header comment.
static std::tuple<at::Tensor, at::Tensor> gelu_mlp_fwd_skinny(const at::Tensor& x_, const at::Tensor& w_fc,
                                                              const c10::optional<at::Tensor>& b_fc,
                                                              const at::Tensor& w_proj,
                                                              const c10::optional<at::Tensor>& b_proj, bool exact) {
  const at::Tensor x = x_.contiguous();  // (M, C): a few KB
  const int64_t M = x.size(0), C = x.size(1), F = w_fc.size(0), C_out = w_proj.size(0);
  at::Tensor pre = at::empty({M, F}, x.options());
  at::Tensor h = at::empty({M, F}, x.options());
  at::Tensor y = at::empty({M, C_out}, x.options());
  if (M == 0) return {y, pre};
  const at::Tensor bf = b_fc.has_value() ? b_fc->contiguous() : at::Tensor();
  const at::Tensor bp = b_proj.has_value() ? b_proj->contiguous() : at::Tensor();
  float* pp = pre.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float* bfp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const float* bpp = bp.defined() ? bp.data_ptr<float>() : nullptr;
  auto gelu = [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) gelu_fwd_f32(pp + m * F + n0, hp + m * F + n0, n1 - n0, exact);
  };
  if (w_fc.scalar_type() == at::kBFloat16) {  // weight-only bf16 (gelu_mlp_infer)
    skinny_linear_bf16w(x.data_ptr<float>(), C, reinterpret_cast<const uint16_t*>(w_fc.data_ptr()), w_fc.stride(0),
                        bfp, pp, M, F, C, gelu);
    skinny_linear_bf16w(hp, F, reinterpret_cast<const uint16_t*>(w_proj.data_ptr()), w_proj.stride(0), bpp,
                        y.data_ptr<float>(), M, C_out, F);
  } else {
    skinny_linear_f32(x.data_ptr<float>(), C, w_fc.data_ptr<float>(), w_fc.stride(0), bfp, pp, M, F, C, gelu);
    skinny_linear_f32(hp, F, w_proj.data_ptr<float>(), w_proj.stride(0), bpp, y.data_ptr<float>(), M, C_out, F);
  }
  return {y, pre};
}

// h = gelu(pre) over n elements, in parallel; h may be pre itself (in place).
static void gelu_fwd(const at::Tensor& pre, at::Tensor& h, bool exact) {
  const int64_t n = pre.numel();
  if (n > 0) {
    if (pre.scalar_type() == at::kFloat) {
      const float* pp = pre.data_ptr<float>();
      float* hp = h.data_ptr<float>();
      at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) { gelu_fwd_f32(pp + i0, hp + i0, i1 - i0, exact); });
    } else {
      const double* pp = pre.data_ptr<double>();
      double* hp = h.data_ptr<double>();
      at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) { gelu_fwd_f64(pp + i0, hp + i0, i1 - i0, exact); });
    }
  }
}

static void check_fwd_args(const at::Tensor& x, const at::Tensor& w_fc, const c10::optional<at::Tensor>& b_fc,
                    const at::Tensor& w_proj, const c10::optional<at::Tensor>& b_proj, const char* op,
                    bool bf16w = false) {
  check_x(x, op);
  check_weights(x, w_fc, w_proj, op, bf16w);
  check_bias(b_fc, "b_fc", w_fc.size(0), x, op);
  check_bias(b_proj, "b_proj", w_proj.size(0), x, op);
}

static bool use_skinny(const at::Tensor& x, const at::Tensor& w_fc, const at::Tensor& w_proj) {
  return x.scalar_type() == at::kFloat && x.size(0) <= kSkinnyMaxM && w_fc.stride(1) == 1 && w_proj.stride(1) == 1 &&
         w_fc.size(1) > 1 && w_proj.size(1) > 1;
}

// (M, F) pre-activation x w_fc^T + b_fc; addmm handles any strides of x and the transposed weight view.
static at::Tensor fc(const at::Tensor& x, const at::Tensor& w_fc, const c10::optional<at::Tensor>& b_fc) {
  return (b_fc.has_value() ? at::addmm(*b_fc, x, w_fc.t()) : at::mm(x, w_fc.t())).contiguous();
}

static at::Tensor proj(const at::Tensor& h, const at::Tensor& w_proj, const c10::optional<at::Tensor>& b_proj) {
  return b_proj.has_value() ? at::addmm(*b_proj, h, w_proj.t()) : at::mm(h, w_proj.t());  // (M, C_out)
}

std::tuple<at::Tensor, at::Tensor> gelu_mlp_fwd(const at::Tensor& x, const at::Tensor& w_fc,
                                                const c10::optional<at::Tensor>& b_fc, const at::Tensor& w_proj,
                                                const c10::optional<at::Tensor>& b_proj, bool exact) {
  check_fwd_args(x, w_fc, b_fc, w_proj, b_proj, "gelu_mlp_fwd");
  if (use_skinny(x, w_fc, w_proj)) return gelu_mlp_fwd_skinny(x, w_fc, b_fc, w_proj, b_proj, exact);
  at::Tensor pre = fc(x, w_fc, b_fc);  // saved for backward
  at::Tensor h = at::empty_like(pre);
  gelu_fwd(pre, h, exact);
  return {proj(h, w_proj, b_proj), pre};
}

// No gradients wanted: GELU in place, one (M, F) buffer (half the activation memory, and one
// fewer pass of writes through memory).
at::Tensor gelu_mlp_infer(const at::Tensor& x, const at::Tensor& w_fc, const c10::optional<at::Tensor>& b_fc,
                          const at::Tensor& w_proj, const c10::optional<at::Tensor>& b_proj, bool exact) {
  check_fwd_args(x, w_fc, b_fc, w_proj, b_proj, "gelu_mlp_infer", /*bf16w=*/true);
  if (use_skinny(x, w_fc, w_proj)) return std::get<0>(gelu_mlp_fwd_skinny(x, w_fc, b_fc, w_proj, b_proj, exact));
  if (w_fc.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kFloat && w_fc.stride(1) == 1 &&
      w_proj.stride(1) == 1 && bf16_dot_enabled()) {
    // The opt-in bf16 dot products (GPTFAST_BF16_DOT=1, avx512_bf16): the skinny kernel for any
    // number of rows (the prompt pass), about 2x the GEMM on widened copies below.
    return std::get<0>(gelu_mlp_fwd_skinny(x, w_fc, b_fc, w_proj, b_proj, exact));
  }
  if (w_fc.scalar_type() != x.scalar_type()) {  // bf16 weights, many rows: a GEMM on fp32 copies (exact widening)
    return gelu_mlp_infer(x, w_fc.to(x.scalar_type()), b_fc, w_proj.to(x.scalar_type()), b_proj, exact);
  }
  at::Tensor h = fc(x, w_fc, b_fc);
  gelu_fwd(h, h, exact);
  return proj(h, w_proj, b_proj);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mlp_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w_fc, const at::Tensor& w_proj,
    const at::Tensor& pre_, bool exact) {
  const char* op = "gelu_mlp_bwd";
  check_x(x, op);
  check_weights(x, w_fc, w_proj, op);
  const int64_t M = x.size(0), F = w_fc.size(0), C_out = w_proj.size(0);
  check_2d(dy, "dy", x, op);
  TORCH_CHECK(dy.size(0) == M && dy.size(1) == C_out, op, ": dy must have shape (", M, ", ", C_out, "), got ",
              dy.sizes());
  check_2d(pre_, "pre", x, op);
  TORCH_CHECK(pre_.size(0) == M && pre_.size(1) == F, op, ": pre must have shape (", M, ", ", F, "), got ",
              pre_.sizes());
  const at::Tensor pre = pre_.contiguous();
  at::Tensor dpre = at::mm(dy, w_proj).contiguous();  // (M, F): dh, turned into dpre in place below
  at::Tensor h = at::empty_like(pre);
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  at::Tensor partial = at::zeros({nchunks, F}, x.options());  // per-chunk db_fc partial sums
  if (M > 0 && F > 0) {
    const bool f32 = x.scalar_type() == at::kFloat;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = M * c / nchunks, r1 = M * (c + 1) / nchunks;
        if (f32) {
          gelu_bwd_rows_f32(pre.data_ptr<float>(), dpre.data_ptr<float>(), h.data_ptr<float>(),
                            partial.data_ptr<float>() + c * F, r0, r1, F, exact);
        } else {
          gelu_bwd_rows_f64(pre.data_ptr<double>(), dpre.data_ptr<double>(), h.data_ptr<double>(),
                            partial.data_ptr<double>() + c * F, r0, r1, F, exact);
        }
      }
    });
  }
  at::Tensor dw_proj = at::mm(dy.t(), h);  // (C_out, F)
  at::Tensor db_proj = dy.sum(0);          // (C_out,)
  at::Tensor dw_fc = at::mm(dpre.t(), x);  // (F, C)
  at::Tensor db_fc = partial.sum(0);       // (F,)
  at::Tensor dx = at::mm(dpre, w_fc);      // (M, C)
  return {dx, dw_fc, db_fc, dw_proj, db_proj};
}

// The vectorised erf of the exact GELU on its own (simd.h's fast_erf), for its accuracy tests.
at::Tensor erf_op(const at::Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat, "erf: x must be a float32 CPU tensor, got ",
              x_.scalar_type(), " on ", x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), 32768, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) yp[i] = fast_erf(xp[i]);
  });
  return y;
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("gelu_mlp_fwd", &gptfast::gelu_mlp_fwd);
  m.impl("gelu_mlp_infer", &gptfast::gelu_mlp_infer);
  m.impl("gelu_mlp_bwd", &gptfast::gelu_mlp_bwd);
  m.impl("erf", &gptfast::erf_op);
}
