// Causal attention forward / backward (FlashAttention-2's algorithm on CUDA cores).
//
// Forward (Dao 2023, "FlashAttention-2", Alg. 1): a block owns 64 query rows of one (b, h) and walks
// the key tiles 0 .. its diagonal, staging each 32-key K / V tile in shared memory (fp32). A query
// row is owned by tpr = D / dpt threads (dpt = 32 dims each, interleaved so that a warp reading one
// K row hits tpr distinct banks); a score is their partial dot products summed by a butterfly
// shuffle (bitwise identical in every lane). The softmax is online: per 8-key sub-tile, the running max m
// and sum l rescale the fp32 accumulator once, not per key. Scores live in the log2 domain (q is
// pre-multiplied by scale * log2(e)) so exponentials are exp2f. The (T, T) probabilities are never
// stored; lse = ln(sum exp(scaled scores)) per row is (natural log, as the schema says), so the
// backward recomputes P = exp(S - lse) tile by tile.
//
// Backward (FA2 Alg. 2, split in two kernels to avoid atomics): delta = rowsum(dO * O); a dK/dV
// kernel owns 32 keys and walks the query tiles from its diagonal down, accumulating
// dV += P^T dO and dK += dS^T Q (dS = P (dP - delta), dP = dO V^T) in registers; a dQ kernel owns 32
// query rows and walks the key tiles up to its diagonal, accumulating dQ += dS K. P and dP are
// recomputed in both (2x the score FLOPs of a fused atomic version) in exchange for deterministic
// gradients and no fp32 dQ scratch.
//
// Trade-off: CUDA-core FMAs (no tensor-core MMA), one shared-memory read per FMA. Correct for every
// T and D in {16, 32, 64, 128}, any (b, h, t) strides with unit D stride; an mma.sync version is the
// next step for speed.
#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------- forward

template <typename T, int D>
__global__ void __launch_bounds__(kAttnFwdBlockM*(D / (D < 32 ? D : 32)))
    attention_fwd_kernel(const T* __restrict__ Q,  // (B, H, T, D), strides sq
                         const T* __restrict__ K,  // (B, H, T, D), strides sk
                         const T* __restrict__ V,  // (B, H, T, D), strides sv
                         T* __restrict__ Out,      // (B, H, T, D) contiguous
                         float* __restrict__ Lse,  // (B, H, T)
                         int64_t H, int64_t Tn, BHTStrides sq, BHTStrides sk, BHTStrides sv,
                         float scale_log2) {  // scale * log2(e)
  constexpr int DPT = D < 32 ? D : 32;
  constexpr int TPR = D / DPT;
  constexpr int BM = kAttnFwdBlockM, BN = kAttnFwdBlockN;
  constexpr int THREADS = BM * TPR;
  constexpr int SUB = 8;
  static_assert(BN % SUB == 0, "sub-tiles must divide the key tile");
  extern __shared__ float smem[];
  float* ks = smem;           // (BN, D)
  float* vs = smem + BN * D;  // (BN, D)

  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t qtile = int64_t(gridDim.y) - 1 - blockIdx.y;  // diagonal-heavy tiles start first
  const Range rows = tile_range(qtile, BM, Tn);
  const int tid = threadIdx.x, s = tid % TPR;
  const int64_t row = rows.begin + tid / TPR;
  const bool active = row < rows.end;
  const T* qb = Q + b * sq.b + h * sq.h;
  const T* kb = K + b * sk.b + h * sk.h;
  const T* vb = V + b * sv.b + h * sv.h;

  float q[DPT], acc[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) {
    q[i] = active ? to_float(qb[row * sq.t + i * TPR + s]) * scale_log2 : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;

  const int64_t ntiles = attn_causal_key_tiles(rows.end, BN);
  for (int64_t kt = 0; kt < ntiles; ++kt) {
    const Range keys = tile_range(kt, BN, Tn);
    __syncthreads();  // the previous tile has been consumed
    for (int idx = tid; idx < BN * D; idx += THREADS) {
      const int64_t key = keys.begin + idx / D;
      const int d = idx % D;
      const bool ok = key < keys.end;
      ks[idx] = ok ? to_float(kb[key * sk.t + d]) : 0.f;
      vs[idx] = ok ? to_float(vb[key * sv.t + d]) : 0.f;
    }
    __syncthreads();

    // The tile is consumed in sub-tiles of SUB keys: SUB score registers, one rescale of the
    // accumulator per sub-tile; only the SUB loop is unrolled (compile time grows with it).
#pragma unroll 1
    for (int j0 = 0; j0 < BN; j0 += SUB) {
      float sc[SUB];  // scores of this row against keys j0 .. j0 + SUB (log2 domain)
      float tmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < SUB; ++j) {
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < DPT; ++i) part = fmaf(q[i], ks[(j0 + j) * D + i * TPR + s], part);
        const float dot = group_sum<TPR>(part);
        const int64_t key = keys.begin + j0 + j;
        sc[j] = (key <= row && key < keys.end) ? dot : -INFINITY;
        tmax = fmaxf(tmax, sc[j]);
      }
      const float m_new = fmaxf(m, tmax);
      // m_new = -inf: every key so far is masked for this row (a sub-tile right of the diagonal
      // before any visible key cannot happen, as key 0 comes first; kept as a guard): p = 0.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m - m_use);
      l *= alpha;
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[i] *= alpha;
#pragma unroll
      for (int j = 0; j < SUB; ++j) {
        const float p = exp2f(sc[j] - m_use);
        l += p;
#pragma unroll
        for (int i = 0; i < DPT; ++i) acc[i] = fmaf(p, vs[(j0 + j) * D + i * TPR + s], acc[i]);
      }
      m = m_new;
    }
  }

  if (active) {
    const float inv = 1.f / l;
    T* ob = Out + (bh * Tn + row) * D;
#pragma unroll
    for (int i = 0; i < DPT; ++i) ob[i * TPR + s] = from_float<T>(acc[i] * inv);
    if (s == 0) Lse[bh * Tn + row] = (m + log2f(l)) * kLn2;
  }
}

// ---------------------------------------------------------------------------- backward

// delta[r] = sum_d dO[r, d] * O[r, d] (fp32), one warp per row of the contiguous (B*H*T, D) tensors.
template <typename T>
__global__ void attention_bwd_delta_kernel(const T* __restrict__ dO, const T* __restrict__ O,
                                           float* __restrict__ Delta, int64_t rows, int D) {
  const int64_t r = int64_t(blockIdx.x) * kAttnDeltaRowsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps exit together: the shuffle below stays full-warp
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc = fmaf(to_float(dO[r * D + d]), to_float(O[r * D + d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) Delta[r] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnBwdBlockN*(D / (D < 16 ? D : 16)))
    attention_bwd_dkdv_kernel(const T* __restrict__ dO,      // (B, H, T, D) contiguous
                              const T* __restrict__ Q,       // strides sq
                              const T* __restrict__ K,       // strides sk
                              const T* __restrict__ V,       // strides sv
                              const float* __restrict__ Lse,  // (B, H, T)
                              const float* __restrict__ Delta,
                              T* __restrict__ dK, T* __restrict__ dV,  // (B, H, T, D) contiguous
                              int64_t H, int64_t Tn, BHTStrides sq, BHTStrides sk, BHTStrides sv,
                              float scale_log2, float scale) {
  constexpr int DPT = D < 16 ? D : 16;
  constexpr int TPK = D / DPT;
  constexpr int BN = kAttnBwdBlockN, BM = kAttnBwdBlockM;
  constexpr int THREADS = BN * TPK;
  extern __shared__ float smem[];
  float* qs = smem;               // (BM, D)
  float* dos = qs + BM * D;       // (BM, D)
  float* lse_s = dos + BM * D;    // (BM,) lse * log2(e)
  float* delta_s = lse_s + BM;    // (BM,)

  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const Range keys = tile_range(blockIdx.y, BN, Tn);  // low key tiles see the most queries: first
  const int tid = threadIdx.x, s = tid % TPK;
  const int64_t key = keys.begin + tid / TPK;
  const bool active = key < keys.end;
  const T* qb = Q + b * sq.b + h * sq.h;
  const T* kb = K + b * sk.b + h * sk.h;
  const T* vb = V + b * sv.b + h * sv.h;
  const T* dob = dO + bh * Tn * D;

  float k[DPT], v[DPT], dk[DPT], dv[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) {
    k[i] = active ? to_float(kb[key * sk.t + i * TPK + s]) : 0.f;
    v[i] = active ? to_float(vb[key * sv.t + i * TPK + s]) : 0.f;
    dk[i] = 0.f;
    dv[i] = 0.f;
  }

  const int64_t nq = ceil_div(Tn, BM);
  for (int64_t qt = attn_causal_first_q_tile(keys.begin, BM); qt < nq; ++qt) {
    const Range rows = tile_range(qt, BM, Tn);
    __syncthreads();
    for (int idx = tid; idx < BM * D; idx += THREADS) {
      const int64_t r = rows.begin + idx / D;
      const int d = idx % D;
      const bool ok = r < rows.end;
      qs[idx] = ok ? to_float(qb[r * sq.t + d]) : 0.f;
      dos[idx] = ok ? to_float(dob[r * D + d]) : 0.f;
    }
    for (int i = tid; i < BM; i += THREADS) {
      const int64_t r = rows.begin + i;
      lse_s[i] = r < rows.end ? Lse[bh * Tn + r] * kLog2e : 0.f;
      delta_s[i] = r < rows.end ? Delta[bh * Tn + r] : 0.f;
    }
    __syncthreads();
    const int nrows = int(rows.end - rows.begin);
    for (int i = 0; i < nrows; ++i) {
      const int64_t r = rows.begin + i;
      float sp = 0.f, dpp = 0.f;
#pragma unroll
      for (int c = 0; c < DPT; ++c) {
        sp = fmaf(qs[i * D + c * TPK + s], k[c], sp);
        dpp = fmaf(dos[i * D + c * TPK + s], v[c], dpp);
      }
      const float sdot = group_sum<TPK>(sp);
      const float dp = group_sum<TPK>(dpp);
      const float p = (active && key <= r) ? exp2f(sdot * scale_log2 - lse_s[i]) : 0.f;
      const float ds = p * (dp - delta_s[i]);
#pragma unroll
      for (int c = 0; c < DPT; ++c) {
        dv[c] = fmaf(p, dos[i * D + c * TPK + s], dv[c]);
        dk[c] = fmaf(ds, qs[i * D + c * TPK + s], dk[c]);
      }
    }
  }

  if (active) {
    T* dkb = dK + (bh * Tn + key) * D;
    T* dvb = dV + (bh * Tn + key) * D;
#pragma unroll
    for (int c = 0; c < DPT; ++c) {
      dkb[c * TPK + s] = from_float<T>(dk[c] * scale);
      dvb[c * TPK + s] = from_float<T>(dv[c]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnDqBlockM*(D / (D < 16 ? D : 16)))
    attention_bwd_dq_kernel(const T* __restrict__ dO, const T* __restrict__ Q, const T* __restrict__ K,
                            const T* __restrict__ V, const float* __restrict__ Lse,
                            const float* __restrict__ Delta, T* __restrict__ dQ,  // (B, H, T, D) contiguous
                            int64_t H, int64_t Tn, BHTStrides sq, BHTStrides sk, BHTStrides sv,
                            float scale_log2, float scale) {
  constexpr int DPT = D < 16 ? D : 16;
  constexpr int TPR = D / DPT;
  constexpr int BM = kAttnDqBlockM, BN = kAttnDqBlockN;
  constexpr int THREADS = BM * TPR;
  extern __shared__ float smem[];
  float* ks = smem;           // (BN, D)
  float* vs = smem + BN * D;  // (BN, D)

  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t qtile = int64_t(gridDim.y) - 1 - blockIdx.y;
  const Range rows = tile_range(qtile, BM, Tn);
  const int tid = threadIdx.x, s = tid % TPR;
  const int64_t row = rows.begin + tid / TPR;
  const bool active = row < rows.end;
  const T* qb = Q + b * sq.b + h * sq.h;
  const T* kb = K + b * sk.b + h * sk.h;
  const T* vb = V + b * sv.b + h * sv.h;

  float q[DPT], dor[DPT], dq[DPT];
#pragma unroll
  for (int i = 0; i < DPT; ++i) {
    q[i] = active ? to_float(qb[row * sq.t + i * TPR + s]) : 0.f;
    dor[i] = active ? to_float(dO[(bh * Tn + row) * D + i * TPR + s]) : 0.f;
    dq[i] = 0.f;
  }
  const float lse2 = active ? Lse[bh * Tn + row] * kLog2e : 0.f;
  const float dlt = active ? Delta[bh * Tn + row] : 0.f;

  const int64_t ntiles = attn_causal_key_tiles(rows.end, BN);
  for (int64_t kt = 0; kt < ntiles; ++kt) {
    const Range keys = tile_range(kt, BN, Tn);
    __syncthreads();
    for (int idx = tid; idx < BN * D; idx += THREADS) {
      const int64_t key = keys.begin + idx / D;
      const int d = idx % D;
      const bool ok = key < keys.end;
      ks[idx] = ok ? to_float(kb[key * sk.t + d]) : 0.f;
      vs[idx] = ok ? to_float(vb[key * sv.t + d]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float sp = 0.f, dpp = 0.f;
#pragma unroll
      for (int c = 0; c < DPT; ++c) {
        sp = fmaf(q[c], ks[j * D + c * TPR + s], sp);
        dpp = fmaf(dor[c], vs[j * D + c * TPR + s], dpp);
      }
      const float sdot = group_sum<TPR>(sp);
      const float dp = group_sum<TPR>(dpp);
      const int64_t key = keys.begin + j;
      const float p = (active && key <= row) ? exp2f(sdot * scale_log2 - lse2) : 0.f;
      const float ds = p * (dp - dlt);
#pragma unroll
      for (int c = 0; c < DPT; ++c) dq[c] = fmaf(ds, ks[j * D + c * TPR + s], dq[c]);
    }
  }

  if (active) {
    T* dqb = dQ + (bh * Tn + row) * D;
#pragma unroll
    for (int c = 0; c < DPT; ++c) dqb[c * TPR + s] = from_float<T>(dq[c] * scale);
  }
}

// ---------------------------------------------------------------------------- dispatch on D

template <typename F>
cudaError_t dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 16:
      return f(std::integral_constant<int, 16>());
    case 32:
      return f(std::integral_constant<int, 32>());
    case 64:
      return f(std::integral_constant<int, 64>());
    case 128:
      return f(std::integral_constant<int, 128>());
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                          int64_t B, int64_t H, int64_t T, int64_t D, BHTStrides sq, BHTStrides sk, BHTStrides sv,
                          float scale, cudaStream_t stream) {
  if (!attn_head_dim_supported(D)) return cudaErrorInvalidValue;
  if (B * H * T == 0) return cudaSuccess;
  const Launch l = attn_fwd_launch(B * H, T, D);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    return dispatch_head_dim(D, [&](auto dc) {
      constexpr int Dc = decltype(dc)::value;
      attention_fwd_kernel<Tp, Dc><<<to_dim3(l.grid), to_dim3(l.block), l.smem, stream>>>(
          static_cast<const Tp*>(q), static_cast<const Tp*>(k), static_cast<const Tp*>(v), static_cast<Tp*>(out),
          lse, H, T, sq, sk, sv, scale * kLog2e);
      return cudaGetLastError();
    });
  });
}

cudaError_t attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                          const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t B,
                          int64_t H, int64_t T, int64_t D, BHTStrides sq, BHTStrides sk, BHTStrides sv, float scale,
                          cudaStream_t stream) {
  if (!attn_head_dim_supported(D)) return cudaErrorInvalidValue;
  if (B * H * T == 0) return cudaSuccess;
  const Launch ld = attn_bwd_delta_launch(B * H * T);
  const Launch lkv = attn_bwd_dkdv_launch(B * H, T, D);
  const Launch lq = attn_bwd_dq_launch(B * H, T, D);
  if (!launch_fits(ld) || !launch_fits(lkv) || !launch_fits(lq)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    const Tp* dO = static_cast<const Tp*>(dout);
    attention_bwd_delta_kernel<Tp><<<to_dim3(ld.grid), to_dim3(ld.block), 0, stream>>>(
        dO, static_cast<const Tp*>(out), delta, B * H * T, int(D));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return dispatch_head_dim(D, [&](auto dc) {
      constexpr int Dc = decltype(dc)::value;
      attention_bwd_dkdv_kernel<Tp, Dc><<<to_dim3(lkv.grid), to_dim3(lkv.block), lkv.smem, stream>>>(
          dO, static_cast<const Tp*>(q), static_cast<const Tp*>(k), static_cast<const Tp*>(v), lse, delta,
          static_cast<Tp*>(dk), static_cast<Tp*>(dv), H, T, sq, sk, sv, scale * kLog2e, scale);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      attention_bwd_dq_kernel<Tp, Dc><<<to_dim3(lq.grid), to_dim3(lq.block), lq.smem, stream>>>(
          dO, static_cast<const Tp*>(q), static_cast<const Tp*>(k), static_cast<const Tp*>(v), lse, delta,
          static_cast<Tp*>(dq), H, T, sq, sk, sv, scale * kLog2e, scale);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace gptfast
