// Launch arithmetic and launcher declarations of gptfast's CUDA kernels.
//
// Everything above the `GPTFAST_LAUNCH_MATH_ONLY` guard is plain C++17 (no CUDA headers): the grid
// / block / shared-memory / split arithmetic that the launchers in csrc/cuda/*.cu use, and the
// row/tile range helpers the kernels themselves call (`GPTFAST_HD` = __host__ __device__ under
// nvcc). tests/test_cuda_launch_math.py compiles this header with g++ alone and checks the same
// functions the kernels run: coverage of every row / key / element exactly once, block sizes,
// shared-memory budgets, grid limits.
//
// Below the guard: the launchers. Each takes raw device pointers, sizes, strides and a stream,
// launches its kernel(s) on that stream and returns cudaGetLastError() (cudaErrorInvalidValue for
// an unsupported size before launching anything). Torch bindings live in csrc/cuda/bindings.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define GPTFAST_HD __host__ __device__ __forceinline__
#else
#define GPTFAST_HD inline
#endif

namespace gptfast {
namespace cuda {

// ---------------------------------------------------------------------------- common

struct Dims {
  int64_t x = 1, y = 1, z = 1;
};

struct Launch {
  Dims grid, block;
  size_t smem = 0;  // dynamic shared memory bytes
};

// Hardware limits the arithmetic is checked against (sm_80 / sm_90).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;  // per block without cudaFuncSetAttribute opt-in
// None of the launchers opts in to more than the default: every kernel fits in 48 KB, so no
// cudaFuncSetAttribute call is needed (and the same binary runs on sm_80's 163 KB / sm_90's 227 KB).

GPTFAST_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
GPTFAST_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// True if a launch configuration is legal without attribute opt-ins.
inline bool launch_fits(const Launch& l) {
  const int64_t threads = l.block.x * l.block.y * l.block.z;
  return l.grid.x >= 1 && l.grid.y >= 1 && l.grid.z >= 1 && l.grid.x <= kMaxGridX && l.grid.y <= kMaxGridYZ &&
         l.grid.z <= kMaxGridYZ && threads >= 1 && threads <= kMaxThreads && threads % 32 == 0 &&
         l.smem <= kDefaultSmem;
}

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Half-open range [begin, end) of rows owned by tile `idx` of size `tile` over `n` rows.
struct Range {
  int64_t begin, end;
};
GPTFAST_HD Range tile_range(int64_t idx, int64_t tile, int64_t n) {
  const int64_t b = idx * tile;
  const int64_t e = b + tile < n ? b + tile : n;
  return Range{b, e};
}

// (B, H, T, D) tensors with a unit stride on D; the other strides are free (a (B, T, H, D) buffer
// viewed as (B, H, T, D), as GPT-2's qkv split produces, needs no copy).
struct BHTStrides {
  int64_t b, h, t;
};

// ---------------------------------------------------------------------------- causal attention
//
// Forward (csrc/cuda/attention.cu): one block per (b*h, 64-row query tile). A query row is owned by
// D / dpt threads, each holding dpt of its dims (interleaved: thread s owns dims s, s + tpr, ...),
// so a warp reading one K row from shared memory touches tpr consecutive banks, conflict-free.
constexpr int kAttnFwdBlockM = 64;  // query rows per block
constexpr int kAttnFwdBlockN = 32;  // keys per shared-memory tile (also the score registers per thread)
// Backward: dK/dV per 32-key block (looping over query tiles), dQ per 32-row block (looping over
// key tiles): two kernels and no atomics, so gradients are deterministic.
constexpr int kAttnBwdBlockN = 32;  // keys per dK/dV block
constexpr int kAttnBwdBlockM = 32;  // query rows per shared-memory tile in the dK/dV kernel
constexpr int kAttnDqBlockM = 32;   // query rows per dQ block
constexpr int kAttnDqBlockN = 32;   // keys per shared-memory tile in the dQ kernel
constexpr int kAttnDeltaRowsPerBlock = 8;  // delta = rowsum(dO * O): one warp per row

inline bool attn_head_dim_supported(int64_t D) { return D == 16 || D == 32 || D == 64 || D == 128; }
// Dims per thread: forward / dQ hold q and acc (2 x dpt fp32 registers) + 32 scores.
GPTFAST_HD int attn_fwd_dpt(int D) { return D < 32 ? D : 32; }
// dK/dV holds k, v, dk, dv slices (4 x dpt registers): 16 dims per thread keeps it < 128 registers.
GPTFAST_HD int attn_bwd_dpt(int D) { return D < 16 ? D : 16; }

// Number of key tiles of size `tile` a causal query tile ending (exclusive) at row `q_end` reads.
GPTFAST_HD int64_t attn_causal_key_tiles(int64_t q_end, int64_t tile) { return ceil_div(q_end, tile); }
// First query tile (of size `tile`) that can see key `k_begin` under the causal mask.
GPTFAST_HD int64_t attn_causal_first_q_tile(int64_t k_begin, int64_t tile) { return k_begin / tile; }

inline Launch attn_fwd_launch(int64_t BH, int64_t T, int64_t D) {
  Launch l;
  l.grid.x = BH;
  l.grid.y = ceil_div(T, kAttnFwdBlockM);
  l.block.x = int64_t(kAttnFwdBlockM) * (D / attn_fwd_dpt(int(D)));
  l.smem = 2 * size_t(kAttnFwdBlockN) * size_t(D) * sizeof(float);  // K and V tiles, fp32
  return l;
}

inline Launch attn_bwd_delta_launch(int64_t rows) {
  Launch l;
  l.grid.x = ceil_div(rows, kAttnDeltaRowsPerBlock);
  l.block.x = 32 * kAttnDeltaRowsPerBlock;
  return l;
}

inline Launch attn_bwd_dkdv_launch(int64_t BH, int64_t T, int64_t D) {
  Launch l;
  l.grid.x = BH;
  l.grid.y = ceil_div(T, kAttnBwdBlockN);
  l.block.x = int64_t(kAttnBwdBlockN) * (D / attn_bwd_dpt(int(D)));
  // Q and dO tiles (fp32) + lse and delta of those rows.
  l.smem = 2 * size_t(kAttnBwdBlockM) * size_t(D) * sizeof(float) + 2 * size_t(kAttnBwdBlockM) * sizeof(float);
  return l;
}

inline Launch attn_bwd_dq_launch(int64_t BH, int64_t T, int64_t D) {
  Launch l;
  l.grid.x = BH;
  l.grid.y = ceil_div(T, kAttnDqBlockM);
  l.block.x = int64_t(kAttnDqBlockM) * (D / attn_bwd_dpt(int(D)));
  l.smem = 2 * size_t(kAttnDqBlockN) * size_t(D) * sizeof(float);  // K and V tiles
  return l;
}

// ---------------------------------------------------------------------------- layer norm
//
// One block per row (forward) with 16-byte vector loads when the row length and every pointer
// allow it; the backward walks rows r = blockIdx.x, blockIdx.x + G, ... and accumulates dW / dB
// partials of its rows (shared memory when 2 N floats fit, else its own row of the partial buffer),
// then a second kernel sums the G partials per column in a fixed order (deterministic).
constexpr int64_t kLnMaxThreads = 256;
constexpr int64_t kLnBwdMaxBlocks = 512;  // G: enough blocks for 132 SMs x a few, few partial rows
constexpr int64_t kLnReduceCols = 32;     // reduce kernel: 32 columns x 8 row-lanes per block
constexpr int64_t kLnReduceLanes = 8;
constexpr size_t kLnScratchBytes = 2 * 32 * sizeof(float);  // block-reduction scratch (2 values x 32 warps)

// Elements per 16-byte vector for this dtype, or 1 when the rows / pointers are not aligned for it.
inline int ln_vec(int64_t N, size_t elem, bool pointers_aligned16) {
  const int v = int(16 / elem);
  return (pointers_aligned16 && (N * int64_t(elem)) % 16 == 0) ? v : 1;
}

inline int64_t ln_threads(int64_t N, int vec) {
  const int64_t units = ceil_div(N, vec);
  return min64(max64(round_up(units, 32), 32), kLnMaxThreads);
}

inline Launch ln_fwd_launch(int64_t M, int64_t N, int vec) {
  Launch l;
  l.grid.x = M;
  l.block.x = ln_threads(N, vec);
  l.smem = 0;  // static scratch only
  return l;
}

inline int64_t ln_bwd_blocks(int64_t M) { return max64(1, min64(M, kLnBwdMaxBlocks)); }
// dW/dB partials in shared memory when they fit next to the static scratch.
inline bool ln_bwd_smem_acc(int64_t N) { return 2 * size_t(N) * sizeof(float) + kLnScratchBytes <= kDefaultSmem; }

inline Launch ln_bwd_launch(int64_t M, int64_t N, int vec) {
  Launch l;
  l.grid.x = ln_bwd_blocks(M);
  l.block.x = ln_threads(N, vec);
  l.smem = ln_bwd_smem_acc(N) ? 2 * size_t(N) * sizeof(float) : 0;
  return l;
}

inline Launch ln_reduce_launch(int64_t N) {
  Launch l;
  l.grid.x = ceil_div(N, kLnReduceCols);
  l.block.x = kLnReduceCols;
  l.block.y = kLnReduceLanes;
  return l;
}

// ---------------------------------------------------------------------------- gelu epilogue
//
// Elementwise over (M, F), grid-stride: thread i handles vectors i, i + stride, ...
constexpr int64_t kGeluThreads = 256;
constexpr int64_t kGeluMaxBlocks = 65536;  // grid-stride beyond this (plenty for 132 SMs)

inline Launch gelu_launch(int64_t n, int vec) {
  Launch l;
  l.grid.x = max64(1, min64(ceil_div(ceil_div(n, vec), kGeluThreads), kGeluMaxBlocks));
  l.block.x = kGeluThreads;
  return l;
}

// ---------------------------------------------------------------------------- decode attention
//
// Split-K (flash-decoding): the cache of each (b, h) is cut into `splits` chunks of `chunk` keys;
// block (bh, s) computes unnormalised partial outputs of all Tq queries over its chunk (max, sum and
// acc in fp32), then the combine kernel merges the splits. Chunks are planned from T_max (the host
// does not read cache_lens); blocks whose chunk lies past a sequence's length exit early.
constexpr int kDecodeTile = 32;      // keys per shared-memory tile
constexpr int kDecodeThreads = 128;  // 4 warps: warp i runs query i's softmax bookkeeping
constexpr int kDecodeMaxTq = 4;
constexpr int64_t kDecodeMinChunk = 128;  // below this a split costs more than it saves
constexpr int64_t kDecodeMaxSplits = 64;

struct DecodePlan {
  int64_t splits, chunk;
};

inline DecodePlan decode_plan(int64_t BH, int64_t T_max, int64_t num_sms) {
  const int64_t want = ceil_div(2 * max64(num_sms, 1), max64(BH, 1));  // ~2 blocks per SM
  const int64_t by_len = max64(1, ceil_div(T_max, kDecodeMinChunk));
  const int64_t s = max64(1, min64(min64(want, by_len), kDecodeMaxSplits));
  DecodePlan p;
  p.chunk = round_up(ceil_div(T_max, s), kDecodeTile);
  p.splits = ceil_div(T_max, p.chunk);  // rounding the chunk up may leave fewer splits
  return p;
}

// Shared memory of a split block, in floats: q (Tq, D), K tile (TILE, D + 1: the pad makes the
// per-thread dot products over a row conflict-free), V tile (TILE, D), scores (Tq, TILE),
// and per-query running max / sum / rescale (3 x Tq).
inline size_t decode_smem(int64_t D) {
  const size_t f = size_t(kDecodeMaxTq) * D + size_t(kDecodeTile) * (D + 1) + size_t(kDecodeTile) * D +
                   size_t(kDecodeMaxTq) * kDecodeTile + 3 * size_t(kDecodeMaxTq);
  return f * sizeof(float);
}

inline Launch decode_split_launch(int64_t BH, const DecodePlan& p, int64_t D) {
  Launch l;
  l.grid.x = BH;
  l.grid.y = p.splits;
  l.block.x = kDecodeThreads;
  l.smem = decode_smem(D);
  return l;
}

// Workspace (fp32 elements): acc (splits, BH, Tq, D) then (max, sum) (splits, BH, Tq, 2).
inline int64_t decode_workspace_floats(int64_t BH, int64_t Tq, int64_t D, const DecodePlan& p) {
  return p.splits * BH * Tq * (D + 2);
}

inline Launch decode_combine_launch(int64_t BH, int64_t Tq, int64_t D) {
  Launch l;
  l.grid.x = BH * Tq;
  l.block.x = round_up(D, 32);
  return l;
}

// ---------------------------------------------------------------------------- sampling
//
// One block per row; every pass over the vocabulary is a block-strided loop (thread t reads
// t, t + threads, ...), reductions in a fixed order, so a row's result is deterministic.
constexpr int64_t kSampleThreads = 512;

inline Launch sample_launch(int64_t B, int64_t V) {
  Launch l;
  l.grid.x = B;
  l.block.x = min64(kSampleThreads, max64(32, round_up(V, 32)));
  return l;
}

// ---------------------------------------------------------------------------- quantized linear
//
// Decode GEMV with int8 / packed int4 weights (quant_linear.cu): one warp per output column n
// (a row of the weight), kQLinWarps warps per block; grid.y walks the x rows in chunks of
// kQLinMaxRows (each warp keeps one fp32 accumulator per row of its chunk in registers).
constexpr int kQLinWarps = 4;
constexpr int64_t kQLinMaxRows = 16;

// Rows per chunk for M rows: the smallest of 1, 2, 4, 8, 16 holding min(M, 16) (the kernel's template).
inline int qlin_rows(int64_t M) {
  int r = 1;
  while (r < kQLinMaxRows && r < M) r *= 2;
  return r;
}

inline Launch qlin_launch(int64_t M, int64_t N) {
  Launch l;
  l.grid.x = max64(1, ceil_div(N, kQLinWarps));
  l.grid.y = max64(1, ceil_div(M, qlin_rows(M)));
  l.block.x = 32 * kQLinWarps;
  return l;
}

}  // namespace cuda
}  // namespace gptfast

#ifndef GPTFAST_LAUNCH_MATH_ONLY
#include <cuda_runtime_api.h>

namespace gptfast {
namespace cuda {

// q, k, v: (B, H, T, D) with strides sq / sk / sv (unit D stride). out: (B, H, T, D) contiguous;
// lse: (B, H, T) fp32. D must satisfy attn_head_dim_supported.
cudaError_t attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                          int64_t B, int64_t H, int64_t T, int64_t D, BHTStrides sq, BHTStrides sk, BHTStrides sv,
                          float scale, cudaStream_t stream);

// dout, out, dq, dk, dv: (B, H, T, D) contiguous; q, k, v strided as in the forward; lse: (B, H, T).
// delta: (B, H, T) fp32 scratch.
cudaError_t attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                          const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t B,
                          int64_t H, int64_t T, int64_t D, BHTStrides sq, BHTStrides sk, BHTStrides sv, float scale,
                          cudaStream_t stream);

// x, y: (M, N) contiguous; weight, bias: (N,) or nullptr; mean, rstd: (M,) fp32.
cudaError_t layer_norm_fwd(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                           float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream);

// partial: (ln_bwd_blocks(M), 2, N) fp32 scratch. dweight / dbias: (N,) in `dtype`.
cudaError_t layer_norm_bwd(DType dtype, const void* dy, const void* x, const void* weight, const float* mean,
                           const float* rstd, void* dx, void* dweight, void* dbias, float* partial, int64_t M,
                           int64_t N, cudaStream_t stream);

// pre (M, F), in place: pre += bias (if any); h = gelu(pre). bias may be nullptr. gelu is the tanh
// approximation (exact = false, GPT-2's) or 0.5 x (1 + erf(x / sqrt 2)) (exact = true).
cudaError_t gelu_bias_fwd(DType dtype, void* pre, const void* bias, void* h, int64_t M, int64_t F, bool exact,
                          cudaStream_t stream);

// dh (M, F), in place: dh *= gelu'(pre) (-> dpre); h = gelu(pre) (recomputed for dW_proj); gelu as
// in gelu_bias_fwd.
cudaError_t gelu_bwd(DType dtype, const void* pre, void* dh, void* h, int64_t n, bool exact, cudaStream_t stream);

// q: (B, H, Tq, D) strided; caches: (B, H, T_max, D) strided; cache_lens: (B,) int64 on device.
// out: (B, H, Tq, D) contiguous. workspace: decode_workspace_floats(...) fp32.
cudaError_t decode_attention(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                             const int64_t* cache_lens, void* out, float* workspace, const DecodePlan& plan,
                             int64_t B, int64_t H, int64_t Tq, int64_t T_max, int64_t D, BHTStrides sq,
                             BHTStrides sk, BHTStrides sv, float scale, cudaStream_t stream);

// logits: (B, V) fp32 contiguous; uniform: (B,) fp32; out: (B,) int64; probs: (B, V) fp32 scratch.
// top_k <= 0 or >= V: off; top_p >= 1: off; temperature == 0: argmax.
cudaError_t sample(const float* logits, const float* uniform, int64_t* out, float* probs, int64_t B, int64_t V,
                   float temperature, int64_t top_k, float top_p, cudaStream_t stream);

// y (M, N) = x (M, K) w^T + bias, w quantized (gptfast/ops/quant.py): bits 8: qweight int8 (N, K),
// scale fp32 (N,) (group_size 0: per output channel) or fp16 (N, K / group_size); bits 4: qweight
// uint8 (N, K / 2) in llama.cpp q4_0's nibble order, scale fp16 (N, K / group_size), zero fp16
// (N, K / group_size) or nullptr. x, y, bias (N,) or nullptr: `dtype`; everything contiguous.
// cudaErrorInvalidValue for an unsupported bits / group_size / K.
cudaError_t quantized_linear(DType dtype, const void* x, const void* qweight, const void* scale, const void* zero,
                             const void* bias, void* y, int64_t M, int64_t N, int64_t K, int bits,
                             int64_t group_size, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptfast
#endif  // GPTFAST_LAUNCH_MATH_ONLY
