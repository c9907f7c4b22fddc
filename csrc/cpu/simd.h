// Helpers shared by gptfast's CPU kernels: runtime ISA dispatch and a vectorisable exp.
#pragma once

#include <cstdint>
#include <cstring>

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

namespace gptfast {

// exp(x) for float, ~1-2 ulp (Cephes expf polynomial), written so that GCC vectorises it inside a
// loop (std::exp is a libm call that blocks vectorisation): range reduction x = n ln2 + r with
// n = round(x / ln2) by the 1.5 * 2^23 trick (no SSE4.1 round needed), a degree-6 polynomial in
// r, and 2^n built in the exponent bits. Results below 2^-126 (x < -87.3, incl. -inf) flush to
// 0, so a token with a -inf logit gets probability exactly 0; x > 88.3 saturates at exp(88.3).
GPTFAST_INLINE float fast_exp(float x) {
  const bool tiny = x < -87.3f;
  x = tiny ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for precision
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : p * scale;
}

// tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at +-inf, absolute error ~1e-7 near 0.
GPTFAST_INLINE float fast_tanh(float u) { return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f); }

}  // namespace gptfast
