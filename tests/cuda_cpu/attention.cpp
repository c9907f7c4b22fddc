// CPU driver of gptfast::cuda::attention_fwd / attention_bwd (csrc/cuda/attention.cu) under cudashim.
// Reference: causal softmax attention in plain loops (fp64, and the fp32 baseline of common.h).
// Layouts: contiguous (B, H, T, D), and the (B, T, H, D) views of a packed (B, T, 3, H, D) qkv
// buffer that GPT-2's qkv split produces (strides b = 3 T H D, h = D, t = 3 H D).
#include <algorithm>

#include "common.h"

using drv::Buf;
using gptfast::cuda::BHTStrides;
using gptfast::cuda::DType;

namespace {

struct Shape {
  int64_t B, H, T, D;
  bool packed;  // (B, T, 3, H, D) qkv views, else three contiguous (B, H, T, D) tensors
  double amp = 1.0;  // q scale: 4 gives scores of tens (peaked softmax: the online max rescaling matters)
};

// Logical (b, h, t, d) values; R is the arithmetic type (double: ref64, float: the fp32 baseline).
template <typename R>
struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
};

template <typename R>
Ref<R> reference(const Shape& s, const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, const std::vector<double>& dout, const std::vector<double>& out_in,
                 const std::vector<double>& lse_in, double scale_d) {
  const int64_t T = s.T, D = s.D, BH = s.B * s.H;
  const R scale = R(scale_d);
  Ref<R> r;
  r.out.assign(BH * T * D, 0.0);
  r.lse.assign(BH * T, 0.0);
  r.dq.assign(BH * T * D, 0.0);
  r.dk.assign(BH * T * D, 0.0);
  r.dv.assign(BH * T * D, 0.0);
  std::vector<R> p(T), dp(T);
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t o = bh * T * D;
    for (int64_t i = 0; i < T; ++i) {
      // forward: softmax over keys 0..i
      R m = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        R acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += R(q[o + i * D + d]) * R(k[o + j * D + d]);
        p[j] = acc * scale;
        m = std::max(m, p[j]);
      }
      R l = 0;
      for (int64_t j = 0; j <= i; ++j) {
        p[j] = std::exp(p[j] - m);
        l += p[j];
      }
      for (int64_t d = 0; d < D; ++d) {
        R acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += p[j] * R(v[o + j * D + d]);
        r.out[o + i * D + d] = double(acc / l);
      }
      r.lse[bh * T + i] = double(m + std::log(l));
      // backward, from the given out / lse (what the launcher receives): P = exp(S - lse),
      // delta = rowsum(dO * out), dS = P (dP - delta).
      R delta = 0;
      for (int64_t d = 0; d < D; ++d) delta += R(dout[o + i * D + d]) * R(out_in[o + i * D + d]);
      for (int64_t j = 0; j <= i; ++j) {
        R sc = 0, dpp = 0;
        for (int64_t d = 0; d < D; ++d) {
          sc += R(q[o + i * D + d]) * R(k[o + j * D + d]);
          dpp += R(dout[o + i * D + d]) * R(v[o + j * D + d]);
        }
        p[j] = std::exp(sc * scale - R(lse_in[bh * T + i]));
        dp[j] = p[j] * (dpp - delta);  // dS
      }
      for (int64_t d = 0; d < D; ++d) {
        R acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += dp[j] * R(k[o + j * D + d]);
        r.dq[o + i * D + d] = double(acc * scale);
      }
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t d = 0; d < D; ++d) {
          // accumulate in R (an fp32 sum for the baseline)
          r.dk[o + j * D + d] = double(R(r.dk[o + j * D + d]) + dp[j] * R(q[o + i * D + d]));
          r.dv[o + j * D + d] = double(R(r.dv[o + j * D + d]) + p[j] * R(dout[o + i * D + d]));
        }
    }
    for (int64_t x = o; x < o + T * D; ++x) {
      r.dk[x] = double(R(R(r.dk[x]) * scale));
    }
  }
  return r;
}

// A (B, H, T, D) operand as the launcher sees it: base pointer + strides.
struct View {
  const void* ptr;
  BHTStrides st;
};

void run_case(DType dt, const Shape& s) {
  const int64_t B = s.B, H = s.H, T = s.T, D = s.D, BH = B * H, n = BH * T * D;
  const double scale = 1.0 / std::sqrt(double(D));
  char name[160];
  std::snprintf(name, sizeof name, "%s B%lld H%lld T%lld D%lld %s%s", drv::dtype_name(dt), (long long)B, (long long)H,
                (long long)T, (long long)D, s.packed ? "packed(B,T,3,H,D)" : "contiguous", s.amp != 1.0 ? " peaked" : "");
  // Inputs, rounded through the dtype (logical (b, h, t, d) order).
  std::vector<double> q(n), k(n), v(n), dout(n);
  for (auto* a : {&q, &k, &v, &dout})
    for (auto& x : *a) x = drv::rnd(dt, drv::normal() * (a == &q ? s.amp : 1.0));

  // Device-side (host) buffers.
  Buf qkv(dt, s.packed ? 3 * n : 1), qb(dt, s.packed ? 1 : n), kb(dt, s.packed ? 1 : n), vb(dt, s.packed ? 1 : n);
  View vq, vk, vv;
  auto idx = [&](int64_t b, int64_t h, int64_t t, int64_t d) { return ((b * H + h) * T + t) * D + d; };
  if (s.packed) {
    const BHTStrides st{3 * T * H * D, D, 3 * H * D};
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t at = b * st.b + h * st.h + t * st.t + d;
            qkv.set(at, q[idx(b, h, t, d)]);
            qkv.set(at + H * D, k[idx(b, h, t, d)]);
            qkv.set(at + 2 * H * D, v[idx(b, h, t, d)]);
          }
    const char* base = static_cast<const char*>(qkv.ptr());
    vq = {base, st};
    vk = {base + H * D * qkv.es(), st};
    vv = {base + 2 * H * D * qkv.es(), st};
  } else {
    const BHTStrides st{H * T * D, T * D, D};
    for (int64_t i = 0; i < n; ++i) {
      qb.set(i, q[i]);
      kb.set(i, k[i]);
      vb.set(i, v[i]);
    }
    vq = {qb.ptr(), st};
    vk = {kb.ptr(), st};
    vv = {vb.ptr(), st};
  }

  // Forward.
  Buf out(dt, n);
  std::vector<float> lse(BH * T, NAN);
  cudaError_t e = gptfast::cuda::attention_fwd(dt, vq.ptr, vk.ptr, vv.ptr, out.ptr(), lse.data(), B, H, T, D, vq.st,
                                               vk.st, vv.st, float(scale), nullptr);
  drv::expect_status(std::string("attention_fwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;

  // The backward's out / lse inputs: the exact forward, rounded as stored (out in dtype, lse fp32).
  std::vector<double> zeros_n(n, 0.0), zeros_r(BH * T, 0.0);
  const Ref<double> fwd = reference<double>(s, q, k, v, dout, zeros_n, zeros_r, scale);
  std::vector<double> out_in(n), lse_in(BH * T);
  for (int64_t i = 0; i < n; ++i) out_in[i] = drv::rnd(dt, fwd.out[i]);
  for (int64_t i = 0; i < BH * T; ++i) lse_in[i] = double(float(fwd.lse[i]));
  const Ref<double> r64 = reference<double>(s, q, k, v, dout, out_in, lse_in, scale);
  const Ref<float> r32 = reference<float>(s, q, k, v, dout, out_in, lse_in, scale);
  drv::check_buf(std::string("attention_fwd out ") + name, out, r64.out, r32.out);
  drv::check_f32(std::string("attention_fwd lse ") + name, lse.data(), BH * T, r64.lse, r32.lse);

  // Backward.
  Buf dob(dt, n), ob(dt, n), dq(dt, n), dk(dt, n), dv(dt, n);
  for (int64_t i = 0; i < n; ++i) {
    dob.set(i, dout[i]);
    ob.set(i, out_in[i]);
  }
  std::vector<float> lsef(lse_in.begin(), lse_in.end()), delta(BH * T, NAN);
  e = gptfast::cuda::attention_bwd(dt, dob.ptr(), vq.ptr, vk.ptr, vv.ptr, ob.ptr(), lsef.data(), delta.data(),
                                   dq.ptr(), dk.ptr(), dv.ptr(), B, H, T, D, vq.st, vk.st, vv.st, float(scale),
                                   nullptr);
  drv::expect_status(std::string("attention_bwd launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  drv::check_buf(std::string("attention_bwd dq ") + name, dq, r64.dq, r32.dq);
  drv::check_buf(std::string("attention_bwd dk ") + name, dk, r64.dk, r32.dk);
  drv::check_buf(std::string("attention_bwd dv ") + name, dv, r64.dv, r32.dv);
}

void unsupported() {
  // Head dim 48 (not 16 / 32 / 64 / 128): the launchers refuse before touching any pointer.
  const BHTStrides st{48, 48, 48};
  float lse[1];
  drv::expect_status("attention_fwd D=48 refused",
                     gptfast::cuda::attention_fwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, lse, 1, 1, 1,
                                                  48, st, st, st, 1.f, nullptr),
                     cudaErrorInvalidValue);
  drv::expect_status("attention_bwd D=48 refused",
                     gptfast::cuda::attention_bwd(DType::kFloat16, nullptr, nullptr, nullptr, nullptr, nullptr, lse,
                                                  lse, nullptr, nullptr, nullptr, 1, 1, 1, 48, st, st, st, 1.f,
                                                  nullptr),
                     cudaErrorInvalidValue);
  // A grid past the hardware limit (ceil(T / 64) query tiles > 65535 in grid.y): refused, nothing launched.
  const int64_t T = 65536LL * 64 + 1;
  drv::expect_status("attention_fwd grid.y > 65535 refused",
                     gptfast::cuda::attention_fwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1,
                                                  T, 64, st, st, st, 1.f, nullptr),
                     cudaErrorInvalidConfiguration);
  drv::expect_status("attention_bwd grid.y > 65535 refused",
                     gptfast::cuda::attention_bwd(DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                  nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, T, 64, st, st, st,
                                                  1.f, nullptr),
                     cudaErrorInvalidConfiguration);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  std::vector<std::pair<DType, Shape>> cases;
  if (lv == drv::Level::kTiny) {
    cases = {{DType::kFloat32, {1, 1, 37, 16, true}}, {DType::kBFloat16, {1, 1, 5, 32, false}}};
  } else if (lv == drv::Level::kSmall) {
    for (int64_t T : {1, 37, 65}) cases.push_back({DType::kFloat32, {1, 2, T, 16, true}});
    cases.push_back({DType::kFloat16, {1, 1, 33, 64, true}});
    cases.push_back({DType::kBFloat16, {2, 1, 9, 32, false}});
  } else {
    const bool full = lv == drv::Level::kFull;
    for (int64_t D : {16, 32, 64, 128})
      for (int64_t T : {1, 37, 64, 65, 130})
        for (DType dt : drv::all_dtypes()) {
          // default: every (D, T) in fp32 through the packed views, low precision at the partial tiles
          if (!full && dt != DType::kFloat32 && !(T == 65 || T == 37)) continue;
          cases.push_back({dt, {full ? 2 : 1, 2, T, D, true}});
          if (full) cases.push_back({dt, {1, 3, T, D, false}});
        }
    cases.push_back({DType::kFloat16, {2, 3, 17, 64, false}});
    cases.push_back({DType::kFloat32, {1, 2, 130, 64, true, 4.0}});
    cases.push_back({DType::kBFloat16, {1, 2, 65, 32, false, 4.0}});
  }
  for (const auto& c : cases) run_case(c.first, c.second);
  unsupported();
  return drv::finish();
}
