// Helpers shared by gptfast's CPU kernels: runtime ISA dispatch and a vectorisable exp.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Builds use -march=native by default (setup.py and the JIT loader both build on the machine
// that runs the kernels). A portable build (GPTFAST_PORTABLE_BUILD=1 -> -DGPTFAST_PORTABLE)
// cannot assume AVX2/AVX-512, so the kernel entry points are compiled three times with GCC's
// function multi-versioning and the loader (ifunc) picks the best clone for the running CPU.
// Loops are written plainly, with `#pragma omp simd` for reductions, and left to the compiler's
// vectoriser: no intrinsics to port.
#if defined(GPTFAST_PORTABLE) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__)
#define GPTFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPTFAST_CLONES
#endif

#define GPTFAST_INLINE inline __attribute__((always_inline))
#define GPTFAST_INLINE_LAMBDA __attribute__((always_inline))

namespace gptfast {

// 256-bit GCC vectors (8 floats / 4 doubles): native on AVX2 (16 ymm registers) and on AVX-512
// (where 256-bit ops use ymm0-31). A wider generic vector is split by GCC through the stack on
// AVX2, which was 7x slower. fp64 exists for gradcheck only; its speed does not matter.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kN = 32 / sizeof(T);
};

template <typename T>
GPTFAST_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load (vmovups)
  return v;
}

template <typename T>
GPTFAST_INLINE void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

using Vf = Vec<float>::type;
typedef int32_t Vi __attribute__((vector_size(32)));

// Sum of the 8 lanes (row reductions after the vector loop).
GPTFAST_INLINE float hsum(Vf v) {
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

GPTFAST_INLINE int32_t exp_bits(float n) { return static_cast<int32_t>(n); }
GPTFAST_INLINE Vi exp_bits(Vf n) { return __builtin_convertvector(n, Vi); }

// exp(x) for float (V = float) or 8 floats (V = Vf), ~1-2 ulp (Cephes expf polynomial): range
// reduction x = n ln2 + r with n = round(x / ln2) by the 1.5 * 2^23 trick (no SSE4.1 round
// needed), a degree-6 polynomial in r, and 2^n built in the exponent bits. Results below 2^-126
// (x < -87.3, incl. -inf) flush to 0, so a masked score or a -inf logit gets probability exactly
// 0; x > 88.3 saturates at exp(88.3). Written branch-free: std::exp is a libm call that blocks
// vectorisation, and the scalar version vectorises inside loops (with -fno-trapping-math, see
// gptfast/_build.py). Kernels whose rows GCC does not vectorise on its own (attention's 64-wide
// score rows: 5.4 us vs 30 us per 64x64 softmax tile) call the vector version directly.
// kLo: exp(x + x_lo) for a small correction x_lo that is added after the range reduction, so that x
// (when exact, e.g. -zh^2 in erf_erfc) carries no rounding into the result (see erf_erfc).
template <typename V, bool kLo = false>
GPTFAST_INLINE V exp_impl(V x, V x_lo = V{}) {
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  const auto tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V n;
  if constexpr (kLo) {
    n = ((x + x_lo) * 1.44269504088896341f + shifter) - shifter;  // r + x_lo stays in [-ln2/2, ln2/2]
  } else {
    n = (x * 1.44269504088896341f + shifter) - shifter;
  }
  V r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for precision
  if constexpr (kLo) r = r + x_lo;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto bits = (exp_bits(n) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const V res = p * scale;
  return tiny ? V{} : res;
}

GPTFAST_INLINE float fast_exp(float x) { return exp_impl(x); }
GPTFAST_INLINE Vf vexp(Vf x) { return exp_impl(x); }

// tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at +-inf, absolute error ~1e-7 near 0.
GPTFAST_INLINE float fast_tanh(float u) { return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f); }

// ------------------------------------------------------------------------ erf / erfc (exact GELU)

// x with the low 12 of its 23 mantissa bits cleared: 12 significant bits, so x * x is exact in fp32.
GPTFAST_INLINE float clear_low12(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  b &= 0xFFFFF000u;
  std::memcpy(&x, &b, sizeof(b));
  return x;
}
GPTFAST_INLINE Vf clear_low12(Vf x) {
  Vi b;
  std::memcpy(&b, &x, sizeof(b));
  b &= -4096;  // 0xFFFFF000
  std::memcpy(&x, &b, sizeof(b));
  return x;
}

// erf(z), erfc(z) and exp(-z^2) for z >= 0 (float or Vf; NaN propagates, +inf gives 1, 0, 0),
// branch-free so that it vectorises. The caller passes z^2 as sq_hi + sq_lo, sq_hi exact (see
// erf_erfc and normal_cdf), and z clamped to <= 10 as zc. Our own fit, in the classic two-piece
// form (Cephes erff / fdlibm s_erff.c use the same split; the coefficients are new, fitted to
// minimax relative error against mpmath):
// - z < 1: erf(z) = z + z * P(z^2), P of degree 6 (fit error 1.2e-9 relative); the leading z is
//   kept out of the polynomial as in fdlibm, so erf(tiny) = z exactly to within rounding.
// - z >= 1: erfc(z) = exp(-z^2) * t * Q(t), t = 1 / (1 + z / 2), Q of degree 9 on z in [1, 9.5]
//   (fit error 2e-10 relative): t Q(t) is the scaled erfcx(z), smooth and free of cancellation.
//   exp(-z^2) is computed as exp(-zh^2 - (z - zh)(z + zh)) with zh = z to 12 bits (zh^2 exact),
//   because z^2 rounded to fp32 would carry an error of up to 85 * 2^-24 into the exponent (80 ulp
//   of erfc at z = 9); erfc underflows to 0 past z ~ 9.3.
// Measured over dense grids against fp64 (tests/test_activation.py): erf within 1.5 ulp everywhere
// (incl. |z| < 1e-30); erfc, and so the exact GELU's tail, within a few ulp relative.
template <typename V>
GPTFAST_INLINE void erf_erfc_core(V z, V zc, V sq_hi, V sq_lo, V& erf, V& erfc, V& e2) {
  const V s = z * z;
  V p = V{} + 7.854145952e-05f;
  p = p * s - 8.010288002e-04f;
  p = p * s + 5.188339856e-03f;
  p = p * s - 2.685382031e-02f;
  p = p * s + 1.128358543e-01f;
  p = p * s - 3.761262596e-01f;
  p = p * s + 1.283791661e-01f;
  const V ea = z + z * p;
  e2 = exp_impl<V, true>(-sq_hi, -sq_lo);
  const V t = 1.0f / (1.0f + 0.5f * zc);
  V q = V{} - 6.835173815e-02f;
  q = q * t + 2.130967230e-01f;
  q = q * t - 1.811254770e-01f;
  q = q * t - 4.041667655e-02f;
  q = q * t + 1.506527234e-02f;
  q = q * t + 7.106012106e-02f;
  q = q * t + 1.800313592e-01f;
  q = q * t + 2.462237924e-01f;
  q = q * t + 2.821485698e-01f;
  q = q * t + 2.820927799e-01f;
  const V cb = e2 * (t * q);
  const auto small = z < 1.0f;
  erf = small ? ea : 1.0f - cb;
  erfc = small ? 1.0f - ea : cb;
}

template <typename V>
GPTFAST_INLINE void erf_erfc(V z, V& erf, V& erfc, V& e2) {
  const V zc = z > 10.0f ? V{} + 10.0f : z;  // erfc(10) = 2e-45: keeps inf out of the arithmetic
  const V zh = clear_low12(zc);
  erf_erfc_core(z, zc, zh * zh, (zc - zh) * (zc + zh), erf, erfc, e2);
}

// erf(x) for any x (odd); the exact GELU's kernel, exposed as the op gptfast::erf for its tests.
GPTFAST_INLINE float fast_erf(float x) {
  float e, c, e2;
  erf_erfc(x < 0.0f ? -x : x, e, c, e2);
  return x < 0.0f ? -e : e;
}

constexpr float kSqrtHalf = 0.70710678118654752f;   // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// Exact GELU (Hendrycks & Gimpel 2016; torch.nn.GELU()): gelu(x) = x Phi(x), Phi the normal CDF,
// Phi(x) = (1 + erf(x / sqrt 2)) / 2 = erfc(-x / sqrt 2) / 2. For x < 0 the erfc form is used, so
// the tail keeps its relative accuracy (no 1 + erf cancellation), and exp(-z^2) = exp(-x^2 / 2) is
// split from x itself (not from the rounded z = |x| / sqrt 2, whose 0.5 ulp would cost ~x^2 / 2
// ulp in the tail). Returns Phi(x); *pdf = the normal density phi(x) = exp(-x^2/2) / sqrt(2 pi)
// (gelu'(x) = Phi(x) + x phi(x)).
GPTFAST_INLINE float normal_cdf(float x, float* pdf) {
  float e, c, e2;
  const float a = x < 0.0f ? -x : x;
  const float ac = a > 14.2f ? 14.2f : a;  // z = ac / sqrt 2 <= 10.04 (erfc: 0)
  const float ah = clear_low12(ac);
  const float z = a * kSqrtHalf;
  erf_erfc_core(z, ac * kSqrtHalf, 0.5f * (ah * ah), 0.5f * ((ac - ah) * (ac + ah)), e, c, e2);
  *pdf = e2 * kInvSqrt2Pi;
  return x >= 0.0f ? 0.5f + 0.5f * e : 0.5f * c;
}

// ------------------------------------------------------------------------ streaming stores
//
// A kernel that writes a large output it will not read again (LayerNorm's y and dx: 25 MB at
// GPT-2's 8192 x 768) pays for every ordinary store twice: the cache line is first read from
// memory (read-for-ownership), then written back. Non-temporal stores write whole lines without
// reading them: LayerNorm forward at (8192, 768) went from 15.5 to 22 GB/s on the 2-core EPYC VM
// (benchmarks/results/cpu). Below kStreamMinBytes the output fits in the caches and the next op
// reads it from there, so kernels keep ordinary stores (the crossover measured there was ~4 MB).
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

// Stores 8 floats at p; `stream` selects a non-temporal store, which needs p 32-byte aligned
// (16 bytes without AVX) - callers peel a row's head until it is (see stream_row_begin).
GPTFAST_INLINE void vstore_f32(float* p, Vf v, bool stream) {
#if defined(__AVX__)
  if (stream) {
    __m256 m;
    std::memcpy(&m, &v, sizeof(m));
    _mm256_stream_ps(p, m);
    return;
  }
#elif defined(__SSE2__)
  if (stream) {
    __m128 lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, sizeof(hi));
    _mm_stream_ps(p, lo);
    _mm_stream_ps(p + 4, hi);
    return;
  }
#endif
  vstore(p, v);
}

// Elements to write one by one before p + i is aligned for vstore_f32's streaming path (0..7).
GPTFAST_INLINE int64_t stream_row_begin(const float* p, int64_t n) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) & 31u;
  const int64_t head = mis == 0 ? 0 : static_cast<int64_t>((32u - mis) / sizeof(float));
  return head < n ? head : n;
}

// Orders a thread's streaming stores before whatever it does next (e.g. leaving a parallel
// region whose output another thread reads).
GPTFAST_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace gptfast
