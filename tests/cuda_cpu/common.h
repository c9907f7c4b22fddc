// Shared helpers of the CPU drivers of gptfast's CUDA launchers (tests/cuda_cpu/*.cpp).
//
// The drivers are built by tests/test_cuda_shim.py with g++ against ../shared/tools/cudashim (CUDA
// kernels as fibers on the CPU) and the mechanically translated csrc/cuda sources; each calls the
// real host launchers of csrc/cuda/launch.h on host buffers and compares every output with a
// reference written in plain loops in the driver.
//
// Tolerance rule (the project's one rule, tests/helpers.py::assert_error_within, here in C++):
//   max |out - ref64| <= 2 * max |base - ref64| + 1e-5
// where ref64 is the reference computed in fp64 from the (dtype-rounded) inputs, and base is the
// "PyTorch error" analogue: the same reference loops run in fp32 arithmetic (as PyTorch computes
// fp32, and fp16 / bf16 ops with fp32 accumulation) with the result rounded through the output
// dtype. So an fp16 output may be off by about twice one rounding of the exact result (plus fp32
// accumulation error), an fp32 output by about twice what naive fp32 loops get. A NaN / inf in an
// output where the reference is finite always fails.
//
// Usage: driver [tiny|small|default|full]: the shape set (TSan runs tiny, ASan and shuffled
// schedules small, the plain default-schedule run default, the slow sweep full). Prints one line per
// check and exits 1 if any failed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "launch.h"

namespace drv {

using gptfast::cuda::DType;

enum class Level { kTiny = 0, kSmall = 1, kDefault = 2, kFull = 3 };

inline Level parse_level(int argc, char** argv) {
  const std::string a = argc > 1 ? argv[1] : "default";
  if (a == "tiny") return Level::kTiny;
  if (a == "small") return Level::kSmall;
  if (a == "default") return Level::kDefault;
  if (a == "full") return Level::kFull;
  std::fprintf(stderr, "usage: %s [tiny|small|default|full] (got %s)\n", argv[0], a.c_str());
  std::exit(2);
}

inline const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "fp32" : (t == DType::kFloat16 ? "fp16" : "bf16");
}

// Round a value through a dtype's storage (round to nearest even, as the CUDA conversions).
inline double rnd(DType t, double v) {
  const float f = float(v);
  if (t == DType::kFloat32) return f;
  if (t == DType::kFloat16) return __half2float(__float2half_rn(f));
  return __bfloat162float(__float2bfloat16_rn(f));
}

// A host buffer of n elements of a dtype, allocated exactly (so ASan sees any read past its end).
// `offset` elements of padding in front make the data pointer misaligned for 16-byte vectors.
class Buf {
 public:
  Buf(DType t, int64_t n, int64_t offset = 0) : t_(t), n_(n), off_(offset) {
    raw_ = static_cast<unsigned char*>(std::malloc(size_t(n + offset) * es() + 1));
    std::memset(raw_, 0xFF, size_t(n + offset) * es());  // NaN pattern: unwritten outputs show up
  }
  ~Buf() { std::free(raw_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  size_t es() const { return gptfast::cuda::dtype_size(t_); }
  void* ptr() { return raw_ + size_t(off_) * es(); }
  const void* ptr() const { return raw_ + size_t(off_) * es(); }
  int64_t size() const { return n_; }
  DType dtype() const { return t_; }
  double get(int64_t i) const {
    const unsigned char* p = static_cast<const unsigned char*>(ptr()) + size_t(i) * es();
    if (t_ == DType::kFloat32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    if (t_ == DType::kFloat16) {
      __half h;
      std::memcpy(&h, p, 2);
      return __half2float(h);
    }
    __nv_bfloat16 b;
    std::memcpy(&b, p, 2);
    return __bfloat162float(b);
  }
  void set(int64_t i, double v) {
    unsigned char* p = static_cast<unsigned char*>(ptr()) + size_t(i) * es();
    if (t_ == DType::kFloat32) {
      const float f = float(v);
      std::memcpy(p, &f, 4);
    } else if (t_ == DType::kFloat16) {
      const __half h = __float2half_rn(float(v));
      std::memcpy(p, &h, 2);
    } else {
      const __nv_bfloat16 b = __float2bfloat16_rn(float(v));
      std::memcpy(p, &b, 2);
    }
  }
  void fill_nan() { std::memset(raw_, 0xFF, size_t(n_ + off_) * es()); }

 private:
  DType t_;
  int64_t n_, off_;
  unsigned char* raw_;
};

inline std::mt19937_64& rng() {
  static std::mt19937_64 g(12345);
  return g;
}
inline double normal() {
  static std::normal_distribution<double> d(0.0, 1.0);
  return d(rng());
}
inline double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng()); }

// ---------------------------------------------------------------------------- results

struct Tally {
  int passed = 0, failed = 0;
};
inline Tally& tally() {
  static Tally t;
  return t;
}

inline void report(bool ok, const std::string& what, const std::string& detail) {
  if (ok)
    ++tally().passed;
  else
    ++tally().failed;
  std::printf("%s %s %s\n", ok ? "PASS" : "FAIL", what.c_str(), detail.c_str());
  std::fflush(stdout);
}

// Compare `n` outputs: got(i), ref64[i], ref32[i] (the fp32-arithmetic reference, rounded here
// through `out_dtype` to form the baseline). Returns true if within the rule above.
template <typename GotFn>
bool check(const std::string& what, DType out_dtype, int64_t n, GotFn got, const std::vector<double>& ref64,
           const std::vector<double>& ref32) {
  double ours = 0.0, theirs = 0.0;
  int64_t worst = -1, bad_nonfinite = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i), r = ref64[i];
    if (!std::isfinite(r)) {
      std::printf("FAIL %s: reference not finite at %lld (driver bug)\n", what.c_str(), (long long)i);
      ++tally().failed;
      return false;
    }
    if (!std::isfinite(g)) {
      if (bad_nonfinite < 0) bad_nonfinite = i;
      continue;
    }
    const double e = std::fabs(g - r);
    if (e > ours) {
      ours = e;
      worst = i;
    }
    theirs = std::fmax(theirs, std::fabs(rnd(out_dtype, ref32[i]) - r));
  }
  const double allowed = 2.0 * theirs + 1e-5;
  char buf[320];
  if (bad_nonfinite >= 0) {
    std::snprintf(buf, sizeof buf, "non-finite output at %lld (got %g, ref %g)", (long long)bad_nonfinite,
                  got(bad_nonfinite), ref64[bad_nonfinite]);
    report(false, what, buf);
    return false;
  }
  const bool ok = ours <= allowed;
  if (worst >= 0)
    std::snprintf(buf, sizeof buf, "max err %.3g (at %lld: got %.8g ref %.8g) <= 2 x base %.3g + 1e-5", ours,
                  (long long)worst, got(worst), ref64[worst], theirs);
  else
    std::snprintf(buf, sizeof buf, "exact (base %.3g)", theirs);
  report(ok, what, buf);
  return ok;
}

inline bool check_buf(const std::string& what, const Buf& b, const std::vector<double>& ref64,
                      const std::vector<double>& ref32) {
  return check(what, b.dtype(), b.size(), [&](int64_t i) { return b.get(i); }, ref64, ref32);
}
inline bool check_f32(const std::string& what, const float* p, int64_t n, const std::vector<double>& ref64,
                      const std::vector<double>& ref32) {
  return check(what, DType::kFloat32, n, [&](int64_t i) { return double(p[i]); }, ref64, ref32);
}

inline void expect_status(const std::string& what, cudaError_t got, cudaError_t want) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "status %d (%s), want %d (%s)", int(got), cudaGetErrorString(got), int(want),
                cudaGetErrorString(want));
  report(got == want, what, buf);
}

inline int finish() {
  std::printf("%d checks passed, %d failed\n", tally().passed, tally().failed);
  return tally().failed == 0 && tally().passed > 0 ? 0 : 1;
}

inline std::vector<DType> all_dtypes() { return {DType::kFloat32, DType::kFloat16, DType::kBFloat16}; }

}  // namespace drv
