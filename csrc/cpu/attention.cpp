// Causal attention on CPU: ops gptfast::causal_attention_fwd / causal_attention_bwd.
//
// Algorithm: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", arXiv:2307.08691) on 64x64 tiles. The forward walks the key
// tiles of one query tile with an online softmax (running row max m and row sum l, the output
// rescaled by exp(m_old - m_new) when the max grows), so the (T, T) score matrix never exists;
// key tiles right of the diagonal are skipped and only the diagonal tile is masked. It stores
// lse = m + log(l) per row (natural log, scaled scores, fp32) and the backward recomputes
// P = exp(S - lse) from q and k instead of storing P (O(T) memory instead of O(T^2)).
//
// Layout: before the tile loops every (b, h) slice is copied once into padded, contiguous fp32
// (fp64 for double inputs) buffers: q pre-multiplied by `scale`, k and v row-major (T_pad, D_pad)
// and k / v transposed per tile (D_pad, 64). The copy is O(T D) against O(T^2 D) of tile work, and
// it buys (a) any input strides (the model passes transposed views of (B, T, H, D)), (b) any head
// dim (zero padding to a multiple of 16 leaves every dot product unchanged), (c) a single
// micro-kernel: C (rows x N) += A (rows x K) * B (K x N), all row-major, vectorised along N (64
// keys for S = Q K^T, the head dim for P V), a few rows at a time so the accumulators stay in
// registers and each loaded B vector feeds RB FMAs. Hand-written 64x64 loops beat at::mm on tile
// views here: a BLAS call per 64x64 tile costs more in dispatch and packing than the tile itself.
//
// Parallelism (at::parallel_for): forward over (b, h, query tile); the query tiles of a head are
// ordered 0, n-1, 1, n-2, ... so that any contiguous chunk of tasks mixes short (few key tiles)
// and long rows of the causal triangle. Backward over (b, h) when there are enough heads to share
// out (each head owns its dq rows: no races), otherwise over (b, h, key tile) with one dq
// accumulator per thread, summed at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "simd.h"


namespace gptfast {
namespace {

constexpr int64_t kTile = 64;   // query and key tile (BQ = BK)
constexpr int64_t kLanes = 16;  // columns per micro-kernel block; head dims are padded to a multiple
constexpr int64_t kMaxHeadDim = 256;  // buffers only; nothing in the kernels depends on it

// Row max of 64 floats (m0 included), as a tree of vector maxes.
GPTFAST_INLINE float row_max64(const float* row, float m0) {
  Vf v[8];
  for (int j = 0; j < 8; ++j) v[j] = vload(row + 8 * j);
  for (int w = 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) v[j] = v[j] > v[j + w] ? v[j] : v[j + w];
  float mx = m0;
  for (int j = 0; j < 8; ++j) mx = std::max(mx, v[0][j]);
  return mx;
}

// row[j] = exp(row[j] - sub) for 64 entries; returns their sum.
GPTFAST_INLINE float exp_row64(float* row, float sub) {
  Vf sum = Vf{};
  for (int j = 0; j < 8; ++j) {
    const Vf p = vexp(vload(row + 8 * j) - sub);
    vstore(row + 8 * j, p);
    sum += p;
  }
  float tot = 0;
  for (int j = 0; j < 8; ++j) tot += sum[j];
  return tot;
}

// The same for double (gradcheck only): scalar.
GPTFAST_INLINE double row_max64(const double* row, double m0) {
  double mx = m0;
  for (int j = 0; j < kTile; ++j) mx = std::max(mx, row[j]);
  return mx;
}

GPTFAST_INLINE double exp_row64(double* row, double sub) {
  double tot = 0;
  for (int j = 0; j < kTile; ++j) {
    row[j] = std::exp(row[j] - sub);
    tot += row[j];
  }
  return tot;
}

GPTFAST_INLINE float exp_scalar(float x) { return fast_exp(x); }
GPTFAST_INLINE double exp_scalar(double x) { return std::exp(x); }

// C[r, 0:16] (+)= sum_k A[r, k] * B[k, 0:16] for RB rows. With float, 16 lanes = two ymm, so
// RB = 6 keeps 12 of AVX2's 16 ymm registers accumulating; each k loads two B vectors and one
// broadcast per row, and the loop body is 12 FMAs (checked in the assembly: no spills).
template <typename T, int RB>
GPTFAST_INLINE void gemm_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                               int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int NV = kLanes / Vec<T>::kN;
  constexpr int W = Vec<T>::kN;
  V c[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = accumulate ? vload(C + r * ldc + j * W) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(B + k * ldb + j * W);
    for (int r = 0; r < RB; ++r) {
      const T a = A[r * lda + k];
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) vstore(C + r * ldc + j * W, c[r][j]);
}

constexpr int kRowBlock = 6;

// C (M x N) (+)= A (M x K) B (K x N), row-major, N a multiple of 16.
template <typename T>
GPTFAST_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                         int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t n = 0; n < N; n += kLanes) {
    int64_t r = 0;
    for (; r + kRowBlock <= M; r += kRowBlock)
      gemm_block<T, kRowBlock>(K, A + r * lda, lda, B + n, ldb, C + r * ldc + n, ldc, accumulate);
    for (; r + 2 <= M; r += 2) gemm_block<T, 2>(K, A + r * lda, lda, B + n, ldb, C + r * ldc + n, ldc, accumulate);
    for (; r < M; ++r) gemm_block<T, 1>(K, A + r * lda, lda, B + n, ldb, C + r * ldc + n, ldc, accumulate);
  }
}

// dst (64 x 64) = src^T, both row-major with leading dim kTile.
template <typename T>
GPTFAST_INLINE void transpose_tile(const T* src, T* dst) {
  for (int64_t i = 0; i < kTile; i += 8)
    for (int64_t j = 0; j < kTile; j += 8)
      for (int64_t a = i; a < i + 8; ++a)
        for (int64_t b = j; b < j + 8; ++b) dst[b * kTile + a] = src[a * kTile + b];
}

// An uninitialised heap buffer (std::vector would zero-fill megabytes that are overwritten anyway).
template <typename T>
struct Buf {
  std::unique_ptr<T[]> p;
  explicit Buf(int64_t n = 0) : p(n > 0 ? new T[n] : nullptr) {}
  void resize(int64_t n) { p.reset(new T[n]); }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
};

// Sizes shared by forward and backward.
struct Dims {
  int64_t B, H, T, D;
  int64_t Dp;  // D padded to a multiple of 16
  int64_t nt;  // number of 64-row tiles
  int64_t Tp;  // nt * 64
};

Dims make_dims(const at::Tensor& q) {
  Dims d;
  d.B = q.size(0);
  d.H = q.size(1);
  d.T = q.size(2);
  d.D = q.size(3);
  d.Dp = (d.D + kLanes - 1) / kLanes * kLanes;
  d.nt = (d.T + kTile - 1) / kTile;
  d.Tp = d.nt * kTile;
  return d;
}

// Copies the (T, D) slice `src` (strides sT, sD) of one head into dst (Tp, Dp) row-major, times
// `mul`, zero padded. Works on the source dtype S (the op's dtype) and the compute dtype T.
template <typename T, typename S>
void pack_rows(const S* src, int64_t sT, int64_t sD, const Dims& d, T mul, T* dst) {
  for (int64_t t = 0; t < d.Tp; ++t) {
    T* out = dst + t * d.Dp;
    if (t < d.T) {
      const S* in = src + t * sT;
      for (int64_t c = 0; c < d.D; ++c) out[c] = static_cast<T>(in[c * sD]) * mul;
      for (int64_t c = d.D; c < d.Dp; ++c) out[c] = T(0);
    } else {
      for (int64_t c = 0; c < d.Dp; ++c) out[c] = T(0);
    }
  }
}

// rows (Tp, Dp) -> per tile transposed (nt, Dp, 64).
template <typename T>
void pack_transposed(const T* rows, const Dims& d, T* dst) {
  for (int64_t tile = 0; tile < d.nt; ++tile) {
    T* out = dst + tile * d.Dp * kTile;
    const T* in = rows + tile * kTile * d.Dp;
    for (int64_t j = 0; j < kTile; ++j)
      for (int64_t c = 0; c < d.Dp; ++c) out[c * kTile + j] = in[j * d.Dp + c];
  }
}

// Query tile order within a head: 0, n-1, 1, n-2, ... (balances the causal triangle, see top).
GPTFAST_INLINE int64_t interleaved(int64_t i, int64_t n) {
  return (i % 2 == 0) ? i / 2 : n - 1 - i / 2;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, T, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim D must be in 1..",
              kMaxHeadDim, ", got D=", q.size(3), " (q shape ", q.sizes(), ")");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                t.sizes());
  }
}

// ------------------------------------------------------------------------------------ forward

template <typename T, typename S>
void attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                        at::Tensor& out, at::Tensor& lse) {
  const Dims d = make_dims(q);
  const int64_t BH = d.B * d.H;
  const int64_t head = d.Tp * d.Dp;  // elements of one packed (Tp, Dp) slice
  // Packed copies: qs = q * scale, kt = k transposed per tile, vr = v row-major.
  Buf<T> qs(BH * head), kt(BH * head), vr(BH * head);
  const S* qp = q.data_ptr<S>();
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    Buf<T> krow(head);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      pack_rows<T, S>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), q.stride(3), d, T(scale),
                      qs.data() + bh * head);
      pack_rows<T, S>(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), k.stride(3), d, T(1),
                      krow.data());
      pack_transposed<T>(krow.data(), d, kt.data() + bh * head);
      pack_rows<T, S>(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), v.stride(3), d, T(1),
                      vr.data() + bh * head);
    }
  });

  S* op = out.data_ptr<S>();  // (B, H, T, D) contiguous
  float* lp = lse.data_ptr<float>();  // (B, H, T)
  const int64_t Dp = d.Dp;
  at::parallel_for(0, BH * d.nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> s(kTile * kTile), o(kTile * Dp), m(kTile), l(kTile);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / d.nt, qt = interleaved(task % d.nt, d.nt);
      const T* qtile = qs.data() + bh * head + qt * kTile * Dp;
      std::fill(o.begin(), o.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t kt_i = 0; kt_i <= qt; ++kt_i) {  // tiles right of the diagonal: fully masked
        // S = (q * scale) K^T for this tile: (64, 64).
        gemm<T>(kTile, kTile, Dp, qtile, Dp, kt.data() + bh * head + kt_i * Dp * kTile, kTile, s.data(),
                kTile, false);
        if (kt_i == qt) {  // the diagonal tile: key j > query i is masked (padded keys included)
          for (int64_t i = 0; i < kTile; ++i)
            for (int64_t j = i + 1; j < kTile; ++j) s[i * kTile + j] = -std::numeric_limits<T>::infinity();
        }
        for (int64_t i = 0; i < kTile; ++i) {
          T* srow = s.data() + i * kTile;
          const T mx = row_max64(srow, m[i]);
          const T sum = exp_row64(srow, mx);
          if (mx != m[i]) {  // the row max grew: rescale what was accumulated so far
            const T alpha = exp_scalar(m[i] - mx);  // 0 on the first tile (m = -inf)
            T* orow = o.data() + i * Dp;
#pragma omp simd
            for (int64_t c = 0; c < Dp; ++c) orow[c] *= alpha;
            l[i] *= alpha;
            m[i] = mx;
          }
          l[i] += sum;
        }
        // O += P V_tile: (64, 64) x (64, Dp).
        gemm<T>(kTile, Dp, kTile, s.data(), kTile, vr.data() + bh * head + kt_i * kTile * Dp, Dp, o.data(),
                Dp, true);
      }
      const int64_t rows = std::min(kTile, d.T - qt * kTile);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = qt * kTile + i;
        const T inv = T(1) / l[i];
        S* orow = op + (bh * d.T + t) * d.D;
        for (int64_t c = 0; c < d.D; ++c) orow[c] = static_cast<S>(o[i * Dp + c] * inv);
        lp[bh * d.T + t] = static_cast<float>(m[i] + std::log(l[i]));
      }
    }
  });
}

// The fp32 instance is the hot one: compiled once per ISA for distributable builds (simd.h).
GPTFAST_CLONES void attention_fwd_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      double scale, at::Tensor& out, at::Tensor& lse) {
  attention_fwd_impl<float, float>(q, k, v, scale, out, lse);
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  check_qkv("causal_attention_fwd", q, k, v);
  TORCH_CHECK(std::isfinite(scale), "causal_attention_fwd: scale must be finite, got ", scale);
  auto out = at::empty(q.sizes(), q.options());                                  // (B, H, T, D)
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, H, T)
  if (q.numel() == 0) return {out, lse};
  if (q.scalar_type() == at::kFloat) {
    attention_fwd_f32(q, k, v, scale, out, lse);
  } else {
    attention_fwd_impl<double, double>(q, k, v, scale, out, lse);
  }
  return {out, lse};
}

// ------------------------------------------------------------------------------------ backward

// Buffers of the backward, packed per head as in the forward (see the top comment).
template <typename T>
struct BwdPacked {
  Buf<T> qs, kr, kt, vt, dor, delta, lse;
};

// dV_j += P^T dO_i, dP = dO_i V_j^T, dS = P o (dP - delta_i), dK_j += dS^T (q_i * scale),
// dQacc_i += dS K_j (dQ = scale * dQacc). One key tile `ktile` against query tiles ktile..nt-1.
template <typename T>
void bwd_key_tile(const BwdPacked<T>& pk, const Dims& d, int64_t bh, int64_t ktile, T* dq_acc, T* dk_acc,
                  T* dv_acc, T* s, T* st, T* dp) {
  const int64_t Dp = d.Dp, head = d.Tp * Dp;
  const T* kt = pk.kt.data() + bh * head + ktile * Dp * kTile;  // (Dp, 64)
  const T* vt = pk.vt.data() + bh * head + ktile * Dp * kTile;  // (Dp, 64)
  const T* kr = pk.kr.data() + bh * head + ktile * kTile * Dp;  // (64, Dp)
  std::fill(dk_acc, dk_acc + kTile * Dp, T(0));
  std::fill(dv_acc, dv_acc + kTile * Dp, T(0));
  for (int64_t qt = ktile; qt < d.nt; ++qt) {
    const T* qs = pk.qs.data() + bh * head + qt * kTile * Dp;    // (64, Dp)
    const T* dor = pk.dor.data() + bh * head + qt * kTile * Dp;  // (64, Dp)
    const T* lse = pk.lse.data() + bh * d.Tp + qt * kTile;        // (64,), +inf on padded rows
    const T* delta = pk.delta.data() + bh * d.Tp + qt * kTile;    // (64,)
    gemm<T>(kTile, kTile, Dp, qs, Dp, kt, kTile, s, kTile, false);  // S
    if (qt == ktile) {  // the diagonal tile: key j > query i is masked
      for (int64_t i = 0; i < kTile; ++i)
        for (int64_t j = i + 1; j < kTile; ++j) s[i * kTile + j] = -std::numeric_limits<T>::infinity();
    }
    for (int64_t i = 0; i < kTile; ++i) exp_row64(s + i * kTile, lse[i]);  // P = exp(S - lse)
    transpose_tile<T>(s, st);
    gemm<T>(kTile, Dp, kTile, st, kTile, dor, Dp, dv_acc, Dp, true);  // dV += P^T dO
    gemm<T>(kTile, kTile, Dp, dor, Dp, vt, kTile, dp, kTile, false);  // dP = dO V^T
    for (int64_t i = 0; i < kTile; ++i) {
      T* prow = s + i * kTile;
      const T* dprow = dp + i * kTile;
      const T di = delta[i];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) prow[j] = prow[j] * (dprow[j] - di);  // s now holds dS
    }
    transpose_tile<T>(s, st);
    gemm<T>(kTile, Dp, kTile, st, kTile, qs, Dp, dk_acc, Dp, true);                     // dK += dS^T qs
    gemm<T>(kTile, Dp, kTile, s, kTile, kr, Dp, dq_acc + qt * kTile * Dp, Dp, true);  // dQacc += dS K
  }
}

template <typename T, typename S>
void attention_bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv) {
  const Dims d = make_dims(q);
  const int64_t BH = d.B * d.H, Dp = d.Dp, head = d.Tp * Dp;
  BwdPacked<T> pk;
  pk.qs.resize(BH * head);
  pk.kr.resize(BH * head);
  pk.kt.resize(BH * head);
  pk.vt.resize(BH * head);
  pk.dor.resize(BH * head);
  pk.delta.resize(BH * d.Tp);
  pk.lse.resize(BH * d.Tp);
  const float* lp = lse.data_ptr<float>();  // (B, H, T) with arbitrary strides
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    Buf<T> tmp(head), orow(head);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      auto base = [&](const at::Tensor& t) { return t.data_ptr<S>() + b * t.stride(0) + h * t.stride(1); };
      pack_rows<T, S>(base(q), q.stride(2), q.stride(3), d, T(scale), pk.qs.data() + bh * head);
      pack_rows<T, S>(base(k), k.stride(2), k.stride(3), d, T(1), pk.kr.data() + bh * head);
      pack_transposed<T>(pk.kr.data() + bh * head, d, pk.kt.data() + bh * head);
      pack_rows<T, S>(base(v), v.stride(2), v.stride(3), d, T(1), tmp.data());
      pack_transposed<T>(tmp.data(), d, pk.vt.data() + bh * head);
      T* dor = pk.dor.data() + bh * head;
      pack_rows<T, S>(base(dout), dout.stride(2), dout.stride(3), d, T(1), dor);
      pack_rows<T, S>(base(out), out.stride(2), out.stride(3), d, T(1), orow.data());
      for (int64_t t = 0; t < d.Tp; ++t) {
        T acc = 0;  // delta_t = rowsum(dO o O), the softmax-backward correction
        for (int64_t c = 0; c < Dp; ++c) acc += dor[t * Dp + c] * orow.data()[t * Dp + c];
        pk.delta.data()[bh * d.Tp + t] = acc;
        pk.lse.data()[bh * d.Tp + t] = t < d.T ? static_cast<T>(lp[b * lse.stride(0) + h * lse.stride(1) + t * lse.stride(2)])
                                        : std::numeric_limits<T>::infinity();  // P = 0 on padded rows
      }
    }
  });

  // Enough heads to give every thread several: one task per head, dq rows owned by it. Otherwise
  // one task per (head, key tile) and one dq accumulator per thread (summed below).
  const int64_t nthreads = at::get_num_threads();
  const bool per_head = BH >= 4 * nthreads || d.nt == 1;
  const int64_t ncopies = per_head ? 1 : nthreads;
  std::vector<T> dq_acc(ncopies * BH * head, T(0));
  Buf<T> dk_all(BH * head), dv_all(BH * head);
  const int64_t ntasks = per_head ? BH : BH * d.nt;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> s(kTile * kTile), st(kTile * kTile), dp(kTile * kTile);
    const int64_t copy = per_head ? 0 : at::get_thread_num();
    for (int64_t task = t0; task < t1; ++task) {
      if (per_head) {
        for (int64_t kt = 0; kt < d.nt; ++kt)
          bwd_key_tile<T>(pk, d, task, kt, dq_acc.data() + task * head, dk_all.data() + task * head + kt * kTile * Dp,
                          dv_all.data() + task * head + kt * kTile * Dp, s.data(), st.data(), dp.data());
      } else {
        const int64_t bh = task / d.nt, kt = interleaved(task % d.nt, d.nt);
        bwd_key_tile<T>(pk, d, bh, kt, dq_acc.data() + (copy * BH + bh) * head,
                        dk_all.data() + bh * head + kt * kTile * Dp, dv_all.data() + bh * head + kt * kTile * Dp,
                        s.data(), st.data(), dp.data());
      }
    }
  });

  // Unpack to the (B, H, T, D) contiguous outputs; dq = scale * sum of its accumulators.
  S* dqp = dq.data_ptr<S>();
  S* dkp = dk.data_ptr<S>();
  S* dvp = dv.data_ptr<S>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bh = b0; bh < b1; ++bh)
      for (int64_t t = 0; t < d.T; ++t)
        for (int64_t c = 0; c < d.D; ++c) {
          const int64_t src = bh * head + t * Dp + c, dst = (bh * d.T + t) * d.D + c;
          T acc = 0;
          for (int64_t cp = 0; cp < ncopies; ++cp) acc += dq_acc[cp * BH * head + src];
          dqp[dst] = static_cast<S>(acc * T(scale));
          dkp[dst] = static_cast<S>(dk_all.data()[src]);
          dvp[dst] = static_cast<S>(dv_all.data()[src]);
        }
  });
}

GPTFAST_CLONES void attention_bwd_f32(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  attention_bwd_impl<float, float>(dout, q, k, v, out, lse, scale, dq, dk, dv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& v,
                                                                        const at::Tensor& out, const at::Tensor& lse,
                                                                        double scale) {
  const char* op = "causal_attention_bwd";
  check_qkv(op, q, k, v);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK(lse.device().is_cpu(), op, ": lse must be a CPU tensor, got device ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must have shape (", q.size(0), ", ", q.size(1), ", ", q.size(2), ") (B, H, T), got ",
              lse.sizes());
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(q.sizes(), q.options());
  auto dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  if (q.scalar_type() == at::kFloat) {
    attention_bwd_f32(dout, q, k, v, out, lse, scale, dq, dk, dv);
  } else {
    attention_bwd_impl<double, double>(dout, q, k, v, out, lse, scale, dq, dk, dv);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("causal_attention_fwd", &gptfast::causal_attention_fwd_cpu);
  m.impl("causal_attention_bwd", &gptfast::causal_attention_bwd_cpu);
}
