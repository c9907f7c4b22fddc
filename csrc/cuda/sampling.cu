// Temperature / top-k / top-p sampling on CUDA with gptfast/ops/reference.py's rule, one block per
// row, no sort of the vocabulary.
//
//   x = logits / temperature (IEEE fp32 division, as `logits.float() / temperature`).
//   top-k: kth = the k-th largest x, found by a 32-step binary search over the order-preserving
//     uint32 key of a float (count of keys >= candidate, an exact integer sum); keep x >= kth (ties
//     kept, as the reference).
//   softmax over the kept x: p = exp(x - max) / Z, Z summed in fp64.
//   top-p: token i is kept iff the mass of tokens strictly more probable than i is < top_p
//     (the reference's definition, independent of tie order). That mass G(t) = sum_{p > t} p is
//     non-increasing in t, so the smallest bit pattern t* with G(t*) < top_p is found by binary
//     search over the (non-negative) fp32 bit patterns, ~31 passes; keep p >= t*, renormalise.
//   inverse CDF in vocabulary order: the first token whose cumulative kept probability exceeds
//     u * total, clamped to the last kept token (rounding may leave u * total past the end).
//   temperature 0: argmax (first maximum; NaN wins, as torch.argmax).
// Every pass is a block-strided loop with reductions in a fixed order (fp64 for masses), so the
// result is deterministic. Masses are fp64 where the reference's cumsum is fp32: the two agree
// except when u or top_p falls within fp32 rounding of a boundary.
// Cost: 2 + (32 if top-k) + (31 if top-p) + scan passes over V floats per row, all L2-resident
// (V = 50257: 200 KB); the reference sorts all V probabilities of every row instead.
#include <cfloat>

#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

// Order-preserving key of a float: a < b  <=>  key(a) < key(b) (for non-NaN; -0 < +0).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct Scratch {
  double d[32];
  float f[32];
  long long i[32];
  int64_t idx[32];
};

__device__ __forceinline__ float block_max(float v, Scratch& s) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) s.f[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < nw; ++w) r = fmaxf(r, s.f[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ long long block_count(long long v, Scratch& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) s.i[warp] = v;
  __syncthreads();
  long long r = 0;
  for (int w = 0; w < nw; ++w) r += s.i[w];
  __syncthreads();
  return r;
}

// Minimum (op = min) or maximum (op = max) index over the block.
template <bool MIN>
__device__ __forceinline__ int64_t block_index(int64_t v, Scratch& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = MIN ? (other < v ? other : v) : (other > v ? other : v);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) s.idx[warp] = v;
  __syncthreads();
  int64_t r = s.idx[0];
  for (int w = 1; w < nw; ++w) r = MIN ? (s.idx[w] < r ? s.idx[w] : r) : (s.idx[w] > r ? s.idx[w] : r);
  __syncthreads();
  return r;
}

// (value, index) argmax step: NaN beats numbers, larger beats smaller, ties go to the lower index.
__device__ __forceinline__ bool arg_better(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = isnan(va), nb = isnan(vb);
  if (na != nb) return na;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

__device__ int64_t block_argmax(const float* x, int64_t V, Scratch& s) {
  float bv = -INFINITY;
  int64_t bi = V;  // sentinel larger than every index
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    if (bi == V || arg_better(x[i], i, bv, bi)) {
      bv = x[i];
      bi = i;
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi != V && (bi == V || arg_better(ov, oi, bv, bi))) {
      bv = ov;
      bi = oi;
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
    s.f[warp] = bv;
    s.idx[warp] = bi;
  }
  __syncthreads();
  float rv = s.f[0];
  int64_t ri = s.idx[0];
  for (int w = 1; w < nw; ++w)
    if (s.idx[w] != V && (ri == V || arg_better(s.f[w], s.idx[w], rv, ri))) {
      rv = s.f[w];
      ri = s.idx[w];
    }
  __syncthreads();
  return ri;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const float* __restrict__ Logits,  // (B, V)
                  const float* __restrict__ U,       // (B,) uniforms in [0, 1)
                  int64_t* __restrict__ Out,         // (B,)
                  float* __restrict__ Probs,         // (B, V) scratch
                  int64_t V, float temperature, int64_t top_k, float top_p) {
  __shared__ Scratch s;
  __shared__ double warp_tot[32];
  const int64_t row = blockIdx.x;
  const float* lg = Logits + row * V;
  float* p = Probs + row * V;
  const int tid = threadIdx.x, nt = blockDim.x;

  if (temperature == 0.f) {
    const int64_t i = block_argmax(lg, V, s);
    if (tid == 0) Out[row] = i;
    return;
  }

  // 1. max of x = logits / T.
  float m = -INFINITY;
  for (int64_t i = tid; i < V; i += nt) m = fmaxf(m, lg[i] / temperature);
  m = block_max(m, s);

  // 2. top-k: the largest key K with count(key(x) >= K) >= k is the key of the k-th largest x.
  float kth = -INFINITY;
  if (top_k > 0 && top_k < V) {
    uint32_t ans = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = ans | (1u << bit);
      long long c = 0;
      for (int64_t i = tid; i < V; i += nt) c += float_key(lg[i] / temperature) >= cand;
      if (block_count(c, s) >= top_k) ans = cand;
    }
    kth = key_float(ans);
  }

  // 3. softmax over the kept entries.
  double z = 0.0;
  for (int64_t i = tid; i < V; i += nt) {
    const float x = lg[i] / temperature;
    if (x >= kth) z += double(expf(x - m));
  }
  const float zf = float(block_sum_f64(z, s.d));
  for (int64_t i = tid; i < V; i += nt) {
    const float x = lg[i] / temperature;
    p[i] = x >= kth ? expf(x - m) / zf : 0.f;
  }
  __syncthreads();  // p written by other threads is read below (same block: global memory is coherent)

  // 4. top-p: smallest bit pattern t with G(t) = sum_{bits(p) > t} p < top_p; keep bits(p) >= t.
  if (top_p < 1.f) {
    uint32_t lo = 0, hi = 0x7f800000u;  // G(+inf bits) = 0 < top_p
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      double g = 0.0;
      for (int64_t i = tid; i < V; i += nt) {
        const float v = p[i];
        if (__float_as_uint(v) > mid) g += double(v);
      }
      if (block_sum_f64(g, s.d) < double(top_p))
        hi = mid;
      else
        lo = mid + 1;
    }
    double kept = 0.0;
    for (int64_t i = tid; i < V; i += nt) {
      const float v = p[i];
      if (__float_as_uint(v) >= lo) kept += double(v);
    }
    const float kf = float(block_sum_f64(kept, s.d));
    for (int64_t i = tid; i < V; i += nt) {
      const float v = p[i];
      p[i] = __float_as_uint(v) >= lo ? v / kf : 0.f;
    }
    __syncthreads();
  }

  // 5. inverse CDF in vocabulary order.
  int64_t last = -1;
  double tot = 0.0;
  for (int64_t i = tid; i < V; i += nt) {
    const float v = p[i];
    tot += double(v);
    if (v > 0.f) last = i;
  }
  last = block_index<false>(last, s);
  tot = block_sum_f64(tot, s.d);
  const double target = double(U[row]) * tot;
  double carry = 0.0;
  int64_t found = V;
  const int warp = tid >> 5, lane = tid & 31, nw = nt >> 5;
  for (int64_t c0 = 0; c0 < V; c0 += nt) {
    const int64_t i = c0 + tid;
    const double v = i < V ? double(p[i]) : 0.0;
    // Inclusive scan: within the warp (shuffles), then over warp totals (in warp order).
    double incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    double before = 0.0, chunk = 0.0;
    for (int w = 0; w < nw; ++w) {
      if (w < warp) before += warp_tot[w];
      chunk += warp_tot[w];
    }
    __syncthreads();
    const int64_t hit = (i < V && carry + before + incl > target) ? i : V;
    found = block_index<true>(hit, s);
    if (found < V) break;  // uniform across the block
    carry += chunk;
  }
  // last < 0: no finite probability (all logits -inf / NaN); the reference yields garbage too.
  if (tid == 0) Out[row] = last < 0 ? 0 : (found < last ? found : last);
}

}  // namespace

cudaError_t sample(const float* logits, const float* uniform, int64_t* out, float* probs, int64_t B, int64_t V,
                   float temperature, int64_t top_k, float top_p, cudaStream_t stream) {
  if (V < 1 || !(temperature >= 0.f) || !(top_p > 0.f)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const Launch l = sample_launch(B, V);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  sample_kernel<<<to_dim3(l.grid), to_dim3(l.block), 0, stream>>>(logits, uniform, out, probs, V, temperature,
                                                                    top_k, top_p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gptfast
