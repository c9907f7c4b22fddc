// CPU driver of gptfast::cuda::decode_attention (csrc/cuda/decode_attention.cu: split-K kernel +
// combine) under cudashim. Reference: gptfast/ops/reference.py::decode_attention in plain loops:
// query i of sequence b sits at position cache_lens[b] - Tq + i and sees cache positions 0 .. that.
// Every cache position at or past cache_lens[b] holds NaN: any read of it that reaches an output
// makes that output NaN (a failure). Plans from several num_sms (1 split .. many), plus hand-made
// plans with 32-key chunks so that whole splits lie past short sequences.
#include <algorithm>

#include "common.h"

using drv::Buf;
using gptfast::cuda::BHTStrides;
using gptfast::cuda::DecodePlan;
using gptfast::cuda::DType;

namespace {

struct Shape {
  int64_t B, H, Tq, T_max, D;
  std::vector<int64_t> lens;  // (B,)
  bool strided;               // q (B, Tq, H, D) and caches (B, T_max, H, D) buffers viewed as (B, H, T, D)
};

template <typename R>
std::vector<double> reference(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                              const std::vector<double>& v, double scale) {
  const int64_t H = s.H, Tq = s.Tq, T = s.T_max, D = s.D;
  std::vector<double> out(s.B * H * Tq * D);
  std::vector<R> p(T);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t pos = s.lens[b] - Tq + i;
        const double* qr = &q[((b * H + h) * Tq + i) * D];
        R m = -INFINITY;
        for (int64_t j = 0; j <= pos; ++j) {
          R acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += R(qr[d]) * R(k[((b * H + h) * T + j) * D + d]);
          p[j] = acc * R(scale);
          m = std::max(m, p[j]);
        }
        R l = 0;
        for (int64_t j = 0; j <= pos; ++j) {
          p[j] = std::exp(p[j] - m);
          l += p[j];
        }
        for (int64_t d = 0; d < D; ++d) {
          R acc = 0;
          for (int64_t j = 0; j <= pos; ++j) acc += p[j] * R(v[((b * H + h) * T + j) * D + d]);
          out[((b * H + h) * Tq + i) * D + d] = double(acc / l);
        }
      }
  return out;
}

void run_case(DType dt, const Shape& s, const DecodePlan& plan, const char* plan_name) {
  const int64_t B = s.B, H = s.H, Tq = s.Tq, T = s.T_max, D = s.D, BH = B * H;
  const double scale = 1.0 / std::sqrt(double(D));
  std::string lens;
  for (int64_t L : s.lens) lens += (lens.empty() ? "" : ",") + std::to_string(L);
  char name[200];
  std::snprintf(name, sizeof name, "%s B%lld H%lld Tq%lld T_max%lld D%lld lens[%s] %s plan %s (splits %lld chunk %lld)",
                drv::dtype_name(dt), (long long)B, (long long)H, (long long)Tq, (long long)T, (long long)D,
                lens.c_str(), s.strided ? "strided" : "contiguous", plan_name, (long long)plan.splits,
                (long long)plan.chunk);
  // Logical (b, h, t, d) values; NaN past each sequence's length.
  std::vector<double> q(BH * Tq * D), k(BH * T * D), v(BH * T * D);
  for (auto& x : q) x = drv::rnd(dt, drv::normal());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = ((b * H + h) * T + t) * D + d;
          k[i] = t < s.lens[b] ? drv::rnd(dt, drv::normal()) : NAN;
          v[i] = t < s.lens[b] ? drv::rnd(dt, drv::normal()) : NAN;
        }
  const BHTStrides sq = s.strided ? BHTStrides{Tq * H * D, D, H * D} : BHTStrides{H * Tq * D, Tq * D, D};
  const BHTStrides sc = s.strided ? BHTStrides{T * H * D, D, H * D} : BHTStrides{H * T * D, T * D, D};
  Buf qb(dt, BH * Tq * D), kb(dt, BH * T * D), vb(dt, BH * T * D), out(dt, BH * Tq * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < Tq; ++t)
        for (int64_t d = 0; d < D; ++d) qb.set(b * sq.b + h * sq.h + t * sq.t + d, q[((b * H + h) * Tq + t) * D + d]);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) {
          kb.set(b * sc.b + h * sc.h + t * sc.t + d, k[((b * H + h) * T + t) * D + d]);
          vb.set(b * sc.b + h * sc.h + t * sc.t + d, v[((b * H + h) * T + t) * D + d]);
        }
    }
  std::vector<float> ws(size_t(gptfast::cuda::decode_workspace_floats(BH, Tq, D, plan)), NAN);
  const cudaError_t e = gptfast::cuda::decode_attention(dt, qb.ptr(), kb.ptr(), vb.ptr(), s.lens.data(), out.ptr(),
                                                        ws.data(), plan, B, H, Tq, T, D, sq, sc, sc, float(scale),
                                                        nullptr);
  drv::expect_status(std::string("decode_attention launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  drv::check_buf(std::string("decode_attention out ") + name, out, reference<double>(s, q, k, v, scale),
                 reference<float>(s, q, k, v, scale));
}

void run_plans(DType dt, const Shape& s, bool many) {
  const int64_t BH = s.B * s.H;
  std::vector<int64_t> sms = many ? std::vector<int64_t>{1, 8, 132} : std::vector<int64_t>{132};
  for (int64_t n : sms) {
    const DecodePlan p = gptfast::cuda::decode_plan(BH, s.T_max, n);
    const std::string nm = "num_sms=" + std::to_string(n);
    run_case(dt, s, p, nm.c_str());
  }
  // 32-key chunks: the most splits, most of them past the short sequences' lengths.
  DecodePlan fine;
  fine.chunk = 32;
  fine.splits = gptfast::cuda::ceil_div(s.T_max, 32);
  if (fine.splits <= gptfast::cuda::kMaxGridYZ) run_case(dt, s, fine, "chunk=32");
}

void unsupported() {
  const BHTStrides st{64, 64, 64};
  const DecodePlan p = gptfast::cuda::decode_plan(1, 64, 132);
  drv::expect_status("decode_attention D=48 refused",
                     gptfast::cuda::decode_attention(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                     nullptr, p, 1, 1, 1, 64, 48, st, st, st, 1.f, nullptr),
                     cudaErrorInvalidValue);
  drv::expect_status("decode_attention Tq=5 refused",
                     gptfast::cuda::decode_attention(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                     nullptr, p, 1, 1, 5, 64, 64, st, st, st, 1.f, nullptr),
                     cudaErrorInvalidValue);
  DecodePlan huge;
  huge.splits = 70000;  // grid.y past 65535
  huge.chunk = 32;
  drv::expect_status("decode_attention grid.y > 65535 refused",
                     gptfast::cuda::decode_attention(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                     nullptr, huge, 1, 1, 1, 70000 * 32, 64, st, st, st, 1.f, nullptr),
                     cudaErrorInvalidConfiguration);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  if (lv == drv::Level::kTiny) {
    run_case(DType::kFloat32, {2, 1, 2, 40, 16, {2, 40}, true}, gptfast::cuda::decode_plan(2, 40, 132), "num_sms=132");
    DecodePlan p{2, 32};
    run_case(DType::kBFloat16, {2, 1, 1, 64, 32, {1, 33}, false}, p, "chunk=32");
  } else if (lv == drv::Level::kSmall) {
    run_plans(DType::kFloat32, {3, 2, 1, 300, 16, {1, 300, 129}, true}, true);
    run_plans(DType::kFloat16, {2, 1, 3, 100, 64, {3, 65}, true}, false);
    run_plans(DType::kBFloat16, {2, 2, 4, 70, 32, {70, 4}, false}, false);
  } else {
    const bool full = lv == drv::Level::kFull;
    for (int64_t D : {16, 32, 64, 128})
      for (int64_t Tq = 1; Tq <= 4; ++Tq)
        for (DType dt : drv::all_dtypes()) {
          if (!full && dt != DType::kFloat32 && Tq != 2) continue;
          const int64_t T_max = full ? 1000 : 300;
          // lengths: the minimum (Tq: 1 for single-token decode), the full cache, and ragged ones
          const std::vector<int64_t> lens = {Tq, T_max, 129 + Tq, 37};
          run_plans(dt, {4, 2, Tq, T_max, D, lens, true}, Tq == 1 || Tq == 3 || full);
        }
    run_plans(DType::kFloat16, {3, 3, 2, 65, 64, {2, 65, 33}, false}, true);
  }
  unsupported();
  return drv::finish();
}
