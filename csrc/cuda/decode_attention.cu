// Decode attention: Tq (1..4) new queries per sequence against a preallocated KV cache, with a
// valid length per sequence (see gptfast/ops/reference.py: query i of sequence b sits at position
// cache_lens[b] - Tq + i and sees cache positions 0 .. that position; nothing at or past
// cache_lens[b] is read).
//
// Split-K ("Flash-Decoding", Dao et al. 2023): with batch x heads often far below the SM count, one
// block per (b, h) would leave most of the GPU idle while it streams the cache. The cache is cut
// into `splits` chunks (planned on the host from T_max, see decode_plan in launch.h); block (bh, s)
// streams its chunk through shared memory in 32-key tiles and keeps, per query, an online-softmax
// running max m, sum l and an unnormalised fp32 accumulator. A combine kernel merges the splits:
// out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. Chunks past a sequence's length do no work
// (m = -inf, l = 0: weight 0). Scores are in the log2 domain (q pre-multiplied by scale * log2 e).
//
// Per tile: thread (q_i, key j) computes one score from shared memory (K rows padded to D + 1
// floats: conflict-free), warp i does query i's max / exp / sum over the 32 keys (one key per
// lane), then every thread updates its (q_i, d) accumulators from the V tile.
#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_split_kernel(const T* __restrict__ Q,           // (B, H, Tq, D), strides sq
                        const T* __restrict__ Kc,          // (B, H, T_max, D), strides sk
                        const T* __restrict__ Vc,          // (B, H, T_max, D), strides sv
                        const int64_t* __restrict__ Lens,  // (B,)
                        float* __restrict__ Acc,           // (S, BH, Tq, D)
                        float* __restrict__ ML,            // (S, BH, Tq, 2): max (log2 domain), sum
                        int64_t H, int Tq, int64_t T_max, int64_t chunk, BHTStrides sq, BHTStrides sk,
                        BHTStrides sv, float scale_log2) {
  constexpr int TILE = kDecodeTile, NT = kDecodeThreads, MQ = kDecodeMaxTq;
  constexpr int R = (MQ * D + NT - 1) / NT;  // accumulators per thread
  static_assert(TILE == 32, "one key per lane in the softmax step");
  extern __shared__ float smem[];
  float* qs = smem;                  // (MQ, D)
  float* ks = qs + MQ * D;           // (TILE, D + 1)
  float* vs = ks + TILE * (D + 1);   // (TILE, D)
  float* ps = vs + TILE * D;         // (MQ, TILE) scores, then probabilities
  float* m_s = ps + MQ * TILE;       // (MQ,)
  float* l_s = m_s + MQ;             // (MQ,)
  float* alpha_s = l_s + MQ;         // (MQ,)

  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H, BH = gridDim.x;
  const int64_t split = blockIdx.y;
  int64_t L = Lens[b];
  L = L < 0 ? 0 : (L > T_max ? T_max : L);  // defensive: the dispatcher checks Tq <= L <= T_max
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < L ? begin + chunk : L;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const T* qb = Q + b * sq.b + h * sq.h;
  const T* kb = Kc + b * sk.b + h * sk.h;
  const T* vb = Vc + b * sv.b + h * sv.h;
  for (int idx = tid; idx < Tq * D; idx += NT) qs[idx] = to_float(qb[(idx / D) * sq.t + idx % D]) * scale_log2;
  if (tid < MQ) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;

  for (int64_t t0 = begin; t0 < end; t0 += TILE) {
    __syncthreads();  // q / stats initialised, or the previous tile fully consumed
    for (int idx = tid; idx < TILE * D; idx += NT) {
      const int j = idx / D, d = idx % D;
      const int64_t key = t0 + j;
      const bool ok = key < end;
      ks[j * (D + 1) + d] = ok ? to_float(kb[key * sk.t + d]) : 0.f;
      vs[idx] = ok ? to_float(vb[key * sv.t + d]) : 0.f;
    }
    __syncthreads();
    for (int idx = tid; idx < Tq * TILE; idx += NT) {
      const int qi = idx / TILE, j = idx % TILE;
      const int64_t key = t0 + j;
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(qs[qi * D + d], ks[j * (D + 1) + d], dot);
      const bool visible = key < end && key <= L - Tq + qi;
      ps[idx] = visible ? dot : -INFINITY;
    }
    __syncthreads();
    if (warp < Tq) {
      const float sc = ps[warp * TILE + lane];
      const float m_old = m_s[warp];
      const float m_new = fmaxf(m_old, warp_max(sc));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0 below
      const float p = exp2f(sc - m_use);
      const float psum = warp_sum(p);
      ps[warp * TILE + lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        alpha_s[warp] = alpha;
        l_s[warp] = l_s[warp] * alpha + psum;
        m_s[warp] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int idx = tid + r * NT;
      if (idx < Tq * D) {
        const int qi = idx / D, d = idx % D;
        float a = acc[r] * alpha_s[qi];
#pragma unroll 8
        for (int j = 0; j < TILE; ++j) a = fmaf(ps[qi * TILE + j], vs[j * D + d], a);
        acc[r] = a;
      }
    }
  }
  __syncthreads();  // stats written by the last tile's softmax step are visible

  const int64_t base = (split * BH + bh) * Tq;  // row (split, bh, q 0) of the partial buffers
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int idx = tid + r * NT;
    if (idx < Tq * D) Acc[base * D + idx] = acc[r];
  }
  if (tid < Tq) {
    ML[(base + tid) * 2] = m_s[tid];
    ML[(base + tid) * 2 + 1] = l_s[tid];
  }
}

// One block per (bh, query), one thread per dim: merges the S partial results.
template <typename T>
__global__ void decode_combine_kernel(const float* __restrict__ Acc, const float* __restrict__ ML,
                                      T* __restrict__ Out,  // (B, H, Tq, D) contiguous
                                      int64_t rows, int D, int S) {
  const int64_t row = blockIdx.x;  // bh * Tq + qi
  const int d = threadIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ML[(s * rows + row) * 2]);
  if (d >= D) return;
  float num = 0.f, den = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < S; ++s) {
      const float w = exp2f(ML[(s * rows + row) * 2] - M);  // 0 for empty splits (m = -inf)
      den = fmaf(w, ML[(s * rows + row) * 2 + 1], den);
      num = fmaf(w, Acc[(s * rows + row) * D + d], num);
    }
  }
  // den == 0 only if no key was visible, which the contract (cache_lens >= Tq) rules out: NaN then,
  // as the reference's softmax over an all-masked row.
  Out[row * D + d] = from_float<T>(num / den);
}

}  // namespace

cudaError_t decode_attention(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                             const int64_t* cache_lens, void* out, float* workspace, const DecodePlan& plan,
                             int64_t B, int64_t H, int64_t Tq, int64_t T_max, int64_t D, BHTStrides sq,
                             BHTStrides sk, BHTStrides sv, float scale, cudaStream_t stream) {
  if (!attn_head_dim_supported(D) || Tq < 1 || Tq > kDecodeMaxTq || T_max < 1) return cudaErrorInvalidValue;
  if (B * H == 0) return cudaSuccess;
  const int64_t BH = B * H;
  const Launch ls = decode_split_launch(BH, plan, D);
  const Launch lc = decode_combine_launch(BH, Tq, D);
  if (!launch_fits(ls) || !launch_fits(lc)) return cudaErrorInvalidConfiguration;
  float* acc = workspace;
  float* ml = workspace + plan.splits * BH * Tq * D;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    auto run = [&](auto kernel) {
      kernel<<<to_dim3(ls.grid), to_dim3(ls.block), ls.smem, stream>>>(
          static_cast<const Tp*>(q), static_cast<const Tp*>(k_cache), static_cast<const Tp*>(v_cache), cache_lens,
          acc, ml, H, int(Tq), T_max, plan.chunk, sq, sk, sv, scale * kLog2e);
      return cudaGetLastError();
    };
    cudaError_t err;
    switch (D) {
      case 16: err = run(decode_split_kernel<Tp, 16>); break;
      case 32: err = run(decode_split_kernel<Tp, 32>); break;
      case 64: err = run(decode_split_kernel<Tp, 64>); break;
      default: err = run(decode_split_kernel<Tp, 128>); break;
    }
    if (err != cudaSuccess) return err;
    decode_combine_kernel<Tp><<<to_dim3(lc.grid), to_dim3(lc.block), 0, stream>>>(acc, ml, static_cast<Tp*>(out),
                                                                                   BH * Tq, int(D), int(plan.splits));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace gptfast
