// CPU driver of gptfast::cuda::layer_norm_fwd / layer_norm_bwd (csrc/cuda/layer_norm.cu) under cudashim.
// Covers: the 16-byte vector path (N * sizeof(T) % 16 == 0, aligned pointers) and the scalar path
// (N not a multiple of the vector width, or a misaligned pointer); weight / bias absent; M above
// the backward's 512 blocks (rows walked grid-stride); dW / dB partials in shared memory
// (2 N floats fit in 48 KB) and in the global partial buffer (N > 6112).
#include <algorithm>

#include "common.h"

using drv::Buf;
using gptfast::cuda::DType;

namespace {

struct Shape {
  int64_t M, N;
  bool affine;     // weight and bias given (else nullptr)
  bool misalign;   // x / y / dy / dx start one element past a 16-byte boundary
};

template <typename R>
struct Ref {
  std::vector<double> y, mean, rstd, dx, dw, db;
};

template <typename R>
Ref<R> reference(const Shape& s, const std::vector<double>& x, const std::vector<double>& w,
                 const std::vector<double>& b, const std::vector<double>& dy, const std::vector<double>& mean_in,
                 const std::vector<double>& rstd_in, double eps) {
  const int64_t M = s.M, N = s.N;
  Ref<R> r;
  r.y.resize(M * N);
  r.mean.resize(M);
  r.rstd.resize(M);
  r.dx.resize(M * N);
  std::vector<R> dw(N, R(0)), db(N, R(0));
  for (int64_t i = 0; i < M; ++i) {
    const double* xr = &x[i * N];
    R sum = 0;
    for (int64_t j = 0; j < N; ++j) sum += R(xr[j]);
    const R mean = sum / R(N);
    R sq = 0;
    for (int64_t j = 0; j < N; ++j) sq += (R(xr[j]) - mean) * (R(xr[j]) - mean);
    const R rstd = R(1) / std::sqrt(sq / R(N) + R(eps));
    r.mean[i] = double(mean);
    r.rstd[i] = double(rstd);
    for (int64_t j = 0; j < N; ++j) r.y[i * N + j] = double((R(xr[j]) - mean) * rstd * R(w[j]) + R(b[j]));
    // backward from the given (fp32) mean / rstd
    const R mi = R(mean_in[i]), ri = R(rstd_in[i]);
    R sg = 0, sgx = 0;
    for (int64_t j = 0; j < N; ++j) {
      const R xhat = (R(xr[j]) - mi) * ri, g = R(dy[i * N + j]);
      sg += g * R(w[j]);
      sgx += g * R(w[j]) * xhat;
      dw[j] += g * xhat;
      db[j] += g;
    }
    const R mg = sg / R(N), mgx = sgx / R(N);
    for (int64_t j = 0; j < N; ++j) {
      const R xhat = (R(xr[j]) - mi) * ri;
      r.dx[i * N + j] = double(ri * (R(dy[i * N + j]) * R(w[j]) - mg - xhat * mgx));
    }
  }
  r.dw.assign(dw.begin(), dw.end());
  r.db.assign(db.begin(), db.end());
  return r;
}

void run_case(DType dt, const Shape& s) {
  const int64_t M = s.M, N = s.N, n = M * N;
  const float eps = 1e-5f;
  const int64_t off = s.misalign ? 1 : 0;
  char name[160];
  std::snprintf(name, sizeof name, "%s M%lld N%lld%s%s (%s)", drv::dtype_name(dt), (long long)M, (long long)N,
                s.affine ? "" : " no-affine", s.misalign ? " misaligned" : "",
                gptfast::cuda::ln_bwd_smem_acc(N) ? "smem partials" : "global partials");
  std::vector<double> x(n), dy(n), w(N, 1.0), b(N, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = drv::rnd(dt, 0.5 + 2.0 * drv::normal());
    dy[i] = drv::rnd(dt, drv::normal());
  }
  if (s.affine)
    for (int64_t j = 0; j < N; ++j) {
      w[j] = drv::rnd(dt, 1.0 + 0.5 * drv::normal());
      b[j] = drv::rnd(dt, 0.3 * drv::normal());
    }
  Buf xb(dt, n, off), yb(dt, n, off), wb(dt, N), bb(dt, N), dyb(dt, n, off), dxb(dt, n, off), dwb(dt, N), dbb(dt, N);
  for (int64_t i = 0; i < n; ++i) {
    xb.set(i, x[i]);
    dyb.set(i, dy[i]);
  }
  for (int64_t j = 0; j < N; ++j) {
    wb.set(j, w[j]);
    bb.set(j, b[j]);
  }
  std::vector<float> mean(M, NAN), rstd(M, NAN);
  cudaError_t e = gptfast::cuda::layer_norm_fwd(dt, xb.ptr(), s.affine ? wb.ptr() : nullptr,
                                                s.affine ? bb.ptr() : nullptr, yb.ptr(), mean.data(), rstd.data(), M,
                                                N, eps, nullptr);
  drv::expect_status(std::string("layer_norm_fwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  std::vector<double> zeros(M, 0.0);
  const Ref<double> f64 = reference<double>(s, x, w, b, dy, zeros, zeros, eps);
  std::vector<double> mean_in(M), rstd_in(M);
  for (int64_t i = 0; i < M; ++i) {
    mean_in[i] = double(float(f64.mean[i]));
    rstd_in[i] = double(float(f64.rstd[i]));
  }
  const Ref<double> r64 = reference<double>(s, x, w, b, dy, mean_in, rstd_in, eps);
  const Ref<float> r32 = reference<float>(s, x, w, b, dy, mean_in, rstd_in, eps);
  drv::check_buf(std::string("layer_norm_fwd y ") + name, yb, r64.y, r32.y);
  drv::check_f32(std::string("layer_norm_fwd mean ") + name, mean.data(), M, r64.mean, r32.mean);
  drv::check_f32(std::string("layer_norm_fwd rstd ") + name, rstd.data(), M, r64.rstd, r32.rstd);

  std::vector<float> mf(mean_in.begin(), mean_in.end()), rf(rstd_in.begin(), rstd_in.end());
  std::vector<float> partial(size_t(gptfast::cuda::ln_bwd_blocks(M)) * 2 * N, NAN);
  e = gptfast::cuda::layer_norm_bwd(dt, dyb.ptr(), xb.ptr(), s.affine ? wb.ptr() : nullptr, mf.data(), rf.data(),
                                    dxb.ptr(), dwb.ptr(), dbb.ptr(), partial.data(), M, N, nullptr);
  drv::expect_status(std::string("layer_norm_bwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  drv::check_buf(std::string("layer_norm_bwd dx ") + name, dxb, r64.dx, r32.dx);
  drv::check_buf(std::string("layer_norm_bwd dw ") + name, dwb, r64.dw, r32.dw);
  drv::check_buf(std::string("layer_norm_bwd db ") + name, dbb, r64.db, r32.db);
}

void edge_cases() {
  // M = 0: forward does nothing; backward gives dw = db = 0.
  Buf dw(DType::kFloat32, 37), db(DType::kFloat32, 37);
  std::vector<float> partial(2 * 37, NAN);
  cudaError_t e = gptfast::cuda::layer_norm_bwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                dw.ptr(), db.ptr(), partial.data(), 0, 37, nullptr);
  drv::expect_status("layer_norm_bwd M=0 launch", e, cudaSuccess);
  std::vector<double> z(37, 0.0);
  drv::check_buf("layer_norm_bwd M=0 dw", dw, z, z);
  drv::check_buf("layer_norm_bwd M=0 db", db, z, z);
  drv::expect_status("layer_norm_fwd N=0 refused",
                     gptfast::cuda::layer_norm_fwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                   nullptr, 4, 0, 1e-5f, nullptr),
                     cudaErrorInvalidValue);
  // More rows than a grid holds (grid.x <= 2^31 - 1): refused before launching.
  drv::expect_status("layer_norm_fwd M > max grid refused",
                     gptfast::cuda::layer_norm_fwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                   nullptr, int64_t(1) << 31, 8, 1e-5f, nullptr),
                     cudaErrorInvalidConfiguration);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  std::vector<std::pair<DType, Shape>> cases;
  if (lv == drv::Level::kTiny) {
    cases = {{DType::kFloat32, {3, 40, true, false}}, {DType::kFloat16, {2, 37, false, false}}};
  } else if (lv == drv::Level::kSmall) {
    cases = {{DType::kFloat32, {5, 80, true, false}},  {DType::kFloat16, {3, 37, true, false}},
             {DType::kBFloat16, {4, 64, true, true}},  {DType::kFloat32, {2, 6200, true, false}},
             {DType::kFloat32, {3, 300, false, false}}};
  } else {
    for (DType dt : drv::all_dtypes()) {
      for (int64_t N : {1, 37, 80, 768, 1031})
        for (bool misalign : {false, true}) cases.push_back({dt, {7, N, true, misalign}});
      cases.push_back({dt, {5, 64, false, false}});
      cases.push_back({dt, {3, 6200, true, false}});  // global partials, vector path
      cases.push_back({dt, {2, 6113, true, false}});  // global partials, scalar path
      cases.push_back({dt, {600, 40, true, false}});  // > 512 rows: grid-stride rows in the backward
    }
    if (lv == drv::Level::kFull) {
      cases.push_back({DType::kFloat32, {1030, 768, true, false}});
      cases.push_back({DType::kBFloat16, {64, 12288, true, false}});
    }
  }
  for (const auto& c : cases) run_case(c.first, c.second);
  edge_cases();
  return drv::finish();
}
