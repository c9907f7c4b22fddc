// Elementwise parts of GPT-2's MLP on CUDA; the matmuls run on cuBLAS through ATen
// (csrc/cuda/bindings.cpp), which no hand-written GEMM here would beat.
//
// Forward epilogue: pre = x w_fc^T comes from at::mm; one pass adds b_fc in fp32, rounds pre to the
// input dtype (kept for the backward) and writes h = gelu(pre): GPT-2's tanh approximation
// (exact = false) or the exact erf form 0.5 x (1 + erf(x / sqrt 2)) (exact = true, Hendrycks &
// Gimpel 2016; torch's approximate="none"). Eager PyTorch spends one pass
// on the bias and ~5 on the tanh-GELU formula (each a full read + write of (M, F)).
// Backward: dh = dy w_proj comes from at::mm; one pass recomputes h = gelu(pre) (needed for
// dw_proj = dy^T h, so h is never stored between forward and backward) and turns dh into
// dpre = dh * gelu'(pre) in place.
// Both are grid-stride loops over 16-byte vectors when F and the pointers allow it.
#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kBeta = 0.044715f;

constexpr float kSqrtHalf = 0.7071067811865476f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1 / sqrt(2 pi)

__device__ __forceinline__ float gelu_tanh(float p) {
  const float t = tanhf(kAlpha * fmaf(kBeta * p * p, p, p));
  return 0.5f * p * (1.f + t);
}

__device__ __forceinline__ float gelu_erf(float p) { return 0.5f * p * (1.f + erff(p * kSqrtHalf)); }

// gelu(x) and gelu'(x) of the chosen form.
template <bool EXACT>
__device__ __forceinline__ void gelu_and_grad(float x, float& h, float& d) {
  if (EXACT) {
    // d/dx [0.5 x (1 + erf(x / sqrt 2))] = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
    const float c = 0.5f * (1.f + erff(x * kSqrtHalf));
    h = x * c;
    d = c + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  } else {
    const float t = tanhf(kAlpha * fmaf(kBeta * x * x, x, x));
    h = 0.5f * x * (1.f + t);
    // d/dx [0.5 x (1 + tanh(u))] = 0.5 (1 + t) + 0.5 x (1 - t^2) u',  u' = alpha (1 + 3 beta x^2)
    d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kAlpha * fmaf(3.f * kBeta, x * x, 1.f);
  }
}

template <typename T, int VEC, bool EXACT>
__global__ void gelu_bias_fwd_kernel(T* __restrict__ Pre,         // (M, F), in: x w_fc^T, out: + b_fc
                                     const T* __restrict__ Bias,  // (F,) or nullptr
                                     T* __restrict__ H,           // (M, F) gelu(pre)
                                     int64_t n, int64_t F) {
  const int64_t nvec = n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    float p[VEC], h[VEC];
    load_vec<T, VEC>(Pre + i * VEC, p);
    if (Bias != nullptr) {
      const int64_t col = (i * VEC) % F;  // F % VEC == 0 on the vector path: no row straddling
#pragma unroll
      for (int k = 0; k < VEC; ++k) p[k] += to_float(Bias[col + k]);
      // Round pre as it is stored, so that h here and the backward's gelu(pre) see the same value.
#pragma unroll
      for (int k = 0; k < VEC; ++k) p[k] = to_float(from_float<T>(p[k]));
      store_vec<T, VEC>(Pre + i * VEC, p);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[k] = EXACT ? gelu_erf(p[k]) : gelu_tanh(p[k]);
    store_vec<T, VEC>(H + i * VEC, h);
  }
}

template <typename T, int VEC, bool EXACT>
__global__ void gelu_bwd_kernel(const T* __restrict__ Pre,  // (n,)
                                T* __restrict__ dH,         // (n,), in: dh, out: dpre
                                T* __restrict__ H,          // (n,) gelu(pre)
                                int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    float p[VEC], g[VEC], h[VEC];
    load_vec<T, VEC>(Pre + i * VEC, p);
    load_vec<T, VEC>(dH + i * VEC, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float d;
      gelu_and_grad<EXACT>(p[k], h[k], d);
      g[k] *= d;
    }
    store_vec<T, VEC>(dH + i * VEC, g);
    store_vec<T, VEC>(H + i * VEC, h);
  }
}

}  // namespace

cudaError_t gelu_bias_fwd(DType dtype, void* pre, const void* bias, void* h, int64_t M, int64_t F, bool exact,
                          cudaStream_t stream) {
  const int64_t n = M * F;
  if (n == 0) return cudaSuccess;
  const size_t es = dtype_size(dtype);
  const int v = int(16 / es);
  const bool vec_ok = aligned16(pre) && aligned16(bias) && aligned16(h) && F % v == 0;
  const int vec = vec_ok ? v : 1;
  const Launch l = gelu_launch(n, vec);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(Tp);
    auto run = [&](auto kernel) {
      kernel<<<to_dim3(l.grid), to_dim3(l.block), 0, stream>>>(static_cast<Tp*>(pre), static_cast<const Tp*>(bias),
                                                               static_cast<Tp*>(h), n, F);
      return cudaGetLastError();
    };
    if (exact) return vec > 1 ? run(gelu_bias_fwd_kernel<Tp, V, true>) : run(gelu_bias_fwd_kernel<Tp, 1, true>);
    return vec > 1 ? run(gelu_bias_fwd_kernel<Tp, V, false>) : run(gelu_bias_fwd_kernel<Tp, 1, false>);
  });
}

cudaError_t gelu_bwd(DType dtype, const void* pre, void* dh, void* h, int64_t n, bool exact, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const size_t es = dtype_size(dtype);
  const int v = int(16 / es);
  const bool vec_ok = aligned16(pre) && aligned16(dh) && aligned16(h) && n % v == 0;
  const int vec = vec_ok ? v : 1;
  const Launch l = gelu_launch(n, vec);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(Tp);
    auto run = [&](auto kernel) {
      kernel<<<to_dim3(l.grid), to_dim3(l.block), 0, stream>>>(static_cast<const Tp*>(pre), static_cast<Tp*>(dh),
                                                               static_cast<Tp*>(h), n);
      return cudaGetLastError();
    };
    if (exact) return vec > 1 ? run(gelu_bwd_kernel<Tp, V, true>) : run(gelu_bwd_kernel<Tp, 1, true>);
    return vec > 1 ? run(gelu_bwd_kernel<Tp, V, false>) : run(gelu_bwd_kernel<Tp, 1, false>);
  });
}

}  // namespace cuda
}  // namespace gptfast
