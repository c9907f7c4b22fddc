// LayerNorm forward / backward on CPU (fp32 with fp32 accumulation; fp64 for gradcheck).
//
// Forward: one row (N <= a few thousand floats) is read from memory once and then stays in L1, so
// the mean, the centred variance (two-pass, no cancellation unlike E[x^2] - E[x]^2) and the
// output are computed from cache: one read of x and one write of y per element, the minimum.
// The two row sums use four vector accumulators (one would make every add wait on the last), and
// outputs of >= 4 MiB are written with non-temporal stores (simd.h: no read-for-ownership of y's
// lines, 1.3-1.45x on (8192, 768)). Rows are split over threads with at::parallel_for.
// Backward (as in Apex / PyTorch's CPU kernel): with xhat = (x - mean) * rstd and g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum_rows dy * xhat,  db = sum_rows dy.
// dw / db are accumulated per fixed chunk of kBwdChunkRows rows into private buffers, then the
// chunks are summed by ATen's reduction (itself blocked / pairwise): no atomics, no races, results
// that depend neither on thread scheduling nor on the thread count, and a sum over M rows whose
// rounding error grows like PyTorch's own (a long sequential fp32 sum per thread was ~4x worse at
// M = 1400). A large dx is streamed out like y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "simd.h"

namespace gptfast {
namespace {

// ---------------------------------------------------------------------------- forward, fp32

// sum_i f(x[i]) over a row with four independent vector accumulators: a single accumulator makes
// each add wait for the previous one (4-cycle latency), which at N = 768 cost as much as the
// row's memory traffic.
template <typename Fn>
GPTFAST_INLINE float row_sum(const float* xr, int64_t N, Fn f) {
  Vf a0 = Vf{}, a1 = Vf{}, a2 = Vf{}, a3 = Vf{};
  int64_t i = 0;
  for (; i + 32 <= N; i += 32) {
    a0 += f(vload(xr + i));
    a1 += f(vload(xr + i + 8));
    a2 += f(vload(xr + i + 16));
    a3 += f(vload(xr + i + 24));
  }
  for (; i + 8 <= N; i += 8) a0 += f(vload(xr + i));
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; i < N; ++i) {
    Vf one = Vf{};
    one[0] = xr[i];
    s += f(one)[0];
  }
  return s;
}

template <bool HAS_W, bool HAS_B>
GPTFAST_INLINE void ln_fwd_rows_impl(const float* x, const float* w, const float* b, float* y,
                                     float* mean_out, float* rstd_out, int64_t r0, int64_t r1,
                                     int64_t N, float eps, bool stream) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * N;
    float* yr = y + r * N;
    const float mean = row_sum(xr, N, [](Vf v) { return v; }) * inv_n;
    const float ss = row_sum(xr, N, [mean](Vf v) {
      const Vf d = v - mean;
      return d * d;
    });
    const float rstd = 1.0f / std::sqrt(ss * inv_n + eps);
    auto one = [&](int64_t i) {
      float v = (xr[i] - mean) * rstd;
      if (HAS_W) v *= w[i];
      if (HAS_B) v += b[i];
      yr[i] = v;
    };
    int64_t i = 0;
    if (stream) {
      const int64_t head = stream_row_begin(yr, N);
      for (; i < head; ++i) one(i);
    }
    for (; i + 8 <= N; i += 8) {
      Vf v = (vload(xr + i) - mean) * rstd;
      if (HAS_W) v *= vload(w + i);
      if (HAS_B) v += vload(b + i);
      vstore_f32(yr + i, v, stream);
    }
    for (; i < N; ++i) one(i);
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
  if (stream) stream_fence();
}

GPTFAST_CLONES
void ln_fwd_rows_f32(const float* x, const float* w, const float* b, float* y, float* mean_out,
                     float* rstd_out, int64_t r0, int64_t r1, int64_t N, float eps, bool stream) {
  if (w && b) ln_fwd_rows_impl<true, true>(x, w, b, y, mean_out, rstd_out, r0, r1, N, eps, stream);
  else if (w) ln_fwd_rows_impl<true, false>(x, w, b, y, mean_out, rstd_out, r0, r1, N, eps, stream);
  else if (b) ln_fwd_rows_impl<false, true>(x, w, b, y, mean_out, rstd_out, r0, r1, N, eps, stream);
  else ln_fwd_rows_impl<false, false>(x, w, b, y, mean_out, rstd_out, r0, r1, N, eps, stream);
}

// ---------------------------------------------------------------------------- backward, fp32

// One chunk of rows; dw_acc / db_acc: (N,) private partial sums of this chunk.
GPTFAST_CLONES
void ln_bwd_rows_f32(const float* dy, const float* x, const float* w, const float* mean,
                     const float* rstd, float* dx, float* dw_acc, float* db_acc, int64_t r0,
                     int64_t r1, int64_t N, bool stream) {
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = r0; r < r1; ++r) {
    const float* dyr = dy + r * N;
    const float* xr = x + r * N;
    float* dxr = dx + r * N;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    if (w) {
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = 0; i < N; ++i) {
        const float xh = (xr[i] - mu) * rs;
        const float g = dyr[i] * w[i];
        sg += g;
        sgx += g * xh;
        dw_acc[i] += dyr[i] * xh;
        db_acc[i] += dyr[i];
      }
    } else {
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t i = 0; i < N; ++i) {
        const float xh = (xr[i] - mu) * rs;
        sg += dyr[i];
        sgx += dyr[i] * xh;
        dw_acc[i] += dyr[i] * xh;
        db_acc[i] += dyr[i];
      }
    }
    const float mg = sg * inv_n, mgx = sgx * inv_n;
    auto one = [&](int64_t i) {
      const float xh = (xr[i] - mu) * rs;
      const float g = w ? dyr[i] * w[i] : dyr[i];
      dxr[i] = rs * (g - mg - xh * mgx);
    };
    int64_t i = 0;
    if (stream) {
      const int64_t head = stream_row_begin(dxr, N);
      for (; i < head; ++i) one(i);
    }
    for (; i + 8 <= N; i += 8) {
      const Vf xh = (vload(xr + i) - mu) * rs;
      const Vf g = w ? vload(dyr + i) * vload(w + i) : vload(dyr + i);
      vstore_f32(dxr + i, rs * (g - mg - xh * mgx), stream);
    }
    for (; i < N; ++i) one(i);
  }
  if (stream) stream_fence();
}

// ---------------------------------------------------------------------------- fp64 (gradcheck)

// Plain loops (speed is irrelevant), statistics in double.
void ln_stats_f64(const double* xr, int64_t N, double eps, double& mean, double& rstd) {
  double s = 0.0;
  for (int64_t i = 0; i < N; ++i) s += xr[i];
  mean = s / N;
  double ss = 0.0;
  for (int64_t i = 0; i < N; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
  rstd = 1.0 / std::sqrt(ss / N + eps);
}

// ---------------------------------------------------------------------------- checks

void check_vec(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t N,
               const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              t->device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == N, op, ": ", name, " must have shape (", N, "), got ", t->sizes());
}

void check_x(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", x.sizes());
}

// Rows per parallel task: enough work (~16K elements) to amortise the task overhead.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

}  // namespace

// ---------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x_,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              double eps) {
  const char* op = "layer_norm_fwd";
  check_x(x_, "x", op);
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(N > 0, op, ": x must have N > 0 columns, got shape ", x_.sizes());
  check_vec(weight, "weight", x_, N, op);
  check_vec(bias, "bias", x_, N, op);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite number, got ", eps);
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.data_ptr<float>();
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    const float feps = static_cast<float>(eps);
    const bool stream = M * N * int64_t(sizeof(float)) >= kStreamMinBytes;
    at::parallel_for(0, M, row_grain(N), [&](int64_t r0, int64_t r1) {
      ln_fwd_rows_f32(xp, wp, bp, yp, mp, rp, r0, r1, N, feps, stream);
    });
  } else {
    const double* xp = x.data_ptr<double>();
    const double* wp = w.defined() ? w.data_ptr<double>() : nullptr;
    const double* bp = b.defined() ? b.data_ptr<double>() : nullptr;
    double* yp = y.data_ptr<double>();
    at::parallel_for(0, M, row_grain(N), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double mu, rs;
        ln_stats_f64(xp + r * N, N, eps, mu, rs);
        for (int64_t i = 0; i < N; ++i) {
          double v = (xp[r * N + i] - mu) * rs;
          if (wp) v *= wp[i];
          if (bp) v += bp[i];
          yp[r * N + i] = v;
        }
        mp[r] = static_cast<float>(mu);
        rp[r] = static_cast<float>(rs);
      }
    });
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean_, const at::Tensor& rstd_) {
  const char* op = "layer_norm_bwd";
  check_x(x_, "x", op);
  const int64_t M = x_.size(0), N = x_.size(1);
  TORCH_CHECK(dy_.device() == x_.device() && dy_.scalar_type() == x_.scalar_type(), op,
              ": dy must have x's device and dtype (", x_.device(), ", ", x_.scalar_type(), "), got ", dy_.device(),
              ", ", dy_.scalar_type());
  TORCH_CHECK(dy_.sizes() == x_.sizes(), op, ": dy must have x's shape ", x_.sizes(), ", got ", dy_.sizes());
  check_vec(weight, "weight", x_, N, op);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{mean_, "mean"}, {rstd_, "rstd"}}) {
    TORCH_CHECK(t.device() == x_.device() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == M, op,
                ": ", name, " must be a float32 tensor of shape (", M, ") on x's device, got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
  }
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor dx = at::empty({M, N}, x.options());
  // Fixed chunks of kBwdChunkRows rows, each with private (dw, db) partial sums (see the header).
  constexpr int64_t kBwdChunkRows = 32;
  const int64_t nchunks = std::max<int64_t>(1, (M + kBwdChunkRows - 1) / kBwdChunkRows);
  const bool f32 = x.scalar_type() == at::kFloat;
  const bool stream = M * N * int64_t(x.element_size()) >= kStreamMinBytes;  // dx: see simd.h
  at::Tensor partial = at::zeros({nchunks, 2, N}, x.options());  // [:, 0] dw, [:, 1] db
  if (M > 0) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * kBwdChunkRows, r1 = std::min(M, r0 + kBwdChunkRows);
        if (f32) {
          float* acc = partial.data_ptr<float>() + c * 2 * N;
          ln_bwd_rows_f32(dy.data_ptr<float>(), x.data_ptr<float>(), w.defined() ? w.data_ptr<float>() : nullptr,
                          mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<float>(), acc, acc + N, r0,
                          r1, N, stream);
        } else {
          double* acc = partial.data_ptr<double>() + c * 2 * N;
          const double* dyp = dy.data_ptr<double>();
          const double* xp = x.data_ptr<double>();
          const double* wp = w.defined() ? w.data_ptr<double>() : nullptr;
          double* dxp = dx.data_ptr<double>();
          for (int64_t r = r0; r < r1; ++r) {
            // mean recomputed in double (an fp32 mean, amplified by rstd, would be the largest
            // error: e.g. N = 1, where xhat must be exactly 0); rstd is the saved fp32 value (the
            // schema passes no eps to recompute it): relative error ~6e-8, inside gradcheck's.
            double mu, unused;
            ln_stats_f64(xp + r * N, N, 1.0, mu, unused);
            const double rs = rstd.data_ptr<float>()[r];
            double sg = 0, sgx = 0;
            for (int64_t i = 0; i < N; ++i) {
              const double xh = (xp[r * N + i] - mu) * rs;
              const double g = dyp[r * N + i] * (wp ? wp[i] : 1.0);
              sg += g;
              sgx += g * xh;
              acc[i] += dyp[r * N + i] * xh;
              acc[N + i] += dyp[r * N + i];
            }
            for (int64_t i = 0; i < N; ++i) {
              const double xh = (xp[r * N + i] - mu) * rs;
              const double g = dyp[r * N + i] * (wp ? wp[i] : 1.0);
              dxp[r * N + i] = rs * (g - sg / N - xh * sgx / N);
            }
          }
        }
      }
    });
  }
  at::Tensor sums = partial.sum(0);  // (2, N)
  return {dx, sums[0].clone(), sums[1].clone()};  // separate storages: outputs must not alias
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("layer_norm_fwd", &gptfast::layer_norm_fwd);
  m.impl("layer_norm_bwd", &gptfast::layer_norm_bwd);
}
