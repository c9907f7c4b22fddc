// Temperature / top-k / top-p sampling on CPU, token-for-token as gptfast/ops/reference.py.
//
// Per row of logits (V ~ 50K), with no sort of the vocabulary (the reference and the `torch`
// backend sort all V probabilities, and `torch` also runs topk + multinomial):
//   1. x = logits.float() / T and softmax run through ATen's own kernels, on the same (B, V)
//      shapes as the reference: the probabilities are then bit-identical to the reference's. A
//      hand-written exp (1-2 ulp off torch's) moved ~1 in 1000 draws to a neighbouring token, since
//      with V = 50K CDF boundaries an error of 1e-7 in each adds up; bit-identical is the point.
//   2. top-k: the k-th largest x by a size-k min-heap over one pass (k small, the usual case:
//      almost every element is rejected by one compare) or std::nth_element on a copy (large k);
//      x < kth -> -inf before the softmax (ties at the boundary kept), as the reference.
//   3. top-p: the threshold is the probability at which the descending cumulative sum first
//      reaches top_p. A 2048-bin histogram of probability mass keyed by the float's top bits
//      (order-preserving for non-negative floats) finds the bin where the sum crosses top_p; only
//      that bin's entries are sorted and walked. Prefix sums are kept in double and compared after
//      rounding to fp32, as torch's CPU cumsum (double accumulator) and the fp32 compare do.
//   4. inverse CDF: renormalise (ATen sum, only when top-p is on, like the reference), cumsum in
//      vocabulary order (double, rounded per element), first index whose cdf exceeds
//      u * cdf[V-1], clamped to the last kept token.
// The per-row work of 2-4 runs under at::parallel_for over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>


namespace gptfast {
namespace {

// ---------------------------------------------------------------------------- selection helpers

// The k-th largest value of x[0..V) (1 <= k < V).
float kth_largest(const float* x, int64_t V, int64_t k, std::vector<float>& scratch) {
  if (k <= 4096) {
    // Min-heap of the k largest seen so far; its top is the current k-th largest.
    scratch.assign(x, x + k);
    std::make_heap(scratch.begin(), scratch.end(), std::greater<float>());
    for (int64_t i = k; i < V; ++i) {
      if (x[i] > scratch.front()) {
        std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
        scratch.back() = x[i];
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      }
    }
    return scratch.front();
  }
  scratch.assign(x, x + V);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  return scratch[k - 1];
}

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// The top-p threshold over probabilities p[0..V) (>= 0, summing to ~1): the value at the first
// position where the cumulative sum, in descending order, reaches top_p (fp32 comparison), or the
// smallest probability if it never does (the reference clamps to the last position).
float top_p_threshold(const float* p, int64_t V, float top_p, std::vector<float>& scratch) {
  constexpr int kShift = 20;  // bits >> 20: sign (0), 8 exponent bits, 3 mantissa bits
  constexpr int kBins = 1 << (31 - kShift);
  double mass[kBins] = {0.0};
  for (int64_t i = 0; i < V; ++i) mass[float_bits(p[i]) >> kShift] += p[i];
  double cum = 0.0;
  int bin = -1;
  for (int b = kBins - 1; b >= 0; --b) {
    if (mass[b] == 0.0) continue;
    if (static_cast<float>(cum + mass[b]) >= top_p) {
      bin = b;
      break;
    }
    cum += mass[b];
  }
  if (bin < 0) return *std::min_element(p, p + V);
  scratch.clear();
  for (int64_t i = 0; i < V; ++i)
    if ((float_bits(p[i]) >> kShift) == static_cast<uint32_t>(bin)) scratch.push_back(p[i]);
  std::sort(scratch.begin(), scratch.end(), std::greater<float>());
  for (float v : scratch) {
    cum += v;
    if (static_cast<float>(cum) >= top_p) return v;
  }
  return scratch.back();  // summation order left the bin a hair short: keep all of it
}

// ---------------------------------------------------------------------------- one row

int64_t argmax_row(const float* l, int64_t V) {  // first maximum; a NaN wins (as torch.argmax)
  int64_t best = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (std::isnan(l[i])) return i;
    if (l[i] > l[best]) best = i;
  }
  return best;
}

// Inverse-CDF pick over probabilities q (V,) in vocabulary order, as the reference's
// cumsum + searchsorted(right=True) + clamp to the last kept token.
int64_t pick_row(const float* q, int64_t V, float u) {
  int64_t last_kept = 0;
  double cum = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    if (q[i] > 0.0f) last_kept = i;
    cum += q[i];
  }
  const float target = u * static_cast<float>(cum);
  cum = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    cum += q[i];
    if (static_cast<float>(cum) > target) return std::min(i, last_kept);
  }
  return last_kept;
}

// ---------------------------------------------------------------------------- op

at::Tensor sample(const at::Tensor& logits_, double temperature, int64_t top_k, double top_p,
                  const at::Tensor& uniform_) {
  const char* op = "sample";
  TORCH_CHECK(logits_.device().is_cpu(), op, ": logits must be a CPU tensor, got device ", logits_.device());
  TORCH_CHECK(logits_.scalar_type() == at::kFloat || logits_.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits_.scalar_type());
  TORCH_CHECK(logits_.dim() == 2, op, ": logits must be 2-D (B, V), got shape ", logits_.sizes());
  const int64_t B = logits_.size(0), V = logits_.size(1);
  TORCH_CHECK(V > 0, op, ": logits must have V > 0 columns, got shape ", logits_.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, op, ": temperature must be a finite number >= 0, got ",
              temperature);
  TORCH_CHECK(top_p > 0 && !std::isnan(top_p), op, ": top_p must be > 0 (>= 1 = off), got ", top_p);
  TORCH_CHECK(uniform_.device() == logits_.device(), op, ": uniform must be on logits' device ", logits_.device(),
              ", got ", uniform_.device());
  TORCH_CHECK(uniform_.scalar_type() == at::kFloat, op, ": uniform must be float32, got ", uniform_.scalar_type());
  TORCH_CHECK(uniform_.dim() == 1 && uniform_.size(0) == B, op, ": uniform must have shape (", B, "), got ",
              uniform_.sizes());
  at::Tensor out = at::empty({B}, logits_.options().dtype(at::kLong));
  if (B == 0) return out;
  int64_t* outp = out.data_ptr<int64_t>();
  if (temperature == 0.0) {
    const at::Tensor logits = logits_.contiguous();
    if (logits.scalar_type() == at::kDouble) {
      out.copy_(logits.argmax(1));
    } else {
      const float* lp = logits.data_ptr<float>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) outp[b] = argmax_row(lp + b * V, V);
      });
    }
    return out;
  }
  // (B, V) fp32, `logits.float() / temperature` by the same ATen kernel as the reference.
  at::Tensor x = at::div(logits_.to(at::kFloat), temperature).contiguous();
  if (top_k > 0 && top_k < V) {
    float* xp = x.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch;
      for (int64_t b = b0; b < b1; ++b) {
        float* xr = xp + b * V;
        const float kth = kth_largest(xr, V, top_k, scratch);
        for (int64_t i = 0; i < V; ++i)
          if (xr[i] < kth) xr[i] = -INFINITY;
      }
    });
  }
  at::Tensor probs = at::softmax(x, 1).contiguous();  // (B, V), bit-identical to the reference's
  if (top_p < 1.0) {
    float* pp = probs.data_ptr<float>();
    const float tp = static_cast<float>(top_p);  // torch compares an fp32 tensor with top_p in fp32
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch;
      for (int64_t b = b0; b < b1; ++b) {
        float* pr = pp + b * V;
        const float threshold = top_p_threshold(pr, V, tp, scratch);
        for (int64_t i = 0; i < V; ++i)
          if (pr[i] < threshold) pr[i] = 0.0f;
      }
    });
    probs = at::div(probs, probs.sum(1, /*keepdim=*/true));  // `probs / probs.sum(-1, keepdim=True)`
  }
  const float* qp = probs.data_ptr<float>();
  const at::Tensor uniform = uniform_.contiguous();
  const float* up = uniform.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) outp[b] = pick_row(qp + b * V, V, up[b]);
  });
  return out;
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("sample", &gptfast::sample); }
