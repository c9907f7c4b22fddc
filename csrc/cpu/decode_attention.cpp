// Decode attention on CPU: op gptfast::decode_attention.
//
// A few new queries (Tq, usually 1) per sequence against a preallocated KV cache with per-sequence
// valid lengths. The work is one pass over the valid part of the caches, memory bound, and with
// B * H = 12 heads of one sequence there is little to share out, so the cache length is split
// as well (split-K, "Flash-Decoding", Dao, Haziza, Massa, Sizov 2023,
// https://crfm.stanford.edu/2023/10/12/flashdecoding.html): task (b, h, split) computes, for its
// range of cache positions, the row max m, the sum l of exp(s - m) and o = sum exp(s - m) v; a
// second pass combines the splits with log-sum-exp weights exp(m_split - max m). Inside a split
// the scores of a chunk of positions are computed first (one dot product per position and
// query), then exponentiated, then accumulated into o: each k and v row is read once per task.
//
// Semantics (gptfast/ops/reference.py): query i of row b sits at position L - Tq + i
// (L = cache_lens[b]) and sees cache positions 0 .. L - Tq + i. Positions >= L are never read, so
// garbage (even NaN / inf) there cannot leak into the result.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "simd.h"

namespace gptfast {
namespace {

constexpr int64_t kChunk = 64;        // positions scored at once (scores stay in L1)
constexpr int64_t kMinSplit = 128;    // fewest positions worth a task of their own

template <typename T>
GPTFAST_INLINE T exp_t(T x);
template <>
GPTFAST_INLINE float exp_t<float>(float x) {
  return fast_exp(x);
}
template <>
GPTFAST_INLINE double exp_t<double>(double x) {
  return std::exp(x);
}

// Partial result of positions [p0, p1) of one (b, h): per query m, l and o (D values).
template <typename T, typename S>
GPTFAST_INLINE void decode_range(const S* q, int64_t sqt,  // query rows, (Tq, D), inner stride 1
                                 const S* k, int64_t skt,  // cache rows, (T_max, D), inner stride 1
                                 const S* v, int64_t svt, int64_t Tq, int64_t D, int64_t first, int64_t p0,
                                 int64_t p1, T scale, T* m, T* l, T* o /* (Tq, D) */, T* s /* (Tq, kChunk) */,
                                 T* qf /* (Tq, D) */) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t t = 0; t < Tq; ++t) {
    m[t] = ninf;
    l[t] = T(0);
    for (int64_t c = 0; c < D; ++c) {
      o[t * D + c] = T(0);
      qf[t * D + c] = static_cast<T>(q[t * sqt + c]) * scale;
    }
  }
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t c1 = std::min(p1, c0 + kChunk), n = c1 - c0;
    // Scores; query t sees positions <= first + t, the rest of the chunk is -inf for it.
    for (int64_t j = 0; j < n; ++j) {
      const S* kr = k + (c0 + j) * skt;
      for (int64_t t = 0; t < Tq; ++t) {
        if (c0 + j > first + t) {
          s[t * kChunk + j] = ninf;
          continue;
        }
        const T* qr = qf + t * D;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < D; ++c) acc += qr[c] * static_cast<T>(kr[c]);
        s[t * kChunk + j] = acc;
      }
    }
    // Online softmax over the chunk.
    for (int64_t t = 0; t < Tq; ++t) {
      T* sr = s + t * kChunk;
      T mx = m[t];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
      if (mx == ninf) continue;  // nothing visible to this query in the chunk
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const T p = exp_t<T>(sr[j] - mx);
        sr[j] = p;
        sum += p;
      }
      if (mx != m[t]) {
        const T alpha = exp_t<T>(m[t] - mx);  // 0 the first time (m = -inf)
        for (int64_t c = 0; c < D; ++c) o[t * D + c] *= alpha;
        l[t] *= alpha;
        m[t] = mx;
      }
      l[t] += sum;
    }
    // o += p v. Positions a query cannot see were skipped above with p = exp(-inf) = 0 only if its
    // max was finite; queries with an all -inf chunk must not read their stale scores.
    for (int64_t j = 0; j < n; ++j) {
      const S* vr = v + (c0 + j) * svt;
      for (int64_t t = 0; t < Tq; ++t) {
        if (c0 + j > first + t) continue;  // not visible (also keeps 0 * inf out of o)
        const T p = s[t * kChunk + j];
        T* orow = o + t * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) orow[c] += p * static_cast<T>(vr[c]);
      }
    }
  }
}

// fp32 with D a multiple of 8 (every GPT-2 size: D = 64), the engine's path: the same partial
// result as decode_range, written with 8-float vectors (simd.h). Two changes matter at batch 1,
// where the 12 heads' caches (6 MB) stay in L3 and the kernel is compute bound:
// - scores four positions at a time: four independent dot-product chains instead of one, whose
//   4-cycle add latency made each score cost ~5x its FMAs;
// - o += p v with o held in registers over a whole chunk, 64 columns at a time (8 vectors),
//   instead of a load and a store of o per position.
GPTFAST_INLINE void decode_range_f32v(const float* q, int64_t sqt, const float* k, int64_t skt, const float* v,
                                      int64_t svt, int64_t Tq, int64_t D, int64_t first, int64_t p0, int64_t p1,
                                      float scale, float* m, float* l, float* o, float* s, float* qf) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < Tq; ++t) {
    m[t] = ninf;
    l[t] = 0.0f;
    for (int64_t c = 0; c < D; ++c) {
      o[t * D + c] = 0.0f;
      qf[t * D + c] = q[t * sqt + c] * scale;
    }
  }
  for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
    const int64_t n = std::min(p1, c0 + kChunk) - c0;
    for (int64_t t = 0; t < Tq; ++t) {
      // Query t sees positions <= first + t: the first nv of the chunk.
      const int64_t nv = std::max<int64_t>(0, std::min(n, first + t - c0 + 1));
      if (nv == 0) continue;
      const float* qr = qf + t * D;
      float* sr = s + t * kChunk;
      int64_t j = 0;
      for (; j + 4 <= nv; j += 4) {
        const float* k0 = k + (c0 + j) * skt;
        Vf a0 = Vf{}, a1 = Vf{}, a2 = Vf{}, a3 = Vf{};
        for (int64_t c = 0; c < D; c += 8) {
          const Vf qv = vload(qr + c);
          a0 += qv * vload(k0 + c);
          a1 += qv * vload(k0 + skt + c);
          a2 += qv * vload(k0 + 2 * skt + c);
          a3 += qv * vload(k0 + 3 * skt + c);
        }
        sr[j] = hsum(a0);
        sr[j + 1] = hsum(a1);
        sr[j + 2] = hsum(a2);
        sr[j + 3] = hsum(a3);
      }
      for (; j < nv; ++j) {
        const float* kr = k + (c0 + j) * skt;
        Vf a = Vf{};
        for (int64_t c = 0; c < D; c += 8) a += vload(qr + c) * vload(kr + c);
        sr[j] = hsum(a);
      }
      // Online softmax over the visible scores.
      float mx = m[t];
      for (j = 0; j < nv; ++j) mx = std::max(mx, sr[j]);
      if (mx == ninf) continue;  // only -inf scores so far (infinite inputs): as decode_range
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (j = 0; j < nv; ++j) {
        const float pj = fast_exp(sr[j] - mx);
        sr[j] = pj;
        sum += pj;
      }
      float* orow = o + t * D;
      if (mx != m[t]) {
        const float alpha = fast_exp(m[t] - mx);  // 0 the first time (m = -inf)
        for (int64_t c = 0; c < D; ++c) orow[c] *= alpha;
        l[t] *= alpha;
        m[t] = mx;
      }
      l[t] += sum;
      // o += p v, 64 columns (8 registers) at a time, then the rest 8 at a time.
      int64_t cb = 0;
      for (; cb + 64 <= D; cb += 64) {
        Vf acc[8];
        for (int u = 0; u < 8; ++u) acc[u] = vload(orow + cb + 8 * u);
        for (j = 0; j < nv; ++j) {
          const float* vr = v + (c0 + j) * svt + cb;
          const float pj = sr[j];
          for (int u = 0; u < 8; ++u) acc[u] += pj * vload(vr + 8 * u);
        }
        for (int u = 0; u < 8; ++u) vstore(orow + cb + 8 * u, acc[u]);
      }
      for (; cb < D; cb += 8) {
        Vf acc = vload(orow + cb);
        for (j = 0; j < nv; ++j) acc += sr[j] * vload(v + (c0 + j) * svt + cb);
        vstore(orow + cb, acc);
      }
    }
  }
}

template <typename T, typename S>
void decode_impl(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int64_t* lens, double scale,
                 at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), BH = B * H;
  int64_t L_max = 0;
  for (int64_t b = 0; b < B; ++b) L_max = std::max(L_max, lens[b]);
  // Splits per head: enough tasks to keep every thread busy (x4 for balance), none shorter than
  // kMinSplit positions (a task has a fixed cost: the combine pass and the partial results).
  const int64_t nthreads = at::get_num_threads();
  const int64_t want = (4 * nthreads + BH - 1) / BH;
  const int64_t nsplit = std::max<int64_t>(1, std::min(want, (L_max + kMinSplit - 1) / kMinSplit));
  const int64_t span = (L_max + nsplit - 1) / nsplit;
  // Partials: m, l (BH, nsplit, Tq) and o (BH, nsplit, Tq, D).
  std::vector<T> pm(BH * nsplit * Tq), pl(BH * nsplit * Tq), po(BH * nsplit * Tq * D);
  const S* qp = q.data_ptr<S>();
  const S* kp = kc.data_ptr<S>();
  const S* vp = vc.data_ptr<S>();
  S* op = out.data_ptr<S>();  // (B, H, Tq, D) contiguous
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, BH * nsplit, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> s(Tq * kChunk), qf(Tq * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nsplit, sp = task % nsplit, b = bh / H, h = bh % H;
      const int64_t L = lens[b];
      const int64_t p0 = std::min(L, sp * span), p1 = std::min(L, p0 + span);
      T* m = pm.data() + task * Tq;
      T* l = pl.data() + task * Tq;
      T* o = po.data() + task * Tq * D;
      const S* qb = qp + b * q.stride(0) + h * q.stride(1);
      const S* kb = kp + b * kc.stride(0) + h * kc.stride(1);
      const S* vb = vp + b * vc.stride(0) + h * vc.stride(1);
      if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
        if (D % 8 == 0) {
          decode_range_f32v(qb, q.stride(2), kb, kc.stride(2), vb, vc.stride(2), Tq, D, L - Tq, p0, p1, sc, m, l, o,
                            s.data(), qf.data());
          continue;
        }
      }
      decode_range<T, S>(qb, q.stride(2), kb, kc.stride(2), vb, vc.stride(2), Tq, D, L - Tq, p0, p1, sc, m, l, o,
                         s.data(), qf.data());
    }
  });
  // Combine the splits: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s.
  at::parallel_for(0, BH * Tq, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / Tq, t = r % Tq;
      T M = -std::numeric_limits<T>::infinity();
      for (int64_t sp = 0; sp < nsplit; ++sp) M = std::max(M, pm[(bh * nsplit + sp) * Tq + t]);
      T denom = 0;
      S* orow = op + r * D;
      std::vector<T> acc(D, T(0));
      for (int64_t sp = 0; sp < nsplit; ++sp) {
        const int64_t idx = (bh * nsplit + sp) * Tq + t;
        if (pm[idx] == -std::numeric_limits<T>::infinity()) continue;  // split saw nothing
        const T w = exp_t<T>(pm[idx] - M);
        denom += w * pl[idx];
        const T* o = po.data() + idx * D;
        for (int64_t c = 0; c < D; ++c) acc[c] += w * o[c];
      }
      const T inv = T(1) / denom;
      for (int64_t c = 0; c < D; ++c) orow[c] = static_cast<S>(acc[c] * inv);
    }
  });
}

GPTFAST_CLONES void decode_f32(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const int64_t* lens,
                               double scale, at::Tensor& out) {
  decode_impl<float, float>(q, kc, vc, lens, scale, out);
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& cache_lens, double scale) {
  const char* op = "decode_attention";
  TORCH_CHECK(q_in.device().is_cpu(), op, ": q must be a CPU tensor, got device ", q_in.device());
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be 4-D (B, H, Tq, D), got shape ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kDouble, op,
              ": q must be float32 or float64, got ", q_in.scalar_type());
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_in}, {"v_cache", v_in}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == q_in.scalar_type(), op, ": ", name, " must have q's dtype ", q_in.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(3) == D, op, ": ", name,
                " must have shape (", B, ", ", H, ", T_max, ", D, ") to match q ", q_in.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), op, ": k_cache and v_cache must have the same shape, got ", k_in.sizes(),
              " and ", v_in.sizes());
  const int64_t T_max = k_in.size(2);
  TORCH_CHECK(Tq >= 1 && Tq <= T_max, op, ": q must hold 1..T_max=", T_max, " query tokens, got Tq=", Tq);
  TORCH_CHECK(D >= 1, op, ": head dim D must be >= 1, got shape ", q_in.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(cache_lens.device().is_cpu(), op, ": cache_lens must be a CPU tensor, got device ", cache_lens.device());
  TORCH_CHECK(cache_lens.scalar_type() == at::kLong, op, ": cache_lens must be int64, got ", cache_lens.scalar_type());
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.size(0) == B, op, ": cache_lens must have shape (", B, "), got ",
              cache_lens.sizes());
  auto lens_t = cache_lens.contiguous();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= Tq && lens[b] <= T_max, op, ": cache_lens[", b, "] must be in [Tq=", Tq, ", T_max=", T_max,
                "], got ", lens[b]);
  // The kernel reads rows with inner stride 1 (any other strides are fine): the model's caches are.
  auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  auto kc = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto vc = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  auto out = at::empty(q.sizes(), q.options());  // (B, H, Tq, D)
  if (out.numel() == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    decode_f32(q, kc, vc, lens, scale, out);
  } else {
    decode_impl<double, double>(q, kc, vc, lens, scale, out);
  }
  return out;
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("decode_attention", &gptfast::decode_attention_cpu); }
