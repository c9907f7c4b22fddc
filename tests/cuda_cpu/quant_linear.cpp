// CPU driver of gptfast::cuda::quantized_linear (csrc/cuda/quant_linear.cu) under cudashim: the
// int8 / int4 decode GEMV against a reference computed here in double from the dequantized
// weights (formats: gptfast/ops/quant.py): int8 per channel (fp32 scales) and in groups of
// 32 / 64 / 128 (fp16 scales), int4 in groups with llama.cpp q4_0's packing (byte j of each
// 16-byte block holds k = j low, k = j + 16 high), symmetric and with fp16 zero points.
// Covers: every dtype of x, M on both sides of each row-chunk size (1, 2, 3, 5, 16, 17, 33), odd
// N, K that is not a multiple of the 512 weights a warp reads per step, the 16-byte path and the
// scalar one (K % 16 != 0, a misaligned x or weight pointer), bias absent, codes at their
// extremes (-127 / 127, nibbles 0 / 15), a zero scale, and the launcher's refusals.
#include "common.h"

using drv::Buf;
using gptfast::cuda::DType;

namespace {

// An exactly sized host buffer of T (so ASan sees a read past its end), `offset` bytes of padding
// in front (a misaligned data pointer when offset % 16 != 0).
template <typename T>
class Raw {
 public:
  Raw(int64_t n, int64_t offset_bytes = 0) : n_(n), off_(offset_bytes) {
    raw_ = static_cast<unsigned char*>(std::malloc(size_t(n) * sizeof(T) + size_t(off_) + 1));
  }
  ~Raw() { std::free(raw_); }
  Raw(const Raw&) = delete;
  Raw& operator=(const Raw&) = delete;
  T* data() { return reinterpret_cast<T*>(raw_ + off_); }
  T& operator[](int64_t i) { return data()[i]; }

 private:
  int64_t n_, off_;
  unsigned char* raw_;
};

struct Case {
  int bits;
  int64_t group;  // 0 = per output channel (int8)
  bool zero;
  int64_t M, N, K;
  DType dt;
  bool bias;
  int64_t x_off, w_off;  // misalignment: x elements, weight bytes
};

double half_round(double v) { return __half2float(__float2half_rn(float(v))); }

void run(const Case& c) {
  const int64_t M = c.M, N = c.N, K = c.K;
  const int64_t G = c.group > 0 ? K / c.group : 0;
  char name[200];
  std::snprintf(name, sizeof name, "int%d %s%s %s M%lld N%lld K%lld%s%s%s", c.bits,
                c.group ? ("g" + std::to_string(c.group)).c_str() : "per-channel", c.zero ? " zp" : "",
                drv::dtype_name(c.dt), (long long)M, (long long)N, (long long)K, c.bias ? "" : " no-bias",
                c.x_off ? " misaligned-x" : "", c.w_off ? " misaligned-w" : "");
  // codes: q (N, K) in -127..127 (int8) or nibbles u in 0..15 (int4), extremes included
  std::vector<int> code(size_t(N * K));
  for (int64_t i = 0; i < N * K; ++i) {
    const int r = int(drv::uniform(0.0, 1.0) * 1000.0);
    if (c.bits == 8)
      code[i] = r < 20 ? -127 : (r < 40 ? 127 : int(std::lround(drv::uniform(-127.0, 127.0))));
    else
      code[i] = r < 40 ? 0 : (r < 80 ? 15 : int(std::lround(drv::uniform(0.0, 15.0))));
  }
  // scales / zeros as stored (fp32 per channel, fp16 per group); one group scale 0
  std::vector<double> s(size_t(c.group ? N * G : N)), z(size_t(c.zero ? N * G : 0));
  for (auto& v : s) v = c.group ? half_round(drv::uniform(0.001, 0.05)) : double(float(drv::uniform(0.001, 0.05)));
  if (!s.empty() && N * K > 64) s[s.size() / 2] = 0.0;
  for (auto& v : z) v = half_round(drv::uniform(-0.2, 0.2));
  auto wdeq = [&](int64_t n, int64_t k) {  // the dequantized weight in double
    const int64_t i = n * K + k;
    if (c.bits == 8) return double(code[i]) * (c.group ? s[n * G + k / c.group] : s[n]);
    const int64_t g = n * G + k / c.group;
    return (double(code[i]) - 8.0) * s[g] + (c.zero ? z[g] : 0.0);
  };
  auto wdeq32 = [&](int64_t n, int64_t k) {  // the same in fp32 arithmetic (PyTorch's baseline)
    const int64_t i = n * K + k;
    if (c.bits == 8) return float(code[i]) * float(c.group ? s[n * G + k / c.group] : s[n]);
    const int64_t g = n * G + k / c.group;
    return (float(code[i]) - 8.f) * float(s[g]) + (c.zero ? float(z[g]) : 0.f);
  };

  const int64_t wbytes = c.bits == 8 ? N * K : N * K / 2;
  Raw<uint8_t> qw(wbytes, c.w_off);
  for (int64_t n = 0; n < N; ++n) {
    if (c.bits == 8) {
      for (int64_t k = 0; k < K; ++k) qw[n * K + k] = uint8_t(int8_t(code[n * K + k]));
    } else {
      for (int64_t b = 0; b < K / 32; ++b)
        for (int j = 0; j < 16; ++j)
          qw[n * K / 2 + 16 * b + j] =
              uint8_t(code[n * K + 32 * b + j] | (code[n * K + 32 * b + j + 16] << 4));
    }
  }
  Raw<float> s32(c.group ? 0 : N);
  Raw<__half> s16(c.group ? N * G : 0), z16(c.zero ? N * G : 0);
  for (size_t i = 0; i < s.size(); ++i) {
    if (c.group)
      s16[i] = __float2half_rn(float(s[i]));
    else
      s32[i] = float(s[i]);
  }
  for (size_t i = 0; i < z.size(); ++i) z16[i] = __float2half_rn(float(z[i]));

  std::vector<double> xv(size_t(M * K)), bv(size_t(N), 0.0);
  for (auto& v : xv) v = drv::rnd(c.dt, drv::normal());
  for (auto& v : bv) v = drv::rnd(c.dt, drv::normal());
  Buf xb(c.dt, M * K, c.x_off), yb(c.dt, M * N), bb(c.dt, N);
  for (int64_t i = 0; i < M * K; ++i) xb.set(i, xv[i]);
  for (int64_t j = 0; j < N; ++j) bb.set(j, bv[j]);

  const cudaError_t e = gptfast::cuda::quantized_linear(
      c.dt, xb.ptr(), qw.data(), c.group ? static_cast<const void*>(s16.data()) : s32.data(),
      c.zero ? z16.data() : nullptr, c.bias ? bb.ptr() : nullptr, yb.ptr(), M, N, K, c.bits, c.group, nullptr);
  drv::expect_status(std::string("quantized_linear launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  std::vector<double> r64(size_t(M * N)), r32(size_t(M * N));
  std::vector<double> wrow(static_cast<size_t>(K));
  std::vector<float> wrow32(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      wrow[k] = wdeq(n, k);
      wrow32[k] = wdeq32(n, k);
    }
    for (int64_t m = 0; m < M; ++m) {
      double a = 0.0;
      float a32 = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        a += xv[m * K + k] * wrow[k];
        a32 += float(xv[m * K + k]) * wrow32[k];
      }
      r64[m * N + n] = a + (c.bias ? bv[n] : 0.0);
      r32[m * N + n] = double(a32 + (c.bias ? float(bv[n]) : 0.f));
    }
  }
  drv::check_buf(std::string("quantized_linear ") + name, yb, r64, r32);
}

void refusals() {
  Buf x(DType::kFloat32, 64), y(DType::kFloat32, 4);
  Raw<uint8_t> w(4 * 64);
  Raw<__half> s(4 * 2);
  const auto call = [&](int bits, int64_t group, int64_t K, bool zero) {
    return gptfast::cuda::quantized_linear(DType::kFloat32, x.ptr(), w.data(), s.data(), zero ? s.data() : nullptr,
                                           nullptr, y.ptr(), 1, 4, K, bits, group, nullptr);
  };
  drv::expect_status("refuses bits=3", call(3, 32, 64, false), cudaErrorInvalidValue);
  drv::expect_status("refuses group 48", call(8, 48, 48, false), cudaErrorInvalidValue);
  drv::expect_status("refuses int4 per channel", call(4, 0, 64, false), cudaErrorInvalidValue);
  drv::expect_status("refuses K % group != 0", call(8, 32, 48, false), cudaErrorInvalidValue);
  drv::expect_status("refuses a zero point on int8", call(8, 32, 64, true), cudaErrorInvalidValue);
  drv::expect_status("M = 0 is a no-op", gptfast::cuda::quantized_linear(DType::kFloat32, x.ptr(), w.data(), s.data(),
                                                                         nullptr, nullptr, y.ptr(), 0, 4, 64, 8, 32,
                                                                         nullptr),
                     cudaSuccess);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  std::vector<Case> cases;
  // format: (bits, group, zero) with a K legal for it and not a multiple of 512
  struct Fmt {
    int bits;
    int64_t group;
    bool zero;
    int64_t K;
  };
  const std::vector<Fmt> fmts = {{8, 0, false, 80},  {8, 0, false, 33},  {8, 32, false, 96}, {8, 64, false, 192},
                                 {8, 128, false, 384}, {4, 32, false, 96}, {4, 64, true, 192}, {4, 128, false, 640},
                                 {4, 32, true, 64}};
  if (lv == drv::Level::kTiny) {
    cases = {{8, 32, false, 2, 3, 64, DType::kFloat32, true, 0, 0},
             {8, 0, false, 1, 2, 33, DType::kFloat16, true, 0, 0},
             {4, 32, true, 3, 2, 64, DType::kBFloat16, false, 0, 0}};
  } else {
    const bool big = lv >= drv::Level::kDefault;
    for (const Fmt& f : fmts) {
      for (DType dt : drv::all_dtypes()) {
        cases.push_back({f.bits, f.group, f.zero, 1, 37, f.K, dt, true, 0, 0});
        if (big) cases.push_back({f.bits, f.group, f.zero, 3, 5, f.K, dt, dt != DType::kFloat16, 0, 0});
      }
      cases.push_back({f.bits, f.group, f.zero, 2, 5, f.K, DType::kFloat32, true, 1, 0});  // scalar: misaligned x
      cases.push_back({f.bits, f.group, f.zero, 2, 5, f.K, DType::kFloat16, true, 0, 3});  // scalar: misaligned w
      if (big)
        for (int64_t M : {5, 16, 17, 33}) cases.push_back({f.bits, f.group, f.zero, M, 3, f.K, DType::kBFloat16, true, 0, 0});
    }
    if (big) {  // rows longer than one warp step (512 int8 / 1024 int4 weights), several steps
      cases.push_back({8, 32, false, 2, 9, 1600, DType::kFloat32, true, 0, 0});
      cases.push_back({8, 0, false, 1, 9, 1040, DType::kFloat16, true, 0, 0});
      cases.push_back({4, 64, true, 2, 9, 2112, DType::kBFloat16, true, 0, 0});
    }
    if (lv == drv::Level::kFull) {
      for (int bits : {8, 4})
        for (int64_t M : {1, 4, 8, 16})
          cases.push_back({bits, 32, bits == 4, M, 64, 4096, DType::kBFloat16, true, 0, 0});
    }
  }
  for (const Case& c : cases) run(c);
  refusals();
  return drv::finish();
}
