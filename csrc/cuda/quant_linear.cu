// Linear layers with quantized weights on CUDA (issue #20): the decode GEMV y = x w^T + b for a few
// rows of x (M <= 16 per chunk of rows), w stored as int8 or packed int4 (formats:
// gptfast/ops/quant.py; the lead's contract).
//
// At batch 1..16 a linear layer reads every weight once and does 1..16 multiply-adds per weight:
// it is bound by memory bandwidth, so the kernel streams the quantized bytes once with 16-byte
// loads and dequantizes in registers (the approach of llama.cpp's CUDA mul_mat_vec_q and of
// gpt-fast's int8 / int4 linears, github.com/pytorch-labs/gpt-fast; our own code):
//
// - One warp per output column n (a weight row), kQLinWarps warps per block. Each lane walks K in
//   16-byte steps of the weight row: 16 int8 weights, or one whole q4_0 block of 32 int4 weights
//   (byte j holds k = j in its low and k = j + 16 in its high nibble), and multiplies them with the
//   matching x values of every row of its chunk (fp32 registers, one accumulator per row).
// - Scales are applied per 16 / 32 weights to the partial dot product (a 16-byte step never
//   straddles a group: groups are 32 / 64 / 128 long), per output channel once at the end; an int4
//   zero point z adds z * sum(x) per block instead of z to every weight.
// - The warp's lanes are reduced with a butterfly of shuffles (fixed order: deterministic), then
//   lane m writes row m's output with the bias added.
// Where the sizes or pointers do not allow 16-byte loads (K % 16 != 0 for per-channel int8, or a
// misaligned view) a scalar path walks one weight (int8) or one byte (int4) per lane step.
// Rows beyond 16 run as further chunks (grid.y); the GEMV stays a GEMV (each chunk re-reads the
// weights), which is why the Triton / cuBLAS paths take larger M.
#include "common.cuh"

namespace gptfast {
namespace cuda {
namespace {

// 16 consecutive values of x from p, as fp32: 16-byte vector loads when VEC, else scalar loads.
template <typename T, bool VEC>
__device__ __forceinline__ void load_x16(const T* p, float (&out)[16]) {
  if (VEC) {
    constexpr int V = 16 / int(sizeof(T));
#pragma unroll
    for (int i = 0; i < 16; i += V) {
      float part[V];
      load_vec<T, V>(p + i, part);
#pragma unroll
      for (int j = 0; j < V; ++j) out[i + j] = part[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = to_float(p[i]);
  }
}

template <typename T, int BITS, int MR>
__global__ void __launch_bounds__(32 * kQLinWarps)
quant_gemv_kernel(const T* __restrict__ X,         // (M, K)
                  const void* __restrict__ QW,     // int8 (N, K) | uint8 (N, K / 2) packed int4
                  const void* __restrict__ S,      // fp32 (N,) per channel | fp16 (N, K / group)
                  const __half* __restrict__ Z,    // fp16 (N, K / group) or nullptr (int4 only)
                  const T* __restrict__ Bias,      // (N,) or nullptr
                  T* __restrict__ Y,               // (M, N)
                  int64_t M, int64_t N, int64_t K,
                  int64_t group,                   // 0 = per output channel (int8)
                  bool vec) {                      // 16-byte loads allowed (host-checked)
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kQLinWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // the whole warp leaves: no shuffle below is reached by part of a warp
  const int64_t m0 = int64_t(blockIdx.y) * MR;
  const int rows = M - m0 < MR ? int(M - m0) : MR;
  const T* x = X + m0 * K;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;

  if (BITS == 8) {
    const int8_t* w = static_cast<const int8_t*>(QW) + n * K;
    const __half* sg = group > 0 ? static_cast<const __half*>(S) + n * (K / group) : nullptr;
    if (vec) {
      for (int64_t k = int64_t(lane) * 16; k < K; k += 32 * 16) {
        const Vec<int8_t, 16> q = *reinterpret_cast<const Vec<int8_t, 16>*>(w + k);
        float wf[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) wf[i] = float(q.v[i]);
        const float s = sg != nullptr ? __half2float(sg[k / group]) : 1.f;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < rows) {
            float xv[16];
            load_x16<T, true>(x + m * K + k, xv);
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) d = fmaf(xv[i], wf[i], d);
            acc[m] = fmaf(s, d, acc[m]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float wv = float(w[k]) * (sg != nullptr ? __half2float(sg[k / group]) : 1.f);
#pragma unroll
        for (int m = 0; m < MR; ++m)
          if (m < rows) acc[m] = fmaf(to_float(x[m * K + k]), wv, acc[m]);
      }
    }
  } else {
    const uint8_t* w = static_cast<const uint8_t*>(QW) + n * (K / 2);
    const int64_t G = K / group;
    const __half* sg = static_cast<const __half*>(S) + n * G;
    const __half* zg = Z != nullptr ? Z + n * G : nullptr;
    if (vec) {
      for (int64_t b = lane; b < K / 32; b += 32) {  // q4_0 block b: bytes 16 b .. 16 b + 15
        const Vec<uint8_t, 16> q = *reinterpret_cast<const Vec<uint8_t, 16>*>(w + 16 * b);
        float lo[16], hi[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          lo[j] = float(q.v[j] & 15) - 8.f;  // k = 32 b + j
          hi[j] = float(q.v[j] >> 4) - 8.f;  // k = 32 b + j + 16
        }
        const int64_t k = 32 * b;
        const float s = __half2float(sg[k / group]);
        const float z = zg != nullptr ? __half2float(zg[k / group]) : 0.f;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < rows) {
            float xa[16], xb[16];
            load_x16<T, true>(x + m * K + k, xa);
            load_x16<T, true>(x + m * K + k + 16, xb);
            float d = 0.f, sx = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
              d = fmaf(xa[j], lo[j], d);
              d = fmaf(xb[j], hi[j], d);
              sx += xa[j] + xb[j];
            }
            acc[m] = fmaf(s, d, acc[m]);
            if (zg != nullptr) acc[m] = fmaf(z, sx, acc[m]);
          }
        }
      }
    } else {
      for (int64_t c = lane; c < K / 2; c += 32) {  // byte c holds k and k + 16
        const int byte = w[c];
        const int64_t k = 32 * (c / 16) + c % 16;
        const float s = __half2float(sg[k / group]);
        const float z = zg != nullptr ? __half2float(zg[k / group]) : 0.f;
        const float wl = fmaf(float(byte & 15) - 8.f, s, z);
        const float wh = fmaf(float(byte >> 4) - 8.f, s, z);
#pragma unroll
        for (int m = 0; m < MR; ++m)
          if (m < rows) acc[m] = fmaf(to_float(x[m * K + k]), wl, fmaf(to_float(x[m * K + k + 16]), wh, acc[m]));
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = warp_sum(acc[m]);
  const float sc = (BITS == 8 && group == 0) ? static_cast<const float*>(S)[n] : 1.f;
  const float bv = Bias != nullptr ? to_float(Bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MR; ++m)
    if (m < rows && lane == m) Y[(m0 + m) * N + n] = from_float<T>(fmaf(acc[m], sc, bv));
}

}  // namespace

cudaError_t quantized_linear(DType dtype, const void* x, const void* qweight, const void* scale, const void* zero,
                             const void* bias, void* y, int64_t M, int64_t N, int64_t K, int bits,
                             int64_t group_size, cudaStream_t stream) {
  const bool group_ok = group_size == 32 || group_size == 64 || group_size == 128;
  if (bits != 8 && bits != 4) return cudaErrorInvalidValue;
  if (!(group_ok || (bits == 8 && group_size == 0))) return cudaErrorInvalidValue;
  if (M < 0 || N < 0 || K < 0 || (group_size > 0 && K % group_size != 0) || (bits == 4 && K % 32 != 0))
    return cudaErrorInvalidValue;
  if (zero != nullptr && bits != 4) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  const Launch l = qlin_launch(M, N);
  if (!launch_fits(l)) return cudaErrorInvalidConfiguration;
  // 16-byte loads: weight rows (K or K / 2 bytes) and x rows start on 16-byte boundaries.
  const bool vec = aligned16(qweight) && aligned16(x) && (bits == 4 || K % 16 == 0);
  const int rows = qlin_rows(M);
  return dispatch_dtype(dtype, [&](auto tag) {
    using Tp = std::remove_pointer_t<decltype(tag)>;
    auto run = [&](auto kernel) {
      kernel<<<to_dim3(l.grid), to_dim3(l.block), 0, stream>>>(
          static_cast<const Tp*>(x), qweight, scale, static_cast<const __half*>(zero), static_cast<const Tp*>(bias),
          static_cast<Tp*>(y), M, N, K, group_size, vec);
      return cudaGetLastError();
    };
    auto by_rows = [&](auto bits_tag) {
      constexpr int B = decltype(bits_tag)::value;
      switch (rows) {
        case 1:
          return run(quant_gemv_kernel<Tp, B, 1>);
        case 2:
          return run(quant_gemv_kernel<Tp, B, 2>);
        case 4:
          return run(quant_gemv_kernel<Tp, B, 4>);
        case 8:
          return run(quant_gemv_kernel<Tp, B, 8>);
        default:
          return run(quant_gemv_kernel<Tp, B, 16>);
      }
    };
    return bits == 8 ? by_rows(std::integral_constant<int, 8>{}) : by_rows(std::integral_constant<int, 4>{});
  });
}

}  // namespace cuda
}  // namespace gptfast
