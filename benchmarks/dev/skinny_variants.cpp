// Development variants of gptfast::skinny_linear (llm.c dev/cuda style): numbered kernels, each
// checked against an fp64 reference and timed interleaved against variant 0 (the kernel that was
// in csrc/cpu/skinny_linear.cpp before the AVX-512 tiles) by benchmarks/dev/skinny_variants.py.
// Only the winner goes into the product. Built by that script (JIT, -march=native).
//
// v0: the previous product kernel (8-lane GCC vectors, 4 weight rows x 2 x rows, prefetch 16 rows).
// v5: avx512_bf16 vdpbf16ps with x rounded to bf16 (changes the arithmetic; bf16 weights only).
// v3 / v4: v1 with the prefetch hint T1 (into L2) / NTA instead of T0.
// v1: AVX-512 (16 lanes), NR weight rows x MB x rows per tile held in zmm accumulators, masked
//     K tail, prefetch `pf` rows ahead (first pass over a tile only); NR, MB, pf chosen at run time
//     from the instantiated set.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace sv {

// ------------------------------------------------------------------ v0: copy of the old kernel
namespace v0 {
GPTFAST_INLINE float wload(float v) { return v; }
GPTFAST_INLINE float wload(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
GPTFAST_INLINE gptfast::Vf vload_w(const float* p) { return gptfast::vload(p); }
GPTFAST_INLINE gptfast::Vf vload_w(const uint16_t* p) {
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<gptfast::Vf>(_mm256_castsi256_ps(u));
}
using gptfast::Vf;
using gptfast::vload;
using gptfast::hsum;
constexpr int64_t PF = 16;
template <int MB, typename W>
GPTFAST_INLINE void tile_4xMB(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw,
                              int64_t K, float* o) {
  constexpr int64_t kLine = 64 / sizeof(W);
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
    for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (PF + j) * ldw + k, 0, 3);
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
template <typename W>
void range(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
           int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[8];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nb = std::min<int64_t>(4, n1 - n);
    const W* wt = w + n * ldw;
    if (nb < 4) {
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
}  // namespace v0

// ------------------------------------------------------------------ v1: AVX-512 NR x MB tiles
// Prefetch hint of v1 (variant 1: T0 into L1, 3: T1 into L2, 4: NTA), set before each run.
static int g_hint = 0;
namespace v1 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

GPTFAST_INLINE __m512 w16(const float* p) { return _mm512_loadu_ps(p); }
GPTFAST_INLINE __m512 w16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
GPTFAST_INLINE __m512 w16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
GPTFAST_INLINE __m512 w16m(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <int NR, int MB, typename W, bool kMask>
GPTFAST_INLINE void step(__m512 (&acc)[MB][NR], const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
                         __mmask16 mask) {
  __m512 u[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) u[j] = kMask ? w16m(w + j * ldw + k, mask) : w16(w + j * ldw + k);
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r) {
    const __m512 p = kMask ? _mm512_maskz_loadu_ps(mask, x + r * ldx + k) : _mm512_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(p, u[j], acc[r][j]);
  }
}

template <int NR, int MB, bool kPf, typename W>
GPTFAST_INLINE void tile(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw, int64_t K,
                         int64_t pf, float* o) {
  constexpr int64_t kLine = 64 / sizeof(W);
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    if constexpr (kPf) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const char* a = reinterpret_cast<const char*>(w + (pf + j) * ldw + k);
        if (g_hint == 1)
          _mm_prefetch(a, _MM_HINT_T1);
        else if (g_hint == 2)
          _mm_prefetch(a, _MM_HINT_NTA);
        else
          _mm_prefetch(a, _MM_HINT_T0);
      }
    }
#pragma GCC unroll 2
    for (int64_t kk = k; kk < k + kLine; kk += 16) step<NR, MB, W, false>(acc, x, ldx, w, ldw, kk, 0);
  }
  for (; k + 16 <= K; k += 16) step<NR, MB, W, false>(acc, x, ldx, w, ldw, k, 0);
  if (k < K) step<NR, MB, W, true>(acc, x, ldx, w, ldw, k, __mmask16((1u << (K - k)) - 1u));
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}

// Rows [m, m + mb) of x against NR weight rows; mb <= MB picked at run time.
template <int NR, int MB, typename W>
GPTFAST_INLINE void tile_mb(int64_t mb, bool first, const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                            int64_t pf, float* o) {
  if (mb == MB) {
    if (first)
      tile<NR, MB, true, W>(x, ldx, w, ldw, K, pf, o);
    else
      tile<NR, MB, false, W>(x, ldx, w, ldw, K, pf, o);
  } else if constexpr (MB > 1) {
    tile_mb<NR, MB - 1, W>(mb, first, x, ldx, w, ldw, K, pf, o);
  }
}

template <int NR, int MB, typename W>
void range(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
           int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const W* wt = w + n * ldw;
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_mb<NR, MB, W>(mb, m == 0, x + m * ldx, ldx, wt, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    const W* wt = w + n * ldw;
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_mb<1, MB, W>(mb, m == 0, x + m * ldx, ldx, wt, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}
// v2 (bf16 weights only): one 512-bit load = 32 bf16; the even elements widen with a 32-bit shift
// left, the odd ones with a mask of the high halves (no shuffle), against an x whose 32-element
// chunks were deinterleaved beforehand (16 even elements, then 16 odd ones; zero-padded to a
// multiple of 32). Same products, fp32 accumulation, another summation order.
template <int NR, int MB, bool kMask>
GPTFAST_INLINE void step_eo(__m512 (&acc)[MB][NR], const float* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                            int64_t k, __mmask32 mask) {
  __m512 ue[NR], uo[NR];
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    const __m512i v = kMask ? _mm512_maskz_loadu_epi16(mask, w + j * ldw + k) : _mm512_loadu_si512(w + j * ldw + k);
    ue[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    uo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
  }
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r) {
    const __m512 pe = _mm512_loadu_ps(x + r * ldx + k), po = _mm512_loadu_ps(x + r * ldx + k + 16);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(po, uo[j], _mm512_fmadd_ps(pe, ue[j], acc[r][j]));
  }
}

template <int NR, int MB, bool kPf>
GPTFAST_INLINE void tile_eo(const float* __restrict x, int64_t ldx, const uint16_t* __restrict w, int64_t ldw,
                            int64_t K, int64_t pf, float* o) {
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if constexpr (kPf) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (pf + j) * ldw + k), _MM_HINT_T0);
    }
    step_eo<NR, MB, false>(acc, x, ldx, w, ldw, k, 0);
  }
  if (k < K) step_eo<NR, MB, true>(acc, x, ldx, w, ldw, k, __mmask32((1u << (K - k)) - 1u));
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int NR, int MB>
GPTFAST_INLINE void tile_eo_mb(int64_t mb, bool first, const float* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                               int64_t K, int64_t pf, float* o) {
  if (mb == MB) {
    if (first)
      tile_eo<NR, MB, true>(x, ldx, w, ldw, K, pf, o);
    else
      tile_eo<NR, MB, false>(x, ldx, w, ldw, K, pf, o);
  } else if constexpr (MB > 1) {
    tile_eo_mb<NR, MB - 1>(mb, first, x, ldx, w, ldw, K, pf, o);
  }
}

// x: deinterleaved (see step_eo), rows ldx >= roundup(K, 32) apart.
template <int NR, int MB>
void range_eo(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out, int64_t M,
              int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const uint16_t* wt = w + n * ldw;
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_eo_mb<NR, MB>(mb, m == 0, x + m * ldx, ldx, wt, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    const uint16_t* wt = w + n * ldw;
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_eo_mb<1, MB>(mb, m == 0, x + m * ldx, ldx, wt, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}
#pragma GCC pop_options
}  // namespace v1

// ------------------------------------------------------------------ v5: avx512_bf16 dot products
// (bf16 weights only; CHANGES THE ARITHMETIC: x is rounded to bf16 (RNE) once per call, then
// vdpbf16ps multiplies bf16 pairs and accumulates in fp32. Measured for a possible named opt-in.)
namespace v5 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
template <int NR, int MB, bool kMask, bool kPf>
GPTFAST_INLINE void step(__m512 (&acc)[MB][NR], const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                         int64_t k, __mmask32 mask, int64_t pf) {
  __m512i u[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    if constexpr (kPf) _mm_prefetch(reinterpret_cast<const char*>(w + (pf + j) * ldw + k), _MM_HINT_T1);
    u[j] = kMask ? _mm512_maskz_loadu_epi16(mask, w + j * ldw + k) : _mm512_loadu_si512(w + j * ldw + k);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r) {
    const __m512i p = _mm512_loadu_si512(x + r * ldx + k);  // zero-padded to a multiple of 32
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)p, (__m512bh)u[j]);
  }
}
template <int NR, int MB, bool kPf>
GPTFAST_INLINE void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, int64_t pf,
                         float* o) {
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step<NR, MB, false, kPf>(acc, x, ldx, w, ldw, k, 0, pf);
  if (k < K) step<NR, MB, true, false>(acc, x, ldx, w, ldw, k, __mmask32((1u << (K - k)) - 1u), pf);
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}
template <int NR, int MB>
GPTFAST_INLINE void tile_mb(int64_t mb, bool first, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                            int64_t K, int64_t pf, float* o) {
  if (mb == MB) {
    if (first)
      tile<NR, MB, true>(x, ldx, w, ldw, K, pf, o);
    else
      tile<NR, MB, false>(x, ldx, w, ldw, K, pf, o);
  } else if constexpr (MB > 1) {
    tile_mb<NR, MB - 1>(mb, first, x, ldx, w, ldw, K, pf, o);
  }
}
template <int NR, int MB>
void range(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out, int64_t M,
           int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_mb<NR, MB>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_mb<1, MB>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, pf, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}
#pragma GCC pop_options
}  // namespace v5

void run_v5(int nr, int mb, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias,
            float* out, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
#define SV_CASE(A, B)                                                        \
  if (nr == A && mb == B) {                                                  \
    v5::range<A, B>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1, pf);         \
    return;                                                                  \
  }
  SV_CASE(8, 1) SV_CASE(8, 2) SV_CASE(6, 4) SV_CASE(3, 8) SV_CASE(4, 4)
#undef SV_CASE
  TORCH_CHECK(false, "skinny_variants: no v5 instance nr=", nr, " mb=", mb);
}

int64_t grain_rows(int64_t M, int64_t K) {
  const int64_t g = (int64_t{1} << 16) / std::max<int64_t>(1, M * K);
  return std::max<int64_t>(8, (g + 7) / 8 * 8);
}

template <typename W>
void run_v1(int nr, int mb, const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out,
            int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
#define SV_CASE(A, B)                                                        \
  if (nr == A && mb == B) {                                                  \
    v1::range<A, B, W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1, pf);      \
    return;                                                                  \
  }
  SV_CASE(2, 1) SV_CASE(4, 1) SV_CASE(6, 1) SV_CASE(8, 1) SV_CASE(12, 1)
  SV_CASE(2, 2) SV_CASE(4, 2) SV_CASE(6, 2) SV_CASE(8, 2)
  SV_CASE(2, 4) SV_CASE(4, 4) SV_CASE(6, 4)
  SV_CASE(2, 8) SV_CASE(3, 8) SV_CASE(4, 6) SV_CASE(3, 6)
#undef SV_CASE
  TORCH_CHECK(false, "skinny_variants: no instance nr=", nr, " mb=", mb);
}

void run_v2(int nr, int mb, const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias,
            float* out, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t pf) {
#define SV_CASE(A, B)                                                        \
  if (nr == A && mb == B) {                                                  \
    v1::range_eo<A, B>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1, pf);      \
    return;                                                                  \
  }
  SV_CASE(2, 1) SV_CASE(4, 1) SV_CASE(6, 1) SV_CASE(8, 1) SV_CASE(12, 1)
  SV_CASE(2, 2) SV_CASE(4, 2) SV_CASE(6, 2) SV_CASE(8, 2)
  SV_CASE(2, 4) SV_CASE(4, 4) SV_CASE(6, 4)
  SV_CASE(2, 8) SV_CASE(3, 8) SV_CASE(4, 6) SV_CASE(3, 6)
#undef SV_CASE
  TORCH_CHECK(false, "skinny_variants: no instance nr=", nr, " mb=", mb);
}

// variant 0: old kernel; variant 1: AVX-512 tiles (nr, mb, pf). out must be (M, N) contiguous fp32.
void run(int64_t variant, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
         at::Tensor& out, int64_t nr, int64_t mb, int64_t pf) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && out.is_contiguous());
  const float* xp = x.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const bool bf = w.scalar_type() == at::kBFloat16;
  g_hint = variant == 3 ? 1 : variant == 4 ? 2 : 0;
  if (variant == 3 || variant == 4) variant = 1;
  int64_t ldd = 0;
  std::vector<uint16_t> xb;
  if (bf && variant == 5) {  // x rounded to bf16 (RNE), rows zero-padded to a multiple of 32
    ldd = (K + 31) / 32 * 32;
    xb.assign(M * ldd, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        uint32_t u;
        std::memcpy(&u, xp + m * K + k, 4);
        xb[m * ldd + k] = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      }
  }
  std::vector<float> xd;
  if (bf && variant == 2) {  // deinterleave x's 32-element chunks (see v1::step_eo), zero-padded
    ldd = (K + 31) / 32 * 32;
    xd.assign(M * ldd, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xd[m * ldd + k / 32 * 32 + (k % 2) * 16 + (k % 32) / 2] = xp[m * K + k];
  }
  at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
    if (bf) {
      const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
      if (variant == 0)
        v0::range<uint16_t>(xp, K, wp, K, bp, op, M, N, K, n0, n1);
      else if (variant == 2)
        run_v2(nr, mb, xd.data(), ldd, wp, K, bp, op, M, N, K, n0, n1, pf);
      else if (variant == 5)
        run_v5(nr, mb, xb.data(), ldd, wp, K, bp, op, M, N, K, n0, n1, pf);
      else
        run_v1<uint16_t>(nr, mb, xp, K, wp, K, bp, op, M, N, K, n0, n1, pf);
    } else {
      const float* wp = w.data_ptr<float>();
      if (variant == 0)
        v0::range<float>(xp, K, wp, K, bp, op, M, N, K, n0, n1);
      else
        run_v1<float>(nr, mb, xp, K, wp, K, bp, op, M, N, K, n0, n1, pf);
    }
  });
}

}  // namespace sv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &sv::run); }
