// LayerNorm forward / backward over the last dim of a contiguous (M, N) tensor, fp32 accumulation.
//
// Forward: one block per row. The row is read with 16-byte vector loads when N * sizeof(T) and all
// pointers are 16-byte aligned (else element by element) three times: mean, centred variance
// (two-pass, no E[x^2] - E[x]^2 cancellation) and output; the second and third reads hit L1/L2
// (a row is a few KB), so DRAM traffic is one read of x and one write of y. Block reductions sum
// warp partials in warp order: the result does not depend on scheduling.
//
// Backward (as Apex / the Triton fused LayerNorm tutorial): with xhat = (x - mean) * rstd and
// g = dy * w,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum_rows dy * xhat,
// db = sum_rows dy. G = min(M, 512) blocks walk rows blockIdx.x, blockIdx.x + G, ...; each thread
// always owns the same columns, so it accumulates its dw / db partials without atomics or
// barriers, in shared memory (2 N floats when they fit in 48 KB) or else directly in the block's
// row of the (G, 2, N) fp32 partial buffer. A second kernel sums the G partials of each column in a
// fixed order: deterministic dw / db.
#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kLnMaxThreads)
    layer_norm_fwd_kernel(const T* __restrict__ X,     // (M, N)
                          const T* __restrict__ W,     // (N,) or nullptr
                          const T* __restrict__ Bias,  // (N,) or nullptr
                          T* __restrict__ Y,           // (M, N)
                          float* __restrict__ Mean,    // (M,)
                          float* __restrict__ Rstd,    // (M,)
                          int64_t N, float eps) {
  __shared__ float scratch[64];
  const int64_t row = blockIdx.x;
  const T* x = X + row * N;
  T* y = Y + row * N;
  const int64_t nvec = N / VEC;  // VEC > 1 only when N % VEC == 0
  const float inv_n = 1.f / float(N);

  float sum = 0.f, unused = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC];
    load_vec<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[k];
  }
  block_sum2(sum, unused, scratch);
  const float mean = sum * inv_n;

  float sq = 0.f;
  unused = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC];
    load_vec<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float c = v[k] - mean;
      sq = fmaf(c, c, sq);
    }
  }
  block_sum2(sq, unused, scratch);
  const float rstd = rsqrtf(sq * inv_n + eps);

  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float v[VEC], w[VEC], b[VEC];
    load_vec<T, VEC>(x + i * VEC, v);
    if (W != nullptr) {
      load_vec<T, VEC>(W + i * VEC, w);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = 1.f;
    }
    if (Bias != nullptr) {
      load_vec<T, VEC>(Bias + i * VEC, b);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = fmaf((v[k] - mean) * rstd, w[k], b[k]);
    store_vec<T, VEC>(y + i * VEC, v);
  }
  if (threadIdx.x == 0) {
    Mean[row] = mean;
    Rstd[row] = rstd;
  }
}

template <typename T, int VEC, bool SMEM_ACC>
__global__ void __launch_bounds__(kLnMaxThreads)
    layer_norm_bwd_kernel(const T* __restrict__ dY,  // (M, N)
                          const T* __restrict__ X,   // (M, N)
                          const T* __restrict__ W,   // (N,) or nullptr (= ones)
                          const float* __restrict__ Mean, const float* __restrict__ Rstd,
                          T* __restrict__ dX,               // (M, N)
                          float* __restrict__ Partial,      // (G, 2, N): [g, 0] dw, [g, 1] db
                          int64_t M, int64_t N) {
  extern __shared__ float acc_smem[];  // (2, N) when SMEM_ACC
  __shared__ float scratch[64];
  float* part = Partial + int64_t(blockIdx.x) * 2 * N;
  float* dw_acc = SMEM_ACC ? acc_smem : part;
  float* db_acc = dw_acc + N;
  const int64_t nvec = N / VEC;
  const float inv_n = 1.f / float(N);

  // Thread t owns vectors t, t + blockDim.x, ... of every row: its accumulators are private.
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw_acc[i * VEC + k] = 0.f;
      db_acc[i * VEC + k] = 0.f;
    }
  }

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* x = X + row * N;
    const T* dy = dY + row * N;
    T* dx = dX + row * N;
    const float mean = Mean[row], rstd = Rstd[row];
    float sg = 0.f, sgx = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float xv[VEC], g[VEC], w[VEC];
      load_vec<T, VEC>(x + i * VEC, xv);
      load_vec<T, VEC>(dy + i * VEC, g);
      if (W != nullptr) {
        load_vec<T, VEC>(W + i * VEC, w);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] = 1.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (xv[k] - mean) * rstd;
        dw_acc[i * VEC + k] = fmaf(g[k], xhat, dw_acc[i * VEC + k]);
        db_acc[i * VEC + k] += g[k];
        const float gw = g[k] * w[k];
        sg += gw;
        sgx = fmaf(gw, xhat, sgx);
      }
    }
    block_sum2(sg, sgx, scratch);
    const float mg = sg * inv_n, mgx = sgx * inv_n;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float xv[VEC], g[VEC], w[VEC];
      load_vec<T, VEC>(x + i * VEC, xv);
      load_vec<T, VEC>(dy + i * VEC, g);
      if (W != nullptr) {
        load_vec<T, VEC>(W + i * VEC, w);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] = 1.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = (xv[k] - mean) * rstd;
        xv[k] = rstd * (g[k] * w[k] - mg - xhat * mgx);
      }
      store_vec<T, VEC>(dx + i * VEC, xv);
    }
  }

  if (SMEM_ACC) {
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        part[i * VEC + k] = dw_acc[i * VEC + k];
        part[N + i * VEC + k] = db_acc[i * VEC + k];
      }
    }
  }
}

// dW[c] = sum_g Partial[g, 0, c], dB[c] = sum_g Partial[g, 1, c]: 32 columns x 8 lanes per block,
// lane y sums g = y, y + 8, ... then lane sums are added in lane order (fixed order).
template <typename T>
__global__ void layer_norm_bwd_reduce_kernel(const float* __restrict__ Partial, T* __restrict__ dW,
                                             T* __restrict__ dB, int64_t G, int64_t N) {
  __shared__ float sw[kLnReduceLanes][kLnReduceCols + 1];
  __shared__ float sb[kLnReduceLanes][kLnReduceCols + 1];
  const int64_t c = int64_t(blockIdx.x) * kLnReduceCols + threadIdx.x;
  float w = 0.f, b = 0.f;
  if (c < N) {
    for (int64_t g = threadIdx.y; g < G; g += kLnReduceLanes) {
      w += Partial[g * 2 * N + c];
      b += Partial[g * 2 * N + N + c];
    }
  }
  sw[threadIdx.y][threadIdx.x] = w;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int y = 0; y < kLnReduceLanes; ++y) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    dW[c] = from_float<T>(tw);
    dB[c] = from_float<T>(tb);
  }
}

}  // namespace

cudaError_t layer_norm_fwd(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                           float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream) {
  if (N <= 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const bool al = aligned16(x) && aligned16(weight) && aligned16(bias) && aligned16(y);
  const int vec = ln_vec(N, dtype_size(dtype), al);
  const Launch l = ln_fwd_launch(M, N, vec);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(Tp);
    auto args = [&](auto kernel) {
      kernel<<<to_dim3(l.grid), to_dim3(l.block), l.smem, stream>>>(
          static_cast<const Tp*>(x), static_cast<const Tp*>(weight), static_cast<const Tp*>(bias),
          static_cast<Tp*>(y), mean, rstd, N, eps);
      return cudaGetLastError();
    };
    return vec > 1 ? args(layer_norm_fwd_kernel<Tp, V>) : args(layer_norm_fwd_kernel<Tp, 1>);
  });
}

cudaError_t layer_norm_bwd(DType dtype, const void* dy, const void* x, const void* weight, const float* mean,
                           const float* rstd, void* dx, void* dweight, void* dbias, float* partial, int64_t M,
                           int64_t N, cudaStream_t stream) {
  if (N <= 0) return cudaErrorInvalidValue;
  const bool al = aligned16(dy) && aligned16(x) && aligned16(weight) && aligned16(dx);
  const int vec = ln_vec(N, dtype_size(dtype), al);
  const Launch l = ln_bwd_launch(M, N, vec);
  const Launch lr = ln_reduce_launch(N);
  if (!launch_fits(l) || !launch_fits(lr)) return cudaErrorInvalidConfiguration;
  const int64_t G = l.grid.x;
  const bool smem_acc = ln_bwd_smem_acc(N);
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(Tp);
    if (M > 0) {
      auto run = [&](auto kernel) {
        kernel<<<to_dim3(l.grid), to_dim3(l.block), l.smem, stream>>>(
            static_cast<const Tp*>(dy), static_cast<const Tp*>(x), static_cast<const Tp*>(weight), mean, rstd,
            static_cast<Tp*>(dx), partial, M, N);
        return cudaGetLastError();
      };
      cudaError_t err;
      if (vec > 1)
        err = smem_acc ? run(layer_norm_bwd_kernel<Tp, V, true>) : run(layer_norm_bwd_kernel<Tp, V, false>);
      else
        err = smem_acc ? run(layer_norm_bwd_kernel<Tp, 1, true>) : run(layer_norm_bwd_kernel<Tp, 1, false>);
      if (err != cudaSuccess) return err;
    } else {
      // No rows: dw = db = 0 (the reduce kernel reads one all-zero partial row).
      cudaError_t err = cudaMemsetAsync(partial, 0, sizeof(float) * 2 * size_t(N), stream);
      if (err != cudaSuccess) return err;
    }
    layer_norm_bwd_reduce_kernel<Tp><<<to_dim3(lr.grid), to_dim3(lr.block), 0, stream>>>(
        partial, static_cast<Tp*>(dweight), static_cast<Tp*>(dbias), G, N);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace gptfast
