// Linear with a quantized weight on CPU: y = x w^T + b, x (M, K) fp32, w given as (qweight, scale,
// zero, bits, group_size) in the formats of gptfast/ops/quant.py (issue #20):
//   int8 per channel: q int8 (N, K), scale fp32 (N,):            w = q * scale[n]
//   int8 group g:     q int8 (N, K), scale fp16 (N, K/g):        w = q * scale[n, k/g]
//   int4 group g:     u packed uint8 (N, K/2), scale fp16 (N, K/g) [, zero fp16 (N, K/g)]:
//                     w = (u - 8) * scale[n, k/g] (+ zero[n, k/g]); per 32-block of k, byte j holds
//                     k = j (low nibble) and k = j + 16 (high nibble): llama.cpp's q4_0 packing.
//
// Decoding is memory bound: every weight byte is read once per step, so fewer bytes per weight is
// fewer milliseconds per token (gpt-fast's int8 / int4 weight-only linears, llama.cpp's q8_0 / q4_0).
// Three paths:
//
// - Decode (M <= kSkinnyMaxM = 16), weight-only (the default): the structure of skinny_linear.cpp
//   (read it first). Parallel over N (at::parallel_for); tiles of NR weight rows x MB rows of x whose
//   NR * MB dot products stay in registers for the whole K loop; each weight block is read once per
//   tile and dequantized IN REGISTERS with fp32 math, exactly as gptfast.ops.quant.dequantize_weight
//   does it (q -> fp32, times the fp16 scale widened to fp32: an exact product; + zero: one rounding),
//   then multiplied into every row's accumulator. Per-channel int8 multiplies the row's fp32 scale
//   once, after the sum (x . (q s) = s (x . q), one rounding instead of K). ISA by CPUID at run time:
//   AVX-512 (avx512f/bw/vl: 16-lane tiles 8x1 / 8x2 / 6x4 / 3x8 by M, as skinny_linear) or the
//   8-lane kernel (GCC vectors: AVX2 code on an AVX2 machine such as Zen 3, whatever the compiler
//   targets elsewhere; 4 weight rows x 2 x rows). GPTFAST_SKINNY_ISA=generic / avx2 forces the 8-lane
//   kernel (the tests run both). Software prefetch PF rows ahead (T1 on AVX-512), as skinny_linear.
//
// - act_int8 (a named option, int8 formats only; any M): llama.cpp's q8_0 x q8_0 dot product
//   (ggml-quants.c, quantize_row_q8_0 / ggml_vec_dot_q8_0_q8_0). Each row of x is quantized per
//   32-block k = 32b..32b+31: amax = max |x|, d = amax / 127, q = round_half_even(x * (127 / amax))
//   clamped to [-127, 127] (all fp32 ops; a block of zeros: d = 0, q = 0; a block with NaN / inf:
//   d = NaN, so the row's outputs are NaN). Integer dot products per block are exact; they are scaled
//   in fp32. AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32) takes the activations as unsigned u = q + 128 and
//   subtracts 128 * sum(w) (one more vpdpbusd per weight row, shared by all x rows; the result per
//   lane is exactly sum q_x q_w over its 4 bytes). The arithmetic is DEFINED lane by lane, so that the
//   8-lane / scalar emulation (CPUs without avx512_vnni, or GPTFAST_SKINNY_ISA=generic) gives the same
//   bits: for each 64-byte chunk c (blocks 2c, 2c+1) and lane l (0..15, bytes 4l..4l+3 of the chunk,
//   block 2c + l / 8): acc[l] = fma(float(isum_l), s, acc[l]) with s = d_x[blk] (per channel) or
//   d_x[blk] * d_w[blk] (group; fp32 product); a missing second block (K / 32 odd) is isum 0, s 0;
//   then y = reduce16(acc) (a fixed tree, see reduce16) (* scale[n] per channel) + bias. Error: the
//   activation rounding, up to d_x / 2 per element (measured in tests/test_quant_native.py and the
//   report: ~0.4-0.6 % of |y| at GPT-2 shapes).
//
// - Prefill (M > 16), weight-only: no dense copy of the whole matrix. Tiles of NT weight rows (about
//   1 MB of fp32) are dequantized into one buffer (in parallel), then at::addmm (MKL sgemm) multiplies
//   all M rows by the tile; the tile's columns are copied into y. The dequantized tile is bit for bit
//   dequantize_weight's, so the result is the reference's up to sgemm's summation order.
#include "quant_linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"
#include "skinny_linear.h"

namespace gptfast {
namespace {

constexpr const char* kOp = "quantized_linear";

// Software prefetch distance in bytes of weight rows ahead (rounded to whole rows, at least 16
// rows): skinny_linear prefetches 16 fp32 rows ahead, 48 KB at K = 768; quantized rows are 2-8x
// shorter, so 16 of them were too few lines in flight (int8 M = 1, 2 threads: 30.7 GB/s at 16 rows).
#ifndef GPTFAST_QPF_BYTES
#define GPTFAST_QPF_BYTES 49152
#endif

// The format, as a template parameter of the kernels.
enum Fmt { kI8C = 0, kI8G = 1, kI4 = 2, kI4Z = 3 };

GPTFAST_INLINE float h2f(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// A quantized weight: row n's bytes at q + n * ldq; per channel scale_c[n]; per group scale / zero
// (fp16 bits) at n * G + k / group.
struct QW {
  const uint8_t* q;
  int64_t ldq;
  const float* scale_c;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t G;
  int64_t group;
  int64_t pf;  // prefetch offset in bytes (whole rows)
};

// ------------------------------------------------------------------------ 8-lane kernel (AVX2 / generic)

typedef int8_t Vc8 __attribute__((vector_size(8)));
typedef uint8_t Vu8 __attribute__((vector_size(8)));

GPTFAST_INLINE Vf cvt8_i8(const uint8_t* p) {  // 8 int8 -> fp32 (exact)
  Vc8 c;
  std::memcpy(&c, p, 8);
  return __builtin_convertvector(__builtin_convertvector(c, Vi), Vf);
}

// 8 nibbles of a 16-byte int4 block, centred (u - 8), as fp32: part 0: k 0..7 (low nibbles of bytes
// 0..7), 1: k 8..15 (low, bytes 8..15), 2: k 16..23 (high, 0..7), 3: k 24..31 (high, 8..15).
GPTFAST_INLINE Vf cvt8_i4(const uint8_t* blk, int part) {
  Vu8 c;
  std::memcpy(&c, blk + (part & 1) * 8, 8);
  Vi v = __builtin_convertvector(c, Vi);
  v = (part < 2 ? (v & 15) : (v >> 4)) - 8;
  return __builtin_convertvector(v, Vf);
}

// o[r * NR + j] = x_r . w_{n + j} for r < MB, j < NR (per channel: times scale[n + j]).
template <int F, int NR, int MB>
GPTFAST_INLINE void gtile(const float* __restrict x, int64_t ldx, const QW& w, int64_t n, int64_t K, bool pf,
                          float* o) {
  Vf acc[MB][NR];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = Vf{};
  const uint8_t* q[NR];
  for (int j = 0; j < NR; ++j) q[j] = w.q + (n + j) * w.ldq;
  if constexpr (F == kI8C) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (pf && (k & 63) == 0)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(q[j] + w.pf + k, 0, 3);
      Vf u[NR];
      for (int j = 0; j < NR; ++j) u[j] = cvt8_i8(q[j] + k);
      for (int r = 0; r < MB; ++r) {
        const Vf p = vload(x + r * ldx + k);
        for (int j = 0; j < NR; ++j) acc[r][j] += p * u[j];
      }
    }
    float s[MB][NR];
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < NR; ++j) s[r][j] = hsum(acc[r][j]);
    for (; k < K; ++k)
      for (int r = 0; r < MB; ++r)
        for (int j = 0; j < NR; ++j) s[r][j] += x[r * ldx + k] * static_cast<float>(static_cast<int8_t>(q[j][k]));
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < NR; ++j) o[r * NR + j] = s[r][j] * w.scale_c[n + j];
  } else {
    constexpr int64_t kBpb = F == kI8G ? 32 : 16;  // bytes per 32-block
    const int64_t nb = K / 32, bpg = w.group / 32;
    for (int64_t b = 0; b < nb; ++b) {
      if (pf && ((b * kBpb) & 63) == 0)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(q[j] + w.pf + b * kBpb, 0, 3);
      const int64_t g = b / bpg;
      float sc[NR], zc[NR];
      for (int j = 0; j < NR; ++j) {
        sc[j] = h2f(w.scale[(n + j) * w.G + g]);
        zc[j] = F == kI4Z ? h2f(w.zero[(n + j) * w.G + g]) : 0.f;
      }
      for (int part = 0; part < 4; ++part) {
        Vf u[NR];
        for (int j = 0; j < NR; ++j) {
          const Vf f = F == kI8G ? cvt8_i8(q[j] + b * 32 + part * 8) : cvt8_i4(q[j] + b * 16, part);
          u[j] = F == kI4Z ? f * sc[j] + zc[j] : f * sc[j];
        }
        for (int r = 0; r < MB; ++r) {
          const Vf p = vload(x + r * ldx + b * 32 + part * 8);
          for (int j = 0; j < NR; ++j) acc[r][j] += p * u[j];
        }
      }
    }
    for (int r = 0; r < MB; ++r)
      for (int j = 0; j < NR; ++j) o[r * NR + j] = hsum(acc[r][j]);
  }
}

// Columns [n0, n1) of out (M, N): 4-row tiles x pairs of x rows, then the last rows one by one.
template <int F>
GPTFAST_INLINE void grange(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M,
                           int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[8];
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      gtile<F, 4, 2>(x + m * ldx, ldx, w, n, K, m == 0, o);
      for (int r = 0; r < 2; ++r)
        for (int j = 0; j < 4; ++j) out[(m + r) * N + n + j] = o[r * 4 + j] + (bias ? bias[n + j] : 0.f);
    }
    if (m < M) {
      gtile<F, 4, 1>(x + m * ldx, ldx, w, n, K, m == 0, o);
      for (int j = 0; j < 4; ++j) out[m * N + n + j] = o[j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      gtile<F, 1, 1>(x + m * ldx, ldx, w, n, K, false, o);
      out[m * N + n] = o[0] + (bias ? bias[n] : 0.f);
    }
}

GPTFAST_CLONES
void grange_i8c(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t n1) {
  grange<kI8C>(x, ldx, w, bias, out, M, N, K, n0, n1);
}
GPTFAST_CLONES
void grange_i8g(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t n1) {
  grange<kI8G>(x, ldx, w, bias, out, M, N, K, n0, n1);
}
GPTFAST_CLONES
void grange_i4(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
               int64_t K, int64_t n0, int64_t n1) {
  grange<kI4>(x, ldx, w, bias, out, M, N, K, n0, n1);
}
GPTFAST_CLONES
void grange_i4z(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t n1) {
  grange<kI4Z>(x, ldx, w, bias, out, M, N, K, n0, n1);
}

void grange_fmt(int F, const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t n1) {
  switch (F) {
    case kI8C: return grange_i8c(x, ldx, w, bias, out, M, N, K, n0, n1);
    case kI8G: return grange_i8g(x, ldx, w, bias, out, M, N, K, n0, n1);
    case kI4: return grange_i4(x, ldx, w, bias, out, M, N, K, n0, n1);
    default: return grange_i4z(x, ldx, w, bias, out, M, N, K, n0, n1);
  }
}

// ------------------------------------------------------------------------ act_int8: shared definitions

// The fixed reduction order of the 16 lane accumulators (both ISA paths).
GPTFAST_INLINE float reduce16(const float* a) {
  float t8[8], t4[4];
  for (int i = 0; i < 8; ++i) t8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

// x (M rows, ldx apart, K % 32 == 0) -> ux (M, K) uint8 = q + 128 and dx (M, K / 32) fp32 (see the
// header comment for the rule; tests/test_quant_native.py emulates it in PyTorch).
void quantize_x(const float* x, int64_t ldx, int64_t M, int64_t K, uint8_t* ux, float* dx) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * ldx + b * 32;
      uint8_t* u = ux + m * K + b * 32;
      float amax = 0.f, nan_probe = 0.f;
      for (int i = 0; i < 32; ++i) {
        const float a = std::fabs(p[i]);
        amax = a > amax ? a : amax;
        nan_probe += p[i] * 0.f;  // NaN if any element is NaN or inf
      }
      if (std::isnan(nan_probe)) {
        dx[m * nb + b] = std::numeric_limits<float>::quiet_NaN();
        std::memset(u, 128, 32);
        continue;
      }
      dx[m * nb + b] = amax / 127.f;
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      for (int i = 0; i < 32; ++i) {
        float v = std::nearbyint(p[i] * id);  // round half to even (the default rounding mode)
        v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
        u[i] = static_cast<uint8_t>(static_cast<int32_t>(v) + 128);
      }
    }
  }
}

struct QX {  // quantized activations
  const uint8_t* ux;
  const float* dx;
  int64_t K, nb;
};

// The emulation (CPUs without avx512_vnni, GPTFAST_SKINNY_ISA=generic): the same lanes, the same fma
// order, the same reduction, so the same bits as the VNNI kernel.
void act_range_generic(const QX& a, const QW& w, bool group, const float* bias, float* out, int64_t M, int64_t N,
                       int64_t n0, int64_t n1) {
  const int64_t K = a.K, nb = a.nb, nc = (nb + 1) / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qw = reinterpret_cast<const int8_t*>(w.q + n * w.ldq);
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* ux = a.ux + m * K;
      const float* dx = a.dx + m * nb;
      float acc[16] = {};
      for (int64_t c = 0; c < nc; ++c) {
        float s[2];
        int32_t isum[16];
        for (int h = 0; h < 2; ++h) {
          const int64_t blk = 2 * c + h;
          s[h] = blk < nb ? (group ? dx[blk] * h2f(w.scale[n * w.G + blk * 32 / w.group]) : dx[blk]) : 0.f;
          for (int l = 0; l < 8; ++l) {
            int32_t t = 0;
            if (blk < nb)
              for (int i = 0; i < 4; ++i) {
                const int64_t k = blk * 32 + l * 4 + i;
                t += (static_cast<int32_t>(ux[k]) - 128) * static_cast<int32_t>(qw[k]);
              }
            isum[h * 8 + l] = t;
          }
        }
        for (int l = 0; l < 16; ++l) acc[l] = std::fma(static_cast<float>(isum[l]), s[l / 8], acc[l]);
      }
      float y = reduce16(acc);
      if (!group) y *= w.scale_c[n];
      out[m * N + n] = y + (bias ? bias[n] : 0.f);
    }
  }
}

// ------------------------------------------------------------------------ AVX-512 kernels
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GPTFAST_QUANT_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

GPTFAST_INLINE float h2f_x(uint16_t h) { return _cvtsh_ss(h); }

// 16 int8 weights -> fp32 (exact); masked: the first lanes of `m` only, the rest 0.
GPTFAST_INLINE __m512 q16_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
GPTFAST_INLINE __m512 q16_i8(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
// G fp16 values (raw bits) at src -> fp32 at dst (exact).
GPTFAST_INLINE void h2f_row(const uint16_t* src, int64_t G, float* dst) {
  int64_t g = 0;
  for (; g + 16 <= G; g += 16)
    _mm512_storeu_ps(dst + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + g))));
  if (g < G) {
    const __mmask16 m = __mmask16((1u << (G - g)) - 1u);
    _mm512_mask_storeu_ps(dst + g, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + g)));
  }
}

// -8, -7, ..., 7: the centred int4 values, lane i = i - 8 (an int4 table's index).
GPTFAST_INLINE __m512 iota_m8() {
  return _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
}

template <int F, int NR, int MB, bool kPf>
GPTFAST_INLINE void tile512(const float* __restrict x, int64_t ldx, const QW& w, int64_t n, int64_t K,
                            const float* __restrict sb, float* o) {
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint8_t* q[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) q[j] = w.q + (n + j) * w.ldq;
  if constexpr (F == kI8C) {
    auto step = [&](int64_t k, __mmask16 mask, bool masked) GPTFAST_INLINE_LAMBDA {
      __m512 u[NR];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) u[j] = masked ? q16_i8(q[j] + k, mask) : q16_i8(q[j] + k);
#pragma GCC unroll 16
      for (int r = 0; r < MB; ++r) {
        const __m512 p = masked ? _mm512_maskz_loadu_ps(mask, x + r * ldx + k) : _mm512_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(p, u[j], acc[r][j]);
      }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (kPf && (k & 63) == 0) {
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(q[j] + w.pf + k), _MM_HINT_T1);
      }
      step(k, 0, false);
    }
    if (k < K) step(k, __mmask16((1u << (K - k)) - 1u), true);
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]) * w.scale_c[n + j];
  } else {
    constexpr int64_t kBpb = F == kI8G ? 32 : 16;  // bytes per 32-block
    const int64_t nb = K / 32, bpg = w.group / 32;
    for (int64_t b = 0; b < nb; ++b) {
      if (kPf && ((b * kBpb) & 63) == 0) {
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(q[j] + w.pf + b * kBpb), _MM_HINT_T1);
      }
      const int64_t g = b / bpg;
      if constexpr (F == kI8G) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          __m512 u[NR];
#pragma GCC unroll 16
          for (int j = 0; j < NR; ++j) u[j] = _mm512_mul_ps(q16_i8(q[j] + b * 32 + h * 16), _mm512_set1_ps(sb[j * w.G + g]));
#pragma GCC unroll 16
          for (int r = 0; r < MB; ++r) {
            const __m512 p = _mm512_loadu_ps(x + r * ldx + b * 32 + h * 16);
#pragma GCC unroll 16
            for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(p, u[j], acc[r][j]);
          }
        }
      } else {
        // int4: the group's 16 possible weights (i - 8) s (+ z) in one register (exact products;
        // + z rounded once: dequantize_weight's values), looked up by nibble with vpermps, which
        // reads the low 4 bits of each index lane (no mask for the low nibbles).
        __m512 u0[NR], u1[NR];
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) {
          const __m512 s = _mm512_set1_ps(sb[j * w.G + g]);
          const __m512 t = F == kI4Z ? _mm512_fmadd_ps(iota_m8(), s, _mm512_set1_ps(sb[(NR + j) * w.G + g]))
                                     : _mm512_mul_ps(iota_m8(), s);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + b * 16)));
          u0[j] = _mm512_permutexvar_ps(v, t);
          u1[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
        }
#pragma GCC unroll 16
        for (int r = 0; r < MB; ++r) {
          const __m512 p0 = _mm512_loadu_ps(x + r * ldx + b * 32), p1 = _mm512_loadu_ps(x + r * ldx + b * 32 + 16);
#pragma GCC unroll 16
          for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(p1, u1[j], _mm512_fmadd_ps(p0, u0[j], acc[r][j]));
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
  }
}

template <int F, int NR, int MB>
GPTFAST_INLINE void tile512_mb(int64_t mb, bool first, const float* x, int64_t ldx, const QW& w, int64_t n,
                               int64_t K, const float* sb, float* o) {
  if (mb == MB) {
    if (first)
      tile512<F, NR, MB, true>(x, ldx, w, n, K, sb, o);
    else
      tile512<F, NR, MB, false>(x, ldx, w, n, K, sb, o);
  } else if constexpr (MB > 1) {
    tile512_mb<F, NR, MB - 1>(mb, first, x, ldx, w, n, K, sb, o);
  }
}

template <int F, int NR, int MB>
void range512(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
              int64_t K, int64_t n0, int64_t n1) {
  float o[MB * NR];
  // Group formats: the tile's scales (and zeros) widened to fp32 once per tile (exact), so that the
  // K loop broadcasts them from memory (a load) instead of converting each one (shuffle-port uops).
  std::vector<float> sbuf(F == kI8C ? 0 : static_cast<size_t>(2 * NR * w.G));
  float* sb = sbuf.data();
  auto widen = [&](int64_t n, int nr) {
    if constexpr (F != kI8C) {
      for (int j = 0; j < nr; ++j) {
        h2f_row(w.scale + (n + j) * w.G, w.G, sb + j * w.G);
        if (F == kI4Z) h2f_row(w.zero + (n + j) * w.G, w.G, sb + (nr + j) * w.G);
      }
    }
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    widen(n, NR);
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile512_mb<F, NR, MB>(mb, m == 0, x + m * ldx, ldx, w, n, K, sb, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    widen(n, 1);
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile512_mb<F, 1, MB>(mb, m == 0, x + m * ldx, ldx, w, n, K, sb, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}

// Tile shape by M as skinny_linear's (NR x MB <= 24 accumulators of the 32 zmm registers).
template <int F>
void range_avx512(const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M, int64_t N,
                  int64_t K, int64_t n0, int64_t n1) {
  if (M == 1)
    range512<F, 8, 1>(x, ldx, w, bias, out, M, N, K, n0, n1);
  else if (M == 2)
    range512<F, 8, 2>(x, ldx, w, bias, out, M, N, K, n0, n1);
  else if (M <= 4)
    range512<F, 6, 4>(x, ldx, w, bias, out, M, N, K, n0, n1);
  else
    range512<F, 3, 8>(x, ldx, w, bias, out, M, N, K, n0, n1);
}

void range_avx512_fmt(int F, const float* x, int64_t ldx, const QW& w, const float* bias, float* out, int64_t M,
                      int64_t N, int64_t K, int64_t n0, int64_t n1) {
  switch (F) {
    case kI8C: return range_avx512<kI8C>(x, ldx, w, bias, out, M, N, K, n0, n1);
    case kI8G: return range_avx512<kI8G>(x, ldx, w, bias, out, M, N, K, n0, n1);
    case kI4: return range_avx512<kI4>(x, ldx, w, bias, out, M, N, K, n0, n1);
    default: return range_avx512<kI4Z>(x, ldx, w, bias, out, M, N, K, n0, n1);
  }
}
#pragma GCC pop_options

// ---- act_int8 with avx512_vnni (vpdpbusd)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

// NR weight rows x MB x rows, all NR * MB 16-lane accumulators in registers (see the header comment
// for the arithmetic the emulation reproduces).
template <int NR, int MB, bool kGroup>
GPTFAST_INLINE void act_tile(const QX& a, int64_t m0, const QW& w, int64_t n, bool pf, float* o) {
  const int64_t K = a.K, nb = a.nb, nc = (nb + 1) / 2;
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* q[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) q[j] = w.q + (n + j) * w.ldq;
  for (int64_t c = 0; c < nc; ++c) {
    const bool full = 2 * c + 1 < nb;
    const __mmask64 mask = full ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
    __m512i wv[NR], neg[NR];
    __m512 dw[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      if (pf) _mm_prefetch(reinterpret_cast<const char*>(q[j] + w.pf + 64 * c), _MM_HINT_T1);
      wv[j] = _mm512_maskz_loadu_epi8(mask, q[j] + 64 * c);
      neg[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wv[j]));
      if constexpr (kGroup) {
        const float lo = h2f_x(w.scale[(n + j) * w.G + (2 * c) * 32 / w.group]);
        const float hi = full ? h2f_x(w.scale[(n + j) * w.G + (2 * c + 1) * 32 / w.group]) : 0.f;
        dw[j] = _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r) {
      const uint8_t* ux = a.ux + (m0 + r) * K + 64 * c;
      const float* dx = a.dx + (m0 + r) * nb + 2 * c;
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, ux);
      const __m512 dxv = _mm512_insertf32x8(_mm512_set1_ps(dx[0]), _mm256_set1_ps(full ? dx[1] : 0.f), 1);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg[j], xv, wv[j]));  // exact sums
        const __m512 s = kGroup ? _mm512_mul_ps(dxv, dw[j]) : dxv;
        acc[r][j] = _mm512_fmadd_ps(f, s, acc[r][j]);
      }
    }
  }
  alignas(64) float lanes[16];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      _mm512_store_ps(lanes, acc[r][j]);
      const float y = reduce16(lanes);
      o[r * NR + j] = kGroup ? y : y * w.scale_c[n + j];
    }
}

template <int NR, int MB, bool kGroup>
GPTFAST_INLINE void act_tile_mb(int64_t mb, const QX& a, int64_t m0, const QW& w, int64_t n, float* o) {
  if (mb == MB) {
    act_tile<NR, MB, kGroup>(a, m0, w, n, m0 == 0, o);
  } else if constexpr (MB > 1) {
    act_tile_mb<NR, MB - 1, kGroup>(mb, a, m0, w, n, o);
  }
}

template <int NR, int MB, bool kGroup>
void act_range_vnni(const QX& a, const QW& w, const float* bias, float* out, int64_t M, int64_t N, int64_t n0,
                    int64_t n1) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      act_tile_mb<NR, MB, kGroup>(mb, a, m, w, n, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      act_tile_mb<1, MB, kGroup>(mb, a, m, w, n, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}

template <bool kGroup>
void act_range_vnni_by_m(const QX& a, const QW& w, const float* bias, float* out, int64_t M, int64_t N, int64_t n0,
                         int64_t n1) {
  if (M == 1)
    act_range_vnni<4, 1, kGroup>(a, w, bias, out, M, N, n0, n1);
  else if (M == 2)
    act_range_vnni<4, 2, kGroup>(a, w, bias, out, M, N, n0, n1);
  else
    act_range_vnni<3, 4, kGroup>(a, w, bias, out, M, N, n0, n1);
}
#pragma GCC pop_options
#endif

// Whether GPTFAST_SKINNY_ISA (read at each call, so a test can switch it) forces the 8-lane kernel.
bool isa_forced_generic() {
  const char* e = std::getenv("GPTFAST_SKINNY_ISA");
  return e != nullptr && (std::strcmp(e, "avx2") == 0 || std::strcmp(e, "generic") == 0);
}

bool use_avx512() {
#ifdef GPTFAST_QUANT_AVX512
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return cpu && !isa_forced_generic();
#else
  return false;
#endif
}

bool use_vnni() {
#ifdef GPTFAST_QUANT_AVX512
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni");
  return cpu && !isa_forced_generic();
#else
  return false;
#endif
}

// Weight rows per task (as skinny_linear's grain_rows): >= ~64K multiply-adds, a multiple of 8.
int64_t grain_rows(int64_t M, int64_t K) {
  const int64_t g = (int64_t{1} << 16) / std::max<int64_t>(1, M * K);
  return std::max<int64_t>(8, (g + 7) / 8 * 8);
}

// Rows [n0, n1) of the dequantized weight into dst ((n1 - n0) x K fp32), bit for bit
// gptfast.ops.quant.dequantize_weight's fp32 values.
void dequant_rows(int F, const QW& w, int64_t n0, int64_t n1, int64_t K, float* dst) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = w.q + n * w.ldq;
    float* d = dst + (n - n0) * K;
    if (F == kI8C) {
      const float s = w.scale_c[n];
      for (int64_t k = 0; k < K; ++k) d[k] = static_cast<float>(static_cast<int8_t>(q[k])) * s;
    } else if (F == kI8G) {
      for (int64_t g = 0; g < w.G; ++g) {
        const float s = h2f(w.scale[n * w.G + g]);
        for (int64_t i = 0; i < w.group; ++i)
          d[g * w.group + i] = static_cast<float>(static_cast<int8_t>(q[g * w.group + i])) * s;
      }
    } else {
      for (int64_t b = 0; b < K / 32; ++b) {
        const int64_t g = b * 32 / w.group;
        const float s = h2f(w.scale[n * w.G + g]);
        const float z = F == kI4Z ? h2f(w.zero[n * w.G + g]) : 0.f;
        for (int j = 0; j < 16; ++j) {
          const uint8_t v = q[b * 16 + j];
          const float lo = static_cast<float>(static_cast<int>(v & 15) - 8) * s;
          const float hi = static_cast<float>(static_cast<int>(v >> 4) - 8) * s;
          d[b * 32 + j] = F == kI4Z ? lo + z : lo;
          d[b * 32 + 16 + j] = F == kI4Z ? hi + z : hi;
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                  int64_t group_size, bool act_int8) {
  TORCH_CHECK(bits == 8 || bits == 4, kOp, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % 32 == 0), kOp,
              ": group_size must be 0 (per output channel) or a positive multiple of 32, got ", group_size);
  TORCH_CHECK(bits == 8 || group_size > 0, kOp, ": int4 (bits=4) is group-wise only: group_size must be > 0, got ",
              group_size);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, kOp, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(qweight.device().is_cpu(), kOp, ": qweight must be a CPU tensor, got device ", qweight.device());
  const auto qt = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK(qweight.scalar_type() == qt, kOp, ": qweight must be ", qt, " for bits=", bits, ", got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), kOp, ": qweight must be a contiguous 2-D tensor (N, ",
              bits == 8 ? "K" : "K/2", "), got shape ", qweight.sizes(), qweight.is_contiguous() ? "" : " (not contiguous)");
  const int64_t N = qweight.size(0), K = qweight.size(1) * (8 / bits);
  TORCH_CHECK(x.size(1) == K, kOp, ": x must have K = ", K, " columns to match qweight ", qweight.sizes(),
              " (bits=", bits, "), got shape ", x.sizes());
  TORCH_CHECK(group_size == 0 || K % group_size == 0, kOp, ": K = ", K, " must be divisible by group_size ",
              group_size);
  TORCH_CHECK(bits == 8 || K % 32 == 0, kOp, ": int4 packing needs K % 32 == 0, got K = ", K);
  TORCH_CHECK(scale.device().is_cpu() && scale.is_contiguous(), kOp, ": scale must be a contiguous CPU tensor, got ",
              scale.device(), scale.is_contiguous() ? "" : " (not contiguous)");
  if (group_size == 0) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N, kOp,
                ": scale must be float32 of shape (", N, ") (per output channel), got ", scale.scalar_type(), " ",
                scale.sizes());
  } else {
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == N &&
                    scale.size(1) == K / group_size,
                kOp, ": scale must be float16 of shape (", N, ", ", K / group_size, ") (one per group of ",
                group_size, "), got ", scale.scalar_type(), " ", scale.sizes());
  }
  if (zero.has_value()) {
    TORCH_CHECK(bits == 4, kOp, ": zero is an int4 option (bits=4), got bits=", bits);
    TORCH_CHECK(zero->device().is_cpu() && zero->is_contiguous() && zero->scalar_type() == at::kHalf &&
                    zero->dim() == 2 && zero->size(0) == N && zero->size(1) == K / group_size,
                kOp, ": zero must be a contiguous float16 CPU tensor of shape (", N, ", ", K / group_size, "), got ",
                zero->scalar_type(), " ", zero->sizes(), " on ", zero->device(),
                zero->is_contiguous() ? "" : " (not contiguous)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N,
                kOp, ": bias must be a float32 CPU tensor of shape (", N, "), got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }
  if (act_int8) {
    TORCH_CHECK(bits == 8, kOp, ": act_int8 (int8 activations) is for the int8 formats (bits=8), got bits=", bits);
    TORCH_CHECK(K % 32 == 0, kOp, ": act_int8 quantizes x in blocks of 32: K must be a multiple of 32, got K = ",
                K);
  }
}

}  // namespace

at::Tensor quantized_linear(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias_,
                            int64_t bits, int64_t group_size, bool act_int8) {
  check_inputs(x_, qweight, scale, zero, bias_, bits, group_size, act_int8);
  const at::Tensor x = (x_.stride(1) == 1 || x_.size(1) <= 1) && x_.stride(0) >= x_.size(1) ? x_ : x_.contiguous();
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1), ldx = x.stride(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return bias.defined() ? out.copy_(bias.expand({M, N})) : out.zero_();
  const int F = bits == 8 ? (group_size == 0 ? kI8C : kI8G) : (zero.has_value() ? kI4Z : kI4);
  QW w{reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
       qweight.size(1),
       group_size == 0 ? scale.data_ptr<float>() : nullptr,
       group_size == 0 ? nullptr : reinterpret_cast<const uint16_t*>(scale.data_ptr()),
       zero.has_value() ? reinterpret_cast<const uint16_t*>(zero->data_ptr()) : nullptr,
       group_size == 0 ? 0 : K / group_size,
       group_size,
       std::max<int64_t>(16, GPTFAST_QPF_BYTES / std::max<int64_t>(1, qweight.size(1))) * qweight.size(1)};
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();

  if (act_int8) {
    std::vector<uint8_t> ux(static_cast<size_t>(M * K));
    std::vector<float> dx(static_cast<size_t>(M * (K / 32)));
    quantize_x(xp, ldx, M, K, ux.data(), dx.data());
    const QX a{ux.data(), dx.data(), K, K / 32};
    const bool group = group_size != 0;
    const bool vnni = use_vnni();
    at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
#ifdef GPTFAST_QUANT_AVX512
      if (vnni) {
        if (group)
          act_range_vnni_by_m<true>(a, w, bp, op, M, N, n0, n1);
        else
          act_range_vnni_by_m<false>(a, w, bp, op, M, N, n0, n1);
        return;
      }
#endif
      act_range_generic(a, w, group, bp, op, M, N, n0, n1);
    });
    return out;
  }

  if (M <= kSkinnyMaxM) {
    const bool avx512 = use_avx512();
    at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
#ifdef GPTFAST_QUANT_AVX512
      if (avx512) {
        range_avx512_fmt(F, xp, ldx, w, bp, op, M, N, K, n0, n1);
        return;
      }
#endif
      grange_fmt(F, xp, ldx, w, bp, op, M, N, K, n0, n1);
    });
    return out;
  }

  // Prefill: dequantize ~1 MB tiles of weight rows, multiply each by all rows of x (see the header).
  const int64_t nt = std::max<int64_t>(64, std::min<int64_t>(1024, (int64_t{1} << 20) / (4 * K))) / 16 * 16;
  at::Tensor buf = at::empty({std::min(nt, N), K}, x.options());
  float* bufp = buf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += nt) {
    const int64_t rows = std::min(nt, N - n0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { dequant_rows(F, w, n0 + r0, n0 + r1, K, bufp + r0 * K); });
    const at::Tensor tile = buf.narrow(0, 0, rows);
    const at::Tensor y = bias.defined() ? at::addmm(bias.narrow(0, n0, rows), x, tile.t()) : at::mm(x, tile.t());
    out.narrow(1, n0, rows).copy_(y);
  }
  return out;
}

at::Tensor quantized_embedding(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                               int64_t bits, int64_t group_size, const at::Tensor& idx) {
  const int64_t K = qweight.size(1) * (8 / bits), V = qweight.size(0);
  check_inputs(at::empty({0, K}, at::kFloat), qweight, scale, zero, c10::nullopt, bits, group_size, false);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, kOp, ": idx must be 1-D int64, got ",
              idx.scalar_type(), " ", idx.sizes());
  const at::Tensor ix = idx.contiguous();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int64_t B = ix.size(0);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ip[b] >= 0 && ip[b] < V, kOp, ": idx[", b, "] must be in [0, ", V, "), got ", ip[b]);
  const int F = bits == 8 ? (group_size == 0 ? kI8C : kI8G) : (zero.has_value() ? kI4Z : kI4);
  const QW w{reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
             qweight.size(1),
             group_size == 0 ? scale.data_ptr<float>() : nullptr,
             group_size == 0 ? nullptr : reinterpret_cast<const uint16_t*>(scale.data_ptr()),
             zero.has_value() ? reinterpret_cast<const uint16_t*>(zero->data_ptr()) : nullptr,
             group_size == 0 ? 0 : K / group_size,
             group_size,
             0};
  at::Tensor out = at::empty({B, K}, qweight.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) dequant_rows(F, w, ip[b], ip[b] + 1, K, out.data_ptr<float>() + b * K);
  return out;
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("quantized_linear", &gptfast::quantized_linear); }
