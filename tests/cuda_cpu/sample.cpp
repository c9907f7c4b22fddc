// CPU driver of gptfast::cuda::sample (csrc/cuda/sampling.cu) under cudashim.
// Reference: gptfast/ops/reference.py::sample's rule in plain fp64 loops, with the uniforms given:
//   x = fp32(logits / temperature); top-k keeps x >= the k-th largest x (ties kept); p = softmax
//   of the kept x; top-p keeps token i iff the mass of tokens strictly more probable than i is
//   < top_p; renormalise; the token is the first (vocabulary order) whose cumulative probability
//   exceeds u * total, clamped to the last kept token; temperature 0 is argmax (first max, NaN wins).
// The chosen token must equal the reference's exactly. The kernel's probabilities are fp32, the
// reference's fp64: where u * total or top_p lies within 1e-5 (relative) of a decision boundary the
// two may legitimately differ, so the driver moves u / top_p off such boundaries before launching
// (it prints when it does) instead of accepting either answer.
#include <algorithm>
#include <numeric>

#include "common.h"

namespace {

struct Config {
  int64_t V;
  float temperature;
  int64_t top_k;
  float top_p;
  int kind;  // 0: random logits, 1: few distinct values (many ties), 2: all equal, 3: one NaN (argmax),
             // 4: random with most tokens banned (-inf)
};

// Kept, renormalised probabilities in fp64 (all zero for temperature 0).
std::vector<double> filtered(const std::vector<float>& lg, const Config& c, float top_p) {
  const int64_t V = c.V;
  std::vector<double> x(V);
  for (int64_t i = 0; i < V; ++i) x[i] = double(lg[i] / c.temperature);  // fp32 division, as the kernel
  double kth = -INFINITY;
  if (c.top_k > 0 && c.top_k < V) {
    std::vector<double> s = x;
    std::sort(s.begin(), s.end(), std::greater<double>());
    kth = s[c.top_k - 1];
  }
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  std::vector<double> p(V, 0.0);
  double z = 0.0;
  for (int64_t i = 0; i < V; ++i)
    if (x[i] >= kth) z += std::exp(x[i] - m);
  for (int64_t i = 0; i < V; ++i) p[i] = x[i] >= kth ? std::exp(x[i] - m) / z : 0.0;
  if (top_p < 1.f) {
    // G(i) = mass of tokens strictly more probable than i: sort descending, prefix sums over
    // groups of equal probability.
    std::vector<double> s = p;
    std::sort(s.begin(), s.end(), std::greater<double>());
    std::vector<std::pair<double, double>> g_of;  // (probability, mass strictly above it)
    double acc = 0.0;
    for (size_t i = 0; i < s.size(); ++i) {
      if (i == 0 || s[i] != s[i - 1]) g_of.push_back({s[i], acc});
      acc += s[i];
    }
    double tot = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      const auto it = std::lower_bound(g_of.begin(), g_of.end(), p[i],
                                       [](const std::pair<double, double>& a, double v) { return a.first > v; });
      p[i] = it->second < double(top_p) ? p[i] : 0.0;
      tot += p[i];
    }
    for (int64_t i = 0; i < V; ++i) p[i] /= tot;
  }
  return p;
}

// True if top_p is within 1e-5 (relative) of some token's "mass strictly more probable" value.
bool top_p_ambiguous(const std::vector<float>& lg, const Config& c, float top_p) {
  if (top_p >= 1.f) return false;
  std::vector<double> s = filtered(lg, c, 1.f);
  std::sort(s.begin(), s.end(), std::greater<double>());
  double g = 0.0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i > 0 && s[i] != s[i - 1] && std::fabs(g - double(top_p)) < 1e-5 * std::max(1e-3, double(top_p))) return true;
    g += s[i];
  }
  return false;
}

int64_t draw(const std::vector<double>& p, double u, bool* ambiguous) {
  double tot = 0.0;
  int64_t last = -1;
  for (size_t i = 0; i < p.size(); ++i) {
    tot += p[i];
    if (p[i] > 0) last = int64_t(i);
  }
  const double target = u * tot;
  double c = 0.0;
  *ambiguous = false;
  int64_t found = int64_t(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    c += p[i];
    if (p[i] > 0 && std::fabs(c - target) < 1e-5 * tot) *ambiguous = true;
    if (found == int64_t(p.size()) && c > target) found = int64_t(i);
  }
  return std::min(found, last);
}

int64_t argmax_ref(const std::vector<float>& lg) {
  int64_t best = 0;
  for (int64_t i = 1; i < int64_t(lg.size()); ++i) {
    const bool nb = std::isnan(lg[best]), ni = std::isnan(lg[i]);
    if (nb) break;
    if (ni || lg[i] > lg[best]) best = i;
  }
  return best;
}

void run(const Config& c) {
  const int64_t V = c.V, B = 4;
  std::vector<float> logits(B * V);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < V; ++i) {
      float x;
      if (c.kind == 0) x = float(2.0 * drv::normal());
      else if (c.kind == 1) x = float(std::round(drv::normal() * 2.0) / 2.0);
      else if (c.kind == 2) x = 1.25f;
      else if (c.kind == 4) x = (i % 5 == 2) ? float(2.0 * drv::normal()) : -INFINITY;
      else x = float(drv::normal());
      logits[b * V + i] = x;
    }
  if (c.kind == 3) logits[1 * V + V / 2] = NAN;
  std::vector<float> u = {0.f, 0.31f, 0.5f, 0.9999f};
  float top_p = c.top_p;
  bool moved = false;
  for (int guard = 0; guard < 50; ++guard) {
    bool amb = false;
    for (int64_t b = 0; b < B; ++b)
      amb = amb || top_p_ambiguous(std::vector<float>(logits.begin() + b * V, logits.begin() + (b + 1) * V), c, top_p);
    if (!amb) break;
    top_p = std::min(0.999f, top_p * 1.003f + 1e-4f);
    moved = true;
  }
  std::vector<int64_t> want(B);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<float> row(logits.begin() + b * V, logits.begin() + (b + 1) * V);
    if (c.temperature == 0.f) {
      want[b] = argmax_ref(row);
      continue;
    }
    const std::vector<double> p = filtered(row, c, top_p);
    for (int guard = 0; guard < 50; ++guard) {
      bool amb = false;
      want[b] = draw(p, double(u[b]), &amb);
      if (!amb) break;
      u[b] = u[b] + 1.7e-4f;
      moved = true;
    }
  }
  std::vector<int64_t> out(B, -7);
  std::vector<float> probs(B * V, NAN);
  const cudaError_t e = gptfast::cuda::sample(logits.data(), u.data(), out.data(), probs.data(), B, V, c.temperature,
                                              c.top_k, top_p, nullptr);
  char name[200];
  std::snprintf(name, sizeof name, "V%lld T%g top_k%lld top_p%g %s%s", (long long)V, double(c.temperature),
                (long long)c.top_k, double(top_p),
                c.kind == 0   ? "random"
                : c.kind == 1 ? "ties"
                : c.kind == 2 ? "all-equal"
                : c.kind == 3 ? "with NaN"
                              : "banned (-inf)",
                moved ? " (u / top_p moved off a boundary)" : "");
  drv::expect_status(std::string("sample launch ") + name, e, cudaSuccess);
  if (e != cudaSuccess) return;
  for (int64_t b = 0; b < B; ++b) {
    char d[96];
    std::snprintf(d, sizeof d, "row %lld u %.5f: got %lld want %lld", (long long)b, double(u[b]), (long long)out[b],
                  (long long)want[b]);
    drv::report(out[b] == want[b], std::string("sample token ") + name, d);
  }
}

void unsupported() {
  float f = 0.f;
  int64_t o = 0;
  drv::expect_status("sample V=0 refused", gptfast::cuda::sample(&f, &f, &o, &f, 1, 0, 1.f, 0, 1.f, nullptr),
                     cudaErrorInvalidValue);
  drv::expect_status("sample temperature<0 refused", gptfast::cuda::sample(&f, &f, &o, &f, 1, 4, -1.f, 0, 1.f, nullptr),
                     cudaErrorInvalidValue);
  drv::expect_status("sample top_p=0 refused", gptfast::cuda::sample(&f, &f, &o, &f, 1, 4, 1.f, 0, 0.f, nullptr),
                     cudaErrorInvalidValue);
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Level lv = drv::parse_level(argc, argv);
  std::vector<Config> cs;
  if (lv == drv::Level::kTiny) {
    cs.push_back({37, 1.f, 5, 0.9f, 1});
    cs.push_back({40, 0.f, 0, 1.f, 3});
    cs.push_back({37, 1.f, 3, 0.8f, 4});
  } else if (lv == drv::Level::kSmall) {
    for (const Config& c : {Config{37, 1.f, 5, 0.9f, 1}, Config{40, 0.f, 0, 1.f, 3}, Config{300, 0.7f, 0, 0.5f, 0},
                            Config{1, 1.f, 0, 1.f, 0}, Config{600, 1.f, 1, 1.f, 1}})
      cs.push_back(c);
  } else {
    const bool full = lv == drv::Level::kFull;
    int pick = 0;
    for (int64_t V : {1, 37, 1000, 1537})
      for (float T : {0.7f, 1.f, 1.5f})
        for (int64_t k : {int64_t(0), int64_t(1), int64_t(5), V})
          for (float p : {1.f, 0.9f, 0.5f, 1e-6f})
            for (int kind : {0, 1, 2}) {
              // default: every 11th point of the grid (each V, k, p and kind still appears)
              if (full || pick++ % 11 == 0) cs.push_back({V, T, k, p, kind});
            }
    for (int64_t V : {1, 64, 1537}) {
      cs.push_back({V, 0.f, 0, 1.f, 3});  // argmax with a NaN
      cs.push_back({V, 0.f, 0, 1.f, 1});  // argmax with ties: the first maximum
    }
    cs.push_back({37, 1.f, 1, 1.f, 2});     // all equal, k = 1: every token ties, all kept
    cs.push_back({37, 1.f, 0, 1e-6f, 2});   // all equal, tiny p: all kept (none strictly more probable)
    cs.push_back({1000, 1.f, 1, 1.f, 1});   // k = 1 with ties at the maximum
    cs.push_back({1000, 1.f, 0, 1e-6f, 0}); // tiny p: the most probable token only
    for (int64_t k : {int64_t(0), int64_t(3)})  // banned tokens (-inf logits) never drawn
      for (float p : {1.f, 0.8f}) cs.push_back({37, 0.9f, k, p, 4});
    cs.push_back({1000, 0.f, 0, 1.f, 4});
    if (lv == drv::Level::kFull) cs.push_back({50257, 0.8f, 50, 0.95f, 0});
  }
  for (const Config& c : cs) run(c);
  unsupported();
  return drv::finish();
}
