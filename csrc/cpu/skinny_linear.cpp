// Linear for a few rows on CPU: y = x w^T + b with x (M, K), w (N, K) (nn.Linear layout), M small.
//
// Batched decoding multiplies a handful of activation rows (one per sequence) by every weight
// matrix. That is memory bound: each weight should be streamed from DRAM exactly once per call,
// and the arithmetic (M dot products per weight row) hidden under the stream. ATen's addmm (MKL
// sgemm on this CPU) does not manage that for 2 <= M <= 16: it packs / blocks for large GEMMs
// and, for (8, 768) x (768, 50257), took ~38 ms where streaming the 154 MB weight takes ~10 ms.
//
// Algorithm (fp32 x; weights fp32, or bf16 = weight-only bf16 with fp32 math):
// - Parallel over N (at::parallel_for): each thread owns one contiguous range of weight rows, so
//   it streams its part of the weight sequentially and writes its own columns of y; no reductions
//   across threads.
// - AVX-512 CPUs (CPUID avx512f/bw/vl at run time; code compiled with a target pragma, so the
//   portable wheel has it too): tiles of NR weight rows x MB rows of x whose NR * MB dot products
//   stay in zmm accumulators (16 lanes) for the whole K loop, so each weight element is loaded once
//   per tile and used for all MB rows. NR x MB by M: 8 x 1 (M = 1: eight concurrent row streams),
//   8 x 2, 6 x 4 (M = 3..4), 3 x 8 (M >= 5; M > 8 makes several passes over each 3-row tile, which
//   are then in L1 / L2). The K % 16 tail is one masked step.
// - Other CPUs (AVX2, e.g. Zen 3; or GPTFAST_SKINNY_ISA=generic / avx2, used by the tests): four
//   weight rows x two x rows per tile, 8 independent 8-lane FMA chains (GCC vectors; target_clones
//   in the portable build), scalar K % 8 tail. Four weight rows in flight streamed ~1.5x faster
//   than two rows x four x rows on the Zen 3 VM.
// - x (M x K floats, 24 KB for M = 8) stays in L1 / L2 across all weight rows, so the weight is
//   read from memory once whatever M is.
// - Software prefetch, PF_ROWS weight rows ahead, one per cache line of each row (see tile_4xMB).
//   Without it the stream fell behind DRAM as soon as the arithmetic per byte grew: GPT-2's head
//   (768 -> 50257, 2 threads, Zen 3 VM, 8-lane kernel) took 9.2 / 10.0 / 13.5 / 20.3 ms at M = 2 /
//   4 / 8 / 16 against 6.7 at M = 1; with it 6.7 / 7.0 / 8.5 / 13.2.
// - bf16 weights: each element is widened to fp32 exactly (a 16-bit shift: vpmovzxwd + vpslld) and
//   accumulated in fp32, so y equals x @ w.float().T up to the summation order, with half the bytes
//   streamed. bf16 x bf16 dot products (avx512_bf16's vdpbf16ps, which rounds x to bf16) only when
//   asked for with GPTFAST_BF16_DOT=1 (see range_dot).
// - Bias is added when the dot products are stored. An optional epilogue runs on each thread's
//   column range right after it is computed (gelu_mlp uses it to apply GELU while the
//   pre-activation is still in cache).
//
// Measured (benchmarks/dev/skinny_variants.py; raw output in benchmarks/dev/skinny_variants_results.txt):
// every variant checked against fp64, then timed interleaved with the previous kernel (the 8-lane
// one, then used on every CPU), median of 31 repeats, 2 threads, each call on a different weight copy
// so that it streams from DRAM; GPT-2 124M decode shapes 768 -> 2304 / 768 / 3072, 3072 -> 768 and
// the 768 -> 50257 head; GB/s = weight bytes / time, summed over the five shapes. 2026-11-25,
// 2-core AMD EPYC Zen 4 VM shared with other jobs (load average 2-4; measure_read_bandwidth drifted
// 26 -> 43 GB/s within one run), so the interleaved ratios are the result, the levels indicative.
// Two consecutive runs, this kernel vs the 8-lane one:
//   M                1            2            4            8            16
//   fp32 GB/s   31.6 / 43.5  31.2 / 38.8  40.4 / 42.3  26.0 / 24.4  16.0 / 15.5
//        ratio  1.19 / 1.51  1.28 / 1.56  1.77 / 1.84  1.58 / 1.50  1.64 / 1.59
//   bf16 GB/s   36.8 / 29.5  27.8 / 25.7  26.7 / 25.3  16.0 / 15.5   9.3 /  9.0
//        ratio  1.77 / 1.47  1.47 / 1.43  1.49 / 1.48  1.31 / 1.30  1.30 / 1.30
// (read bandwidth 29.6 -> 42.6 GB/s in run 1, 38.4 -> 30.3 in run 2.) At M >= 8 the tile is bound
// by the FMAs, not the memory: bf16 M = 8 at 16 GB/s is 2 G zmm FMAs / s per core, over half of
// Zen 4's one 512-bit FMA per cycle, with 11 loads per 24 FMAs. Also tried, slower or within the
// noise: 4 x 1, 4 x 2, 4 x 4, 2 x 8, 4 x 6 tiles; prefetch 32 or 48 rows ahead; NTA prefetch; for
// bf16 one 512-bit load of 32 elements widened by shift / mask against a deinterleaved x (no
// vpmovzxwd): <= 1.07x with T0 prefetch, not retried with T1. avx512_bf16 dot products (vdpbf16ps,
// x rounded to bf16): x1.00 at M = 1, x1.70 at M = 8, x1.91 at M = 16 for bf16 weights, but they
// change the arithmetic, so only as the opt-in GPTFAST_BF16_DOT=1 (see range_dot).
//
// fp64 (gradcheck-style tests): plain loops, accumulating in double.
#include "skinny_linear.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace gptfast {
namespace {

// A weight element as fp32. bf16 is the top half of an fp32 (same exponent), so widening is a
// 16-bit shift: exact, and cheap on any x86-64 (no avx512_bf16 needed).
GPTFAST_INLINE float wload(float v) { return v; }
GPTFAST_INLINE float wload(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Eight weight elements as fp32 lanes.
GPTFAST_INLINE Vf vload_w(const float* p) { return vload(p); }
GPTFAST_INLINE Vf vload_w(const uint16_t* p) {
#if defined(__AVX2__)
  // One vpmovzxwd ymm + one shift (GCC lowers the generic version below to two 128-bit halves).
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<Vf>(_mm256_castsi256_ps(u));
#else
  typedef uint16_t Vh __attribute__((vector_size(16)));
  typedef uint32_t Vu __attribute__((vector_size(32)));
  Vh h;
  std::memcpy(&h, p, sizeof h);
  const Vu u = __builtin_convertvector(h, Vu) << 16;
  Vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Software prefetch distance, in weight rows ahead of the tile (measured on this project's Zen 3
// VM, GPT-2 head 768 -> 50257, 2 threads; bf16 M = 1: 6.2 ms without, 4.4 / 4.1 / 3.9 ms at 4 / 8
// / 16 rows; fp32 M = 8: see the header comment). Out-of-range prefetches (past a thread's range
// or the matrix) are harmless: a prefetch never faults.
#ifndef GPTFAST_PF_ROWS
#define GPTFAST_PF_ROWS 16
#endif

// Dot products of MB (1 or 2) rows of x (ldx apart) with four weight rows (ldw apart, K elements
// each, fp32 or bf16 bits): o[r * 4 + j] = x_r . w_j, accumulated in fp32 with 4 x MB independent
// 8-lane FMA chains. Per cache line of each weight row, the line PF_ROWS rows further on is
// prefetched: the hardware prefetchers alone keep too few lines in flight once the arithmetic per
// byte grows (bf16 widening; two x rows), and the stream then runs well below the DRAM bandwidth.
// The K % 8 tail is scalar.
template <int MB, typename W>
GPTFAST_INLINE void tile_4xMB(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw,
                              int64_t K, float* o) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per 64-byte line: 16 fp32, 32 bf16
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
    for (int j = 0; j < 4; ++j) __builtin_prefetch(w + (GPTFAST_PF_ROWS + j) * ldw + k, 0, 3);
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

// Columns [n0, n1) of out (M, N) for all M rows.
template <typename W>
GPTFAST_INLINE void skinny_range(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out,
                                 int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[8];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nb = std::min<int64_t>(4, n1 - n);  // weight rows in this tile
    const W* wt = w + n * ldw;
    if (nb < 4) {
      // 1..3 rows left (only at the end of a range): one row at a time (a tile of 4 would read
      // past the weight), with the row stride 0 so that the tile's four rows are all this row.
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

GPTFAST_CLONES
void skinny_range_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                      int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  skinny_range<float>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}

GPTFAST_CLONES
void skinny_range_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                        int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  skinny_range<uint16_t>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}

// ------------------------------------------------------------------------ AVX-512 tiles
//
// Compiled for AVX-512 whatever the build flags (a target pragma: also in the portable wheel build)
// and used only where CPUID reports avx512f/bw/vl (see use_avx512). NR weight rows x MB x rows per
// tile, all NR * MB dot products in zmm accumulators (16 lanes); x rows are re-read from L1 per
// tile, weight rows are read once per tile for all its MB rows. The K % 16 tail is one masked step
// (no scalar loop). Prefetch as in tile_4xMB, in the first pass over a tile only (later passes, for
// M > MB, find the rows in cache), but into L2 (hint T1), not L1: measured x1.05-1.26 at M <= 4
// (fp32 M = 1: 35.8 -> 44.9 GB/s in the quietest run), neutral at M = 8, 16 - with PF_ROWS = 16
// rows of 8 in flight, T0 prefetches (24-48 KB ahead) evicted the current tile from the 32 KB L1.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GPTFAST_SKINNY_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

GPTFAST_INLINE __m512 w16(const float* p) { return _mm512_loadu_ps(p); }
GPTFAST_INLINE __m512 w16(const uint16_t* p) {  // 16 bf16 -> fp32: vpmovzxwd zmm + shift (exact)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
GPTFAST_INLINE __m512 w16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
GPTFAST_INLINE __m512 w16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// 16 columns k..k+15 (masked to `mask` when kMask) of MB x rows times NR weight rows into acc.
template <int NR, int MB, typename W, bool kMask>
GPTFAST_INLINE void step16(__m512 (&acc)[MB][NR], const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
                           __mmask16 mask) {
  __m512 u[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) u[j] = kMask ? w16(w + j * ldw + k, mask) : w16(w + j * ldw + k);
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r) {
    const __m512 p = kMask ? _mm512_maskz_loadu_ps(mask, x + r * ldx + k) : _mm512_loadu_ps(x + r * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(p, u[j], acc[r][j]);
  }
}

// o[r * NR + j] = x_r . w_j for r < MB, j < NR.
template <int NR, int MB, bool kPf, typename W>
GPTFAST_INLINE void tile512(const float* __restrict x, int64_t ldx, const W* __restrict w, int64_t ldw, int64_t K,
                            float* o) {
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per 64-byte line: 16 fp32, 32 bf16
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    if constexpr (kPf) {
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (GPTFAST_PF_ROWS + j) * ldw + k), _MM_HINT_T1);
    }
#pragma GCC unroll 2
    for (int64_t kk = k; kk < k + kLine; kk += 16) step16<NR, MB, W, false>(acc, x, ldx, w, ldw, kk, 0);
  }
  for (; k + 16 <= K; k += 16) step16<NR, MB, W, false>(acc, x, ldx, w, ldw, k, 0);
  if (k < K) step16<NR, MB, W, true>(acc, x, ldx, w, ldw, k, __mmask16((1u << (K - k)) - 1u));
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}

// mb (1..MB) rows picked at run time; the prefetching instance on a tile's first pass.
template <int NR, int MB, typename W>
GPTFAST_INLINE void tile512_mb(int64_t mb, bool first, const float* x, int64_t ldx, const W* w, int64_t ldw,
                               int64_t K, float* o) {
  if (mb == MB) {
    if (first)
      tile512<NR, MB, true, W>(x, ldx, w, ldw, K, o);
    else
      tile512<NR, MB, false, W>(x, ldx, w, ldw, K, o);
  } else if constexpr (MB > 1) {
    tile512_mb<NR, MB - 1, W>(mb, first, x, ldx, w, ldw, K, o);
  }
}

// Columns [n0, n1) of out for all M rows: NR-row tiles, then the last n1 - n0 mod NR rows one by one.
template <int NR, int MB, typename W>
void range512(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
              int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile512_mb<NR, MB, W>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile512_mb<1, MB, W>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}

// Tile shape by M (NR x MB <= 24 accumulators of the 32 zmm registers), measured with
// benchmarks/dev/skinny_variants.py (see the header comment): M = 1: 8 x 1 (eight weight rows in
// flight); M = 2: 8 x 2; M = 3..4: 6 x 4; M >= 5: 3 x 8 (M > 8: several passes over each 3-row tile,
// from L1 / L2).
template <typename W>
void range_avx512(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, int64_t n0, int64_t n1) {
  if (M == 1)
    range512<8, 1, W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else if (M == 2)
    range512<8, 2, W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else if (M <= 4)
    range512<6, 4, W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else
    range512<3, 8, W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}
#pragma GCC pop_options

// ------------------------------------------------------------------------ opt-in bf16 dot products
//
// GPTFAST_BF16_DOT=1 (default off; bf16 weights only; CPUs with avx512_bf16): x is rounded to
// bf16 (round to nearest even, vcvtneps2bf16) once per call and every pair of products is computed
// by vdpbf16ps (bf16 x bf16 -> fp32 accumulate): twice the multiply-adds per instruction and no
// widening, which matters where the tile is FMA-bound (M >= 8). This CHANGES THE ARITHMETIC: y is
// exact for the bf16-rounded x, so its error against x @ w.float().T is up to 2^-8 of sum |x w|
// (measured 2.5e-3 of max sum |x w| over the tests' shapes; the default path: ~1e-7). Measured
// (benchmarks/dev/skinny_variants.py, variant v5 vs the default tile, interleaved): M = 1 x1.00,
// M = 8 x1.70, M = 16 x1.91.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

// 32 columns k..k+31 of MB bf16 x rows (zero-padded to a multiple of 32) times NR bf16 weight rows.
template <int NR, int MB, bool kMask, bool kPf>
GPTFAST_INLINE void step_dot(__m512 (&acc)[MB][NR], const uint16_t* x, int64_t ldx, const uint16_t* w,
                             int64_t ldw, int64_t k, __mmask32 mask) {
  __m512i u[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) {
    if constexpr (kPf) _mm_prefetch(reinterpret_cast<const char*>(w + (GPTFAST_PF_ROWS + j) * ldw + k), _MM_HINT_T1);
    u[j] = kMask ? _mm512_maskz_loadu_epi16(mask, w + j * ldw + k) : _mm512_loadu_si512(w + j * ldw + k);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r) {
    const __m512i p = _mm512_loadu_si512(x + r * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)p, (__m512bh)u[j]);
  }
}

template <int NR, int MB, bool kPf>
GPTFAST_INLINE void tile_dot(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t K, float* o) {
  __m512 acc[MB][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step_dot<NR, MB, false, kPf>(acc, x, ldx, w, ldw, k, 0);
  if (k < K) step_dot<NR, MB, true, false>(acc, x, ldx, w, ldw, k, __mmask32((1u << (K - k)) - 1u));
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) o[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int NR, int MB>
GPTFAST_INLINE void tile_dot_mb(int64_t mb, bool first, const uint16_t* x, int64_t ldx, const uint16_t* w,
                                int64_t ldw, int64_t K, float* o) {
  if (mb == MB) {
    if (first)
      tile_dot<NR, MB, true>(x, ldx, w, ldw, K, o);
    else
      tile_dot<NR, MB, false>(x, ldx, w, ldw, K, o);
  } else if constexpr (MB > 1) {
    tile_dot_mb<NR, MB - 1>(mb, first, x, ldx, w, ldw, K, o);
  }
}

template <int NR, int MB>
void range_dot(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
               int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  float o[MB * NR];
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_dot_mb<NR, MB>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, o);
      for (int64_t r = 0; r < mb; ++r)
        for (int j = 0; j < NR; ++j) out[(m + r) * N + n + j] = o[r * NR + j] + (bias ? bias[n + j] : 0.f);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += MB) {
      const int64_t mb = std::min<int64_t>(MB, M - m);
      tile_dot_mb<1, MB>(mb, m == 0, x + m * ldx, ldx, w + n * ldw, ldw, K, o);
      for (int64_t r = 0; r < mb; ++r) out[(m + r) * N + n] = o[r] + (bias ? bias[n] : 0.f);
    }
  }
}

// Same tile shapes by M as range_avx512.
void range_dot_by_m(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                    int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  if (M == 1)
    range_dot<8, 1>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else if (M == 2)
    range_dot<8, 2>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else if (M <= 4)
    range_dot<6, 4>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
  else
    range_dot<3, 8>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
}

// x (M rows, ldx apart) rounded to bf16 (RNE; NaN stays NaN) into xb, rows ldb (a multiple of 32,
// >= K) apart, zero-padded.
void round_x_bf16(const float* x, int64_t ldx, int64_t M, int64_t K, uint16_t* xb, int64_t ldb) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < ldb; k += 16) {
      const __mmask16 msk = k + 16 <= K ? __mmask16(0xFFFF) : k < K ? __mmask16((1u << (K - k)) - 1u) : __mmask16(0);
      const __m512 v = _mm512_maskz_loadu_ps(msk, x + m * ldx + k);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(xb + m * ldb + k, &h, 32);
    }
  }
}
#pragma GCC pop_options
#endif

// Whether GPTFAST_BF16_DOT=1 asks for the bf16 dot products and the CPU has them (read at
// each call; see range_dot). Without avx512_bf16 the variable is ignored (the default arithmetic).
bool use_bf16_dot() {
#ifdef GPTFAST_SKINNY_AVX512
  const char* e = std::getenv("GPTFAST_BF16_DOT");
  if (e == nullptr || std::strcmp(e, "1") != 0) return false;
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return cpu;
#else
  return false;
#endif
}

// Whether to use the AVX-512 tiles: CPUID says avx512f/bw/vl, and GPTFAST_SKINNY_ISA (read at each
// call, so a test can switch it) is not "avx2" / "generic" (which force the 8-lane kernel above, the
// path of AVX2-only machines).
bool use_avx512() {
#ifdef GPTFAST_SKINNY_AVX512
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  if (!cpu) return false;
  const char* e = std::getenv("GPTFAST_SKINNY_ISA");
  return e == nullptr || (std::strcmp(e, "avx2") != 0 && std::strcmp(e, "generic") != 0);
#else
  return false;
#endif
}

void skinny_f64(const double* x, int64_t ldx, const double* w, int64_t ldw, const double* bias, double* out,
                int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * w[n * ldw + k];
      out[m * N + n] = bias ? s + bias[n] : s;
    }
  }
}

// Weight rows per task: enough work (>= ~64K multiply-adds) to be worth a thread, and even so
// that the pairs of the tile do not straddle two threads' ranges needlessly.
int64_t grain_rows(int64_t M, int64_t K) {
  const int64_t g = (int64_t{1} << 16) / std::max<int64_t>(1, M * K);
  return std::max<int64_t>(8, (g + 7) / 8 * 8);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "skinny_linear";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() ||
                  (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16),
              op, ": weight must have x's dtype ", x.scalar_type(),
              " (or bfloat16 with float32 x: bf16 weights, fp32 math), got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape (N, ", x.size(1), ") to match x ",
              x.sizes(), ", got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got device ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), "), got ", bias->sizes());
  }
}

// A 2-D view with inner stride 1 (any row stride) as is; anything else copied contiguous.
at::Tensor rows_unit_stride(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

}  // namespace

bool bf16_dot_enabled() { return use_bf16_dot(); }

namespace {

// Parallel over the N weight rows (see the header comment); W picks the multi-versioned range kernel.
template <typename W>
void skinny_parallel(const float* x, int64_t ldx, const W* w, int64_t ldw, const float* bias, float* out, int64_t M,
                     int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  if (M <= 0 || N <= 0) return;
#ifdef GPTFAST_SKINNY_AVX512
  if constexpr (std::is_same_v<W, uint16_t>) {
    if (use_bf16_dot()) {
      const int64_t ldb = (K + 31) / 32 * 32;
      std::vector<uint16_t> xb(static_cast<size_t>(M * ldb));
      round_x_bf16(x, ldx, M, K, xb.data(), ldb);
      at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
        range_dot_by_m(xb.data(), ldb, w, ldw, bias, out, M, N, K, n0, n1);
        if (epilogue) epilogue(n0, n1);
      });
      return;
    }
  }
#endif
  const bool avx512 = use_avx512();
  at::parallel_for(0, N, grain_rows(M, K), [&](int64_t n0, int64_t n1) {
#ifdef GPTFAST_SKINNY_AVX512
    if (avx512) {
      range_avx512<W>(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
      if (epilogue) epilogue(n0, n1);
      return;
    }
#endif
    if constexpr (std::is_same_v<W, float>) {
      skinny_range_f32(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    } else {
      skinny_range_bf16w(x, ldx, w, ldw, bias, out, M, N, K, n0, n1);
    }
    if (epilogue) epilogue(n0, n1);
  });
}

}  // namespace

void skinny_linear_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* out,
                       int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  skinny_parallel(x, ldx, w, ldw, bias, out, M, N, K, epilogue);
}

void skinny_linear_bf16w(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& epilogue) {
  skinny_parallel(x, ldx, w, ldw, bias, out, M, N, K, epilogue);
}

at::Tensor skinny_linear(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_) {
  check_inputs(x_, weight_, bias_);
  const at::Tensor x = rows_unit_stride(x_);
  const at::Tensor weight = rows_unit_stride(weight_);
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (weight.scalar_type() == at::kBFloat16 && M > kSkinnyMaxM && !use_bf16_dot()) {
    // Many rows without the bf16 dot products: a GEMM (MKL / oneDNN) on the exactly widened weight
    // beats streaming the weight once per 8 rows here (the Python dispatch sends many rows only
    // when GPTFAST_BF16_DOT=1 asks; this keeps a CPU without avx512_bf16 at GEMM speed).
    return bias.defined() ? at::addmm(bias, x, weight.to(at::kFloat).t()) : at::mm(x, weight.to(at::kFloat).t());
  }
  if (weight.scalar_type() == at::kBFloat16) {
    skinny_linear_bf16w(x.data_ptr<float>(), x.stride(0), reinterpret_cast<const uint16_t*>(weight.data_ptr()),
                        weight.stride(0), bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), M,
                        N, K);
  } else if (x.scalar_type() == at::kFloat) {
    skinny_linear_f32(x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(), weight.stride(0),
                      bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K);
  } else {
    const double* xp = x.data_ptr<double>();
    const double* wp = weight.data_ptr<double>();
    const double* bp = bias.defined() ? bias.data_ptr<double>() : nullptr;
    double* op = out.data_ptr<double>();
    const int64_t ldx = x.stride(0), ldw = weight.stride(0);
    at::parallel_for(0, N, grain_rows(M, K),
                     [&](int64_t n0, int64_t n1) { skinny_f64(xp, ldx, wp, ldw, bp, op, M, N, K, n0, n1); });
  }
  return out;
}

}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("skinny_linear", &gptfast::skinny_linear); }
