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
template <typename V>
GPTFAST_INLINE V exp_impl(V x) {
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  const auto tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for precision
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
