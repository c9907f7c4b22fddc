// CPU driver of gptfast::cuda::gelu_bias_fwd / gelu_bwd (csrc/cuda/gelu_mlp.cu) under cudashim: the
// elementwise epilogues of the GELU MLP (its GEMMs are cuBLAS through ATen; not part of this test).
// Covers the 16-byte vector path (F % vec == 0, aligned pointers), the scalar path (F not a
// multiple of the vector width, or a misaligned pointer), bias absent, every dtype, both GELU forms
// (exact = false: GPT-2's tanh approximation; exact = true: 0.5 x (1 + erf(x / sqrt 2))).
#include "common.h"

using drv::Buf;
using gptfast::cuda::DType;

namespace {

// GELU and its derivative in arithmetic R: tanh approximation (GPT-2's) or exact (erf).
template <typename R>
R gelu(R x, bool exact) {
  if (exact) return R(0.5) * x * (R(1) + std::erf(x / std::sqrt(R(2))));
  const R a = R(0.7978845608028654), b = R(0.044715);
  return R(0.5) * x * (R(1) + std::tanh(a * (x + b * x * x * x)));
}
template <typename R>
R gelu_grad(R x, bool exact) {
  if (exact)
    return R(0.5) * (R(1) + std::erf(x / std::sqrt(R(2)))) +
           x * std::exp(-x * x / R(2)) / std::sqrt(R(2) * R(3.141592653589793238));
  const R a = R(0.7978845608028654), b = R(0.044715);
  const R t = std::tanh(a * (x + b * x * x * x));
  return R(0.5) * (R(1) + t) + R(0.5) * x * (R(1) - t * t) * a * (R(1) + R(3) * b * x * x);
}

struct Shape {
  int64_t M, F;
  bool bias, misalign;
};

void run_fwd(DType dt, const Shape& s, bool exact) {
  const int64_t n = s.M * s.F, off = s.misalign ? 1 : 0;
  char name[128];
  std::snprintf(name, sizeof name, "%s %s M%lld F%lld%s%s", exact ? "exact" : "tanh", drv::dtype_name(dt),
                (long long)s.M, (long long)s.F, s.bias ? "" : " no-bias", s.misalign ? " misaligned" : "");
  std::vector<double> pre(n), bias(s.F, 0.0);
  for (auto& x : pre) x = drv::rnd(dt, 2.0 * drv::normal());
  for (auto& x : bias) x = drv::rnd(dt, drv::normal());
  Buf preb(dt, n, off), hb(dt, n, off), bb(dt, s.F);
  for (int64_t i = 0; i < n; ++i) preb.set(i, pre[i]);
  for (int64_t j = 0; j < s.F; ++j) bb.set(j, bias[j]);
  const cudaError_t e =
      gptfast::cuda::gelu_bias_fwd(dt, preb.ptr(), s.bias ? bb.ptr() : nullptr, hb.ptr(), s.M, s.F, exact, nullptr);
  drv::expect_status(std::string("gelu_bias_fwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  // pre + bias: exact sum (ref64) vs fp32 sum (baseline), both rounded to the dtype by the check.
  std::vector<double> p64(n), p32(n), h64(n), h32(n);
  for (int64_t i = 0; i < n; ++i) {
    const double bj = s.bias ? bias[i % s.F] : 0.0;
    p64[i] = pre[i] + bj;
    p32[i] = double(float(pre[i]) + float(bj));
    // h is gelu of pre as stored (the kernel rounds pre before the GELU, so the backward sees the same value)
    const double stored = preb.get(i);
    h64[i] = gelu<double>(stored, exact);
    h32[i] = double(gelu<float>(float(stored), exact));
  }
  drv::check_buf(std::string("gelu_bias_fwd pre ") + name, preb, p64, p32);
  drv::check_buf(std::string("gelu_bias_fwd h ") + name, hb, h64, h32);
}

void run_bwd(DType dt, int64_t n, bool misalign, bool exact) {
  const int64_t off = misalign ? 1 : 0;
  char name[128];
  std::snprintf(name, sizeof name, "%s %s n%lld%s", exact ? "exact" : "tanh", drv::dtype_name(dt), (long long)n,
                misalign ? " misaligned" : "");
  std::vector<double> pre(n), dh(n);
  for (auto& x : pre) x = drv::rnd(dt, 2.0 * drv::normal());
  for (auto& x : dh) x = drv::rnd(dt, drv::normal());
  Buf preb(dt, n, off), dhb(dt, n, off), hb(dt, n, off);
  for (int64_t i = 0; i < n; ++i) {
    preb.set(i, pre[i]);
    dhb.set(i, dh[i]);
  }
  const cudaError_t e = gptfast::cuda::gelu_bwd(dt, preb.ptr(), dhb.ptr(), hb.ptr(), n, exact, nullptr);
  drv::expect_status(std::string("gelu_bwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  std::vector<double> d64(n), d32(n), h64(n), h32(n);
  for (int64_t i = 0; i < n; ++i) {
    d64[i] = dh[i] * gelu_grad<double>(pre[i], exact);
    d32[i] = double(float(dh[i]) * gelu_grad<float>(float(pre[i]), exact));
    h64[i] = gelu<double>(pre[i], exact);
    h32[i] = double(gelu<float>(float(pre[i]), exact));
  }
  drv::check_buf(std::string("gelu_bwd dpre ") + name, dhb, d64, d32);
  drv::check_buf(std::string("gelu_bwd h ") + name, hb, h64, h32);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  std::vector<std::pair<DType, Shape>> fwd;
  std::vector<std::pair<DType, int64_t>> bwd;
  if (lv == drv::Level::kTiny) {
    fwd = {{DType::kFloat32, {2, 40, true, false}}, {DType::kBFloat16, {3, 37, true, false}}};
    bwd = {{DType::kFloat16, 77}};
  } else {
    const bool big = lv >= drv::Level::kDefault;
    for (DType dt : drv::all_dtypes()) {
      for (int64_t F : {1, 37, 64, 72})
        for (bool misalign : {false, true}) fwd.push_back({dt, {big ? 9 : 3, F, true, misalign}});
      fwd.push_back({dt, {5, 64, false, false}});
      fwd.push_back({dt, {4, 37, false, true}});
      for (int64_t n : {1, 37, 64, 1000}) bwd.push_back({dt, n});
      if (big) {
        fwd.push_back({dt, {130, 3072, true, false}});  // more vectors than one grid pass of threads
        bwd.push_back({dt, 130 * 3072 + 5});
      }
    }
  }
  for (bool exact : {false, true}) {
    for (const auto& c : fwd) run_fwd(c.first, c.second, exact);
    for (const auto& c : bwd) {
      run_bwd(c.first, c.second, false, exact);
      run_bwd(c.first, c.second, true, exact);
    }
  }
  return drv::finish();
}
